"""hls4ml's non-matmul layers in ``fixed_point(ops=...)``: merges against a rational
reference (exact arithmetic, one cast), table activations against hls4ml's indexing, the
name-stack matching, and the errors."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from qjax import fixed as qf

from . import reference as ref
from .test_activations import _hls4ml_index
from .test_network import L1, RC, _layer, _q

IN = qf.Format(10, 4, **RC)
OUT = qf.Format(9, 3, rounding="TRN", overflow="WRAP")  # truncating, wrapping: every mode shows
TAB = qf.Format(8, 1, **RC)


def _merge_ref(a, b, op):
    """``op`` of ``a``, ``b`` (floats) cast to IN, exactly, then cast to OUT: Fractions."""
    fa, fb = (ref.value(_q(v, IN), IN.fraction) for v in (a, b))
    exact = {"add": fa + fb, "sub": fa - fb, "mul": fa * fb}[op]
    return ref.value(ref.quantize(exact, OUT.width, OUT.integer, OUT.signed, OUT.rounding, OUT.overflow),
                     OUT.fraction)  # fmt: skip


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_merges_are_exact_then_cast_once(op):
    x = jax.random.normal(jax.random.key(0), (3, 7)) * 6  # beyond OUT's range: WRAP shows
    y = jax.random.normal(jax.random.key(1), (3, 7)) * 6
    f = {"add": lambda p, x, y: x + y, "sub": lambda p, x, y: x - y, "mul": lambda p, x, y: x * y}[op]
    got = jax.jit(qf.fixed_point(f, [], ops=[(op, qf.OpFormats(IN, OUT))]))({}, x, y)
    want = [
        [float(_merge_ref(a, b, op)) for a, b in zip(ra, rb)]
        for ra, rb in zip(np.asarray(x, np.float64), np.asarray(y, np.float64))
    ]
    assert np.asarray(got, np.float64).tolist() == want


def test_a_merge_with_a_broadcast_constant():
    x = jax.random.normal(jax.random.key(2), (4, 5)) * 3
    got = qf.fixed_point(lambda p, x: x * 0.3, [], ops=[("mul", qf.OpFormats(IN, OUT))])({}, x)
    want = [[float(_merge_ref(a, 0.3, "mul")) for a in row] for row in np.asarray(x, np.float64)]
    assert np.asarray(got, np.float64).tolist() == want


@pytest.mark.parametrize("prim, fn, rng", [("tanh", jnp.tanh, 4.0), ("logistic", jax.nn.sigmoid, 8.0)])
def test_activations_are_hls4ml_tables(prim, fn, rng):
    x = jnp.linspace(-9, 9, 301).reshape(7, 43)
    got = qf.fixed_point(lambda p, x: fn(x), [], ops=[(prim, qf.OpFormats(IN, TAB, table_size=512))])({}, x)
    np_fn = np.tanh if prim == "tanh" else (lambda v: 1 / (1 + np.exp(-v)))
    table = qf.Table(np_fn, 512, -rng, Fraction(2 * Fraction(rng), 512), TAB).entries
    for v, y in zip(np.asarray(x).ravel().tolist(), np.asarray(got).ravel().tolist()):
        idx = _hls4ml_index(_q(v, IN), IN.fraction, 512, rng)
        assert y == float(ref.value(int(table[idx]), TAB.fraction))


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        return h + nn.Dense(h.shape[-1], use_bias=False, name="fc")(h)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, use_bias=False, name="inp")(x)
        for i in range(2):
            h = Block(name=f"block{i}")(h)
        return jnp.tanh(h)


def test_a_linen_residual_network_matches_the_integer_reference_layer_by_layer():
    m, x = Net(), jax.random.normal(jax.random.key(3), (3, 5))
    v = m.init(jax.random.key(4), x)
    add = qf.OpFormats(L1.output, qf.Format(12, 5, **RC))  # the residual's result_t
    layer = qf.LayerFormats(qf.Format(6, 1, **RC), qf.Format(12, 5, **RC), qf.Format(12, 4, **RC))
    rules = [(r".*/inp/kernel", L1), (r".*/fc/kernel", layer)]
    ops = [(r"Net/block\d/add", add), (r"Net/tanh", qf.OpFormats(qf.Format(12, 5, **RC), TAB))]
    got = jax.jit(qf.fixed_point(m.apply, rules, ops=ops))(v, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    zero = [0.0] * 6
    h = _layer(np.asarray(x, np.float64), p["inp"]["kernel"], L1, zero, qf.Format(4, 2))
    for i in range(2):
        y = _layer(h, p[f"block{i}"]["fc"]["kernel"], layer, zero, qf.Format(4, 2))
        h = [
            [float(_cast(_cast(a, add.input) + b, add.output)) for a, b in zip(ra, rb)]
            for ra, rb in zip(h, y)
        ]
    table = qf.Table(np.tanh, 1024, -4.0, Fraction(1, 128), TAB).entries
    f_in = qf.Format(12, 5, **RC)
    want = [[float(ref.value(int(table[_hls4ml_index(_q(v, f_in), f_in.fraction, 1024, 4.0)]), TAB.fraction))
             for v in row] for row in h]  # fmt: skip
    assert np.asarray(got, np.float64).tolist() == want
    plain = qf.fixed_point(m.apply, rules)(v, x)  # without ops: the adds and tanh stay float
    assert not np.array_equal(np.asarray(plain), np.asarray(got))


def _cast(v, f: qf.Format) -> Fraction:
    return ref.value(_q(v, f), f.fraction)


def test_ops_inside_a_scan_are_seen_and_errors_name_the_op():
    def f(p, x):
        return jax.lax.scan(lambda c, _: (c + x, None), x, None, length=3)[0]

    x = jnp.asarray([[0.3, -1.7, 2.2]])
    got = qf.fixed_point(f, [], ops=[("add", qf.OpFormats(IN, IN))])({}, x)
    want = qf.from_float(x, IN)
    for _ in range(3):
        want = qf.add(want, qf.from_float(x, IN), IN)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.to_float()))
    with pytest.raises(
        ValueError, match=r"ops pattern\(s\) \['.*/sub'\] match no op; the ops seen: \['add'\]"
    ):
        qf.fixed_point(f, [], ops=[(".*/sub", qf.OpFormats(IN, IN))])({}, x)
    with pytest.raises(TypeError, match="must be an OpFormats or None"):
        qf.fixed_point(f, [], ops=[("add", IN)])
    wide = qf.OpFormats(IN, qf.Format(30, 10))
    with pytest.raises(ValueError, match=r"op 'add' \(ops rule 0 'add'\).*30"):
        qf.fixed_point(f, [], ops=[("add", wide)])({}, x)
    kept = qf.fixed_point(f, [], ops=[("add", None)])({}, x)  # None: the op stays float
    np.testing.assert_allclose(np.asarray(kept), 4 * np.asarray(x), rtol=1e-6)
    with pytest.raises(ValueError, match="table_size >= 2"):
        qf.OpFormats(IN, IN, table_size=1)


def test_stochastic_casts_draw_independent_noise_and_nan_stays_visible():
    sto = qf.Format(10, 4, rounding="STOCHASTIC", overflow="SAT")
    x = jnp.full((20000,), 0.3)  # both operands share their fraction: one key would round them alike
    got = qf.fixed_point(
        lambda p, x, y: x + y, [], ops=[("add", qf.OpFormats(sto, IN))], key=jax.random.key(0)
    )({}, x, x)
    lsb, lo = IN.lsb, np.floor(0.3 / IN.lsb) * IN.lsb
    one_up = np.isclose(np.asarray(got), 2 * lo + lsb)  # exactly one operand rounded up
    assert 0.29 < one_up.mean() < 0.35  # 2 p (1 - p) with p = frac(0.3 / lsb) = 0.2: 0.32 (0 with one key)
    bad = jnp.asarray([1.0, jnp.nan, jnp.inf, -2.0])
    out = qf.fixed_point(lambda p, x: x * 2.0, [], ops=[("mul", qf.OpFormats(IN, IN))])({}, bad)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), [False, True, True, False])  # not 0: visible


def test_integer_arithmetic_is_no_layer():
    f = lambda p, x: x + jnp.arange(3) + 1
    with pytest.raises(ValueError, match=r"match no op; the ops seen: \['add'\]"):
        qf.fixed_point(f, [], ops=[("add_int", qf.OpFormats(IN, IN))])({}, jnp.ones(3))
    g = lambda p, i: (i + 1).astype(jnp.float32)  # only an integer add
    with pytest.raises(ValueError, match=r"match no op; the ops seen: \[\]"):
        qf.fixed_point(g, [], ops=[("add", qf.OpFormats(IN, IN))])({}, jnp.arange(3))


def test_fake_fixed_point_trains_through_the_same_ops():
    """``fake_fixed_point(ops=...)``: the forward is ``fixed_point``'s (the same values);
    the gradient is the float op's through straight-through roundings."""
    m, x = Net(), jax.random.normal(jax.random.key(5), (3, 5))
    v = m.init(jax.random.key(6), x)
    layer = qf.LayerFormats(qf.Format(8, 2, **RC), qf.Format(12, 5, **RC), qf.Format(12, 4, **RC))
    rules = [(r".*kernel", layer)]
    ops = [(r"Net/block\d/add", qf.OpFormats(qf.Format(12, 4, **RC), qf.Format(12, 5, **RC))),
           (r"Net/tanh", qf.OpFormats(qf.Format(12, 5, **RC), TAB))]  # fmt: skip
    served = qf.fixed_point(m.apply, rules, ops=ops)(v, x)
    trained = qf.fake_fixed_point(m.apply, rules, ops=ops)(v, x)
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(served))
    g = jax.grad(lambda v: jnp.sum(qf.fake_fixed_point(m.apply, rules, ops=ops)(v, x) ** 2))(v)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))
    assert float(jnp.abs(g["params"]["inp"]["kernel"]).max()) > 0
    # a merge alone: d(x + y)/dx is 1 inside the formats' ranges, 0 where the output saturates
    f = lambda p, x, y: x + y
    fmts = qf.OpFormats(qf.Format(8, 3, **RC), qf.Format(8, 3, **RC))
    dx = jax.grad(lambda x: jnp.sum(qf.fake_fixed_point(f, [], ops=[("add", fmts)])({}, x, jnp.ones(3))))(
        jnp.asarray([0.5, 1.0, 3.5])
    )
    np.testing.assert_array_equal(np.asarray(dx), [1.0, 1.0, 0.0])  # 3.5 + 1 saturates at 3.98
    with pytest.raises(ValueError, match="fake_fixed_point: ops pattern"):
        qf.fake_fixed_point(f, [], ops=[("sub", fmts)])({}, jnp.ones(3), jnp.ones(3))
