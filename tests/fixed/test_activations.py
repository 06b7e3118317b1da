"""Activations against float: within the table step (times the largest slope) plus one
LSB; the table index is hls4ml's, checked against a Python rendering of it."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import fixed as qf

X_FMT = qf.Format(16, 6, rounding="RND_CONV", overflow="SAT")
OUT = qf.Format(16, 2, rounding="RND_CONV", overflow="SAT")


def _inputs(lo, hi, n=4001):
    x = jnp.linspace(lo, hi, n, dtype=jnp.float32)
    fx = qf.from_float(x, X_FMT)
    return fx, np.asarray(fx.to_float(), np.float64)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


@pytest.mark.parametrize(
    "name,fn,slope,size,rng",
    [
        ("sigmoid", _sigmoid, 0.25, 1024, 8.0),
        ("sigmoid", _sigmoid, 0.25, 256, 4.0),
        ("tanh", np.tanh, 1.0, 1024, 4.0),
        ("tanh", np.tanh, 1.0, 2048, 2.0),
    ],
)
def test_tables_within_step_plus_one_lsb(name, fn, slope, size, rng):
    fx, x = _inputs(-rng, rng - 1e-3)
    y = getattr(qf, name)(fx, OUT, table_size=size, table_range=rng)
    assert y.format == OUT
    step = 2 * rng / size
    err = np.abs(np.asarray(y.to_float(), np.float64) - fn(x))
    assert err.max() <= step * slope + OUT.lsb, err.max()
    assert err.max() > OUT.lsb  # the table step dominates: the bound is not vacuous


def _hls4ml_index(m: int, frac: int, size: int, rng: float) -> int:
    """hls4ml: ``data_round = data * N / (2R)`` converted to int (C truncation toward
    zero), ``index = data_round + N/2``, clipped."""
    v = Fraction(m, 2**frac) * size / Fraction(2 * rng)
    idx = int(v) + size // 2
    return min(max(idx, 0), size - 1)


def test_sigmoid_index_is_hls4mls():
    fx, _ = _inputs(-10, 10, 1001)
    y = np.asarray(qf.sigmoid(fx, OUT).mantissa)
    table = qf.Table(_sigmoid, 1024, -8.0, Fraction(1, 64), OUT).entries
    for m, got in zip(np.asarray(fx.mantissa).tolist(), y.tolist()):
        assert got == table[_hls4ml_index(m, X_FMT.fraction, 1024, 8.0)]
    # the entries are f(grid) rounded to nearest: within LSB/2
    grid = -8 + np.arange(1024) / 64
    assert np.abs(table * OUT.lsb - _sigmoid(grid)).max() <= OUT.lsb / 2


def test_outside_the_range_gives_the_end_entries():
    fx = qf.from_float(jnp.asarray([-30.0, -8.5, 8.5, 30.0]), X_FMT)
    y = np.asarray(qf.sigmoid(fx, OUT).to_float())
    np.testing.assert_allclose(y, [_sigmoid(-8.0)] * 2 + [_sigmoid(8 - 1 / 64)] * 2, atol=OUT.lsb)


def test_table_configuration_errors():
    fx, _ = _inputs(-1, 1, 5)
    with pytest.raises(ValueError, match="power of two"):
        qf.sigmoid(fx, OUT, table_size=1000)
    with pytest.raises(ValueError, match="power of two"):
        qf.tanh(fx, OUT, table_range=3.0)


def test_hard_variants_relu_and_clip():
    fx, x = _inputs(-6, 6, 2001)
    for slope in (0.2, 0.25, 1 / 6):
        y = np.asarray(qf.hard_sigmoid(fx, OUT, slope=slope).to_float(), np.float64)
        want = np.clip(slope * x + 0.5, 0, 1)
        assert np.abs(y - want).max() <= 2.0**-17 * (np.abs(x) + 1).max() + OUT.lsb
    np.testing.assert_array_equal(np.asarray(qf.hard_tanh(fx, OUT).to_float()), np.clip(x, -1, 1))
    np.testing.assert_array_equal(np.asarray(qf.relu(fx).to_float()), np.maximum(x, 0))
    lo = np.ceil(-0.3 * 1024) / 1024  # bounds rounded inward onto the input grid
    np.testing.assert_array_equal(np.asarray(qf.clip(fx, -0.3, 2.5).to_float()), np.clip(x, lo, 2.5))


def test_hard_sigmoid_without_x64_names_the_product_grid_and_a_coef_bits_that_fits():
    # ap_fixed<16,1> has 15 fraction bits; with coef_bits=16 the product grid has 31 and
    # the bound 1.0 needs 33-bit integers; the error said "formats of at most 31 bits"
    assert not jax.config.jax_enable_x64
    fmt = qf.Format(16, 1, rounding="RND_CONV", overflow="SAT")
    fx = qf.from_float(jnp.linspace(-0.99, 0.99, 201), fmt)
    with pytest.raises(ValueError, match=r"31 fraction bits.*33-bit.*coef_bits=15 or less"):
        qf.hard_sigmoid(fx, OUT)
    y = np.asarray(qf.hard_sigmoid(fx, OUT, coef_bits=15).to_float(), np.float64)
    x = np.asarray(fx.to_float(), np.float64)
    assert np.abs(y - np.clip(0.2 * x + 0.5, 0, 1)).max() <= 2.0**-16 * 2 + OUT.lsb


def test_softmax_against_float_within_the_propagated_table_errors():
    logits = jax.random.normal(jax.random.key(0), (64, 10)) * 3
    fx = qf.from_float(logits, X_FMT)
    x = np.asarray(fx.to_float(), np.float64)
    out_fmt = qf.Format(16, 1, signed=False, rounding="RND_CONV", overflow="SAT")
    y = np.asarray(jax.jit(lambda f: qf.softmax(f, out_fmt).to_float())(fx), np.float64)
    # Reference and error budget (exp table: step 8/1024, entries LSB 2^-15; reciprocal
    # table over [0, 16): step 1/64, entries LSB 2^-14; output LSB 2^-15).
    d = x - x.max(-1, keepdims=True)
    e_true = np.exp(d)
    s_true = e_true.sum(-1, keepdims=True)
    p = e_true / s_true
    eps_e = 8 / 1024 + 2.0**-16  # exp' <= 1 on d <= 0 (and exp(-8) < step for clipped d)
    s_lo = s_true - 10 * eps_e
    step_s = 16 / 1024
    eps_r = step_s / (s_lo * (s_lo - step_s)) + 2.0**-15
    eps_inv = eps_r + 10 * eps_e / (s_lo * s_true)  # |r - 1/S|
    bound = eps_e / (s_lo - step_s) + e_true * eps_inv + out_fmt.lsb
    assert np.all(np.abs(y - p) <= bound)
    assert np.abs(y - p).max() < 0.03
    assert np.abs(y.sum(-1) - 1).max() < 0.05
    assert np.array_equal(y.argmax(-1), p.argmax(-1)) or (np.abs(y - p).max() < 0.01)


def test_softmax_exp_and_reciprocal_tables_within_step_plus_lsb():
    """The two lookups on their own, the index computed from the fixed-point input."""
    fmt = qf.Format(18, 1, signed=False, rounding="RND", overflow="SAT")
    exp_t = qf.Table(np.exp, 1024, -1023 / 128, Fraction(1, 128), fmt)
    d = qf.from_float(jnp.linspace(-7.99, 0, 3001), qf.Format(17, 7, rounding="RND_CONV", overflow="SAT"))
    dv = np.asarray(d.to_float(), np.float64)
    err = np.abs(np.asarray(exp_t(d).to_float(), np.float64) - np.exp(dv))
    assert err.max() <= (1 / 128) * 1.0 + fmt.lsb
    inv_t = qf.Table(lambda v: 1 / v, 1024, 0.0, Fraction(1, 64), fmt)
    s = qf.from_float(jnp.linspace(1, 15.9, 3001), qf.Format(22, 5, signed=False))
    sv = np.asarray(s.to_float(), np.float64)
    err = np.abs(np.asarray(inv_t(s).to_float(), np.float64) - 1 / sv)
    slope = 1 / (sv * (sv - 1 / 64))  # |d(1/s)/ds| over the step to the left
    assert np.all(err <= (1 / 64) * slope + fmt.lsb)
