"""Casts and ``from_float`` against the Python-integer reference, hypothesis properties,
and the semantics of SAT_ZERO, SAT_SYM, TRN_ZERO and stochastic rounding."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax import fixed as qf

from . import reference as ref

ROUND = qf.DETERMINISTIC_ROUNDING
OVER = qf.OVERFLOW_MODES
N = 40  # mantissas per example (fixed length: eager ops stay cached)


@st.composite
def formats(draw, max_width=31, spread=40):
    w = draw(st.integers(1, max_width))
    i = draw(st.integers(max(w - spread, w - 126), min(w + spread, 126)))
    return w, i, draw(st.booleans())


def _range(w, signed):
    return (-(2 ** (w - 1)), 2 ** (w - 1) - 1) if signed else (0, 2**w - 1)


@st.composite
def mantissas(draw, fmt):
    w, _, signed = fmt
    lo, hi = _range(w, signed)
    body = draw(st.lists(st.integers(lo, hi), min_size=N - 4, max_size=N - 4))
    return [lo, hi, 0 if lo <= 0 <= hi else lo, hi - 1 if hi > lo else hi, *body]


@st.composite
def cast_cases(draw, max_width=31, spread=40):
    src = draw(formats(max_width, spread))
    dst = draw(formats(max_width, spread))
    return src, dst, draw(mantissas(src))


def _fx(ms, fmt, dtype=jnp.int32):
    w, i, signed = fmt
    return qf.FixedArray(jnp.asarray(np.asarray(ms, np.int64), dtype), qf.Format(w, i, signed))


@given(cast_cases())
@settings(max_examples=examples(40))
def test_cast_matches_reference_in_every_mode(case):
    src, (w, i, signed), ms = case
    fx = _fx(ms, src)
    sf = src[0] - src[1]
    for r in ROUND:
        for o in OVER:
            got = np.asarray(qf.cast(fx, qf.Format(w, i, signed, r, o)).mantissa).tolist()
            want = [ref.cast(m, sf, w, i, signed, r, o) for m in ms]
            assert got == want, (src, (w, i, signed), r, o)


@given(cast_cases(max_width=63, spread=90))
@settings(max_examples=examples(15))
def test_cast_matches_reference_with_int64(case):
    src, (w, i, signed), ms = case
    sf = src[0] - src[1]
    with jax.enable_x64(True):
        fx = _fx(ms, src, jnp.int64)
        for r in ("TRN_ZERO", "RND_CONV", "RND_MIN_INF"):
            for o in OVER:
                got = np.asarray(qf.cast(fx, qf.Format(w, i, signed, r, o)).mantissa).tolist()
                assert got == [ref.cast(m, sf, w, i, signed, r, o) for m in ms], (src, (w, i, signed), r, o)


# Subnormal float32 inputs are flushed to zero by XLA on CPU: the reference sees zeros too.
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False).map(
    lambda v: 0.0 if abs(v) < 2**-126 else v
)


@given(formats(spread=30), st.data())
@settings(max_examples=examples(30))
def test_from_float_matches_reference(fmt, data):
    w, i, signed = fmt
    f = w - i
    # Half arbitrary floats, half values near the format's grid (ties, overflow edges).
    near = st.integers(-(2 ** (w + 3)), 2 ** (w + 3)).map(lambda k: float(np.float32(k * 2.0 ** -(f + 2))))
    near = near.map(lambda v: 0.0 if abs(v) < 2**-126 else v)
    xs = data.draw(st.lists(finite32, min_size=N // 2, max_size=N // 2))
    xs += data.draw(st.lists(near, min_size=N // 2, max_size=N // 2))
    x = jnp.asarray(xs, jnp.float32)
    for r in ROUND:
        for o in OVER:
            got = np.asarray(qf.from_float(x, qf.Format(w, i, signed, r, o)).mantissa).tolist()
            want = [ref.quantize(Fraction(float(v)), w, i, signed, r, o) for v in np.asarray(x)]
            assert got == want, (fmt, r, o)


def test_from_float_ties_and_small_values():
    x = jnp.asarray([2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1e-30, -1e-30, 0.0], jnp.float32)
    expect = {
        "TRN": [2, -3, 3, -4, 0, -1, 0, -1, 0],
        "TRN_ZERO": [2, -2, 3, -3, 0, 0, 0, 0, 0],
        "RND": [3, -2, 4, -3, 1, 0, 0, 0, 0],
        "RND_ZERO": [2, -2, 3, -3, 0, 0, 0, 0, 0],
        "RND_INF": [3, -3, 4, -4, 1, -1, 0, 0, 0],
        "RND_MIN_INF": [2, -3, 3, -4, 0, -1, 0, 0, 0],
        "RND_CONV": [2, -2, 4, -4, 0, 0, 0, 0, 0],
    }
    for r, want in expect.items():
        assert qf.from_float(x, qf.Format(8, 8, rounding=r, overflow="SAT")).mantissa.tolist() == want, r


def test_non_finite_inputs():
    x = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 1e30, -1e30], jnp.float32)
    get = lambda o: qf.from_float(x, qf.Format(8, 4, overflow=o)).mantissa.tolist()
    assert get("SAT") == [0, 127, -128, 127, -128]
    assert get("SAT_SYM") == [0, 127, -127, 127, -127]
    assert get("SAT_ZERO") == [0, 0, 0, 0, 0]
    assert get("WRAP")[:3] == [0, 0, 0]


# -- SAT_ZERO / SAT_SYM / TRN_ZERO semantics, by hand --------------------------------


def test_sat_zero_sat_sym_trn_zero_by_hand():
    src = qf.Format(10, 6)  # 4 fraction bits, range [-32, 32)
    vals = [-32.0, -31.9375, -8.5, -8.0625, -0.0625, 0.0625, 7.9375, 8.0, 31.9375]
    fx = qf.from_float(jnp.asarray(vals), src)
    dst = lambda r, o: qf.cast(fx, qf.Format(5, 4, rounding=r, overflow=o)).to_float().tolist()
    # ap_fixed<5,4>: step 0.5, range [-8, 7.5]
    assert dst("TRN_ZERO", "SAT") == [-8.0, -8.0, -8.0, -8.0, 0.0, 0.0, 7.5, 7.5, 7.5]
    assert dst("TRN_ZERO", "SAT_ZERO") == [0.0, 0.0, 0.0, -8.0, 0.0, 0.0, 7.5, 0.0, 0.0]
    assert dst("TRN_ZERO", "SAT_SYM") == [-7.5, -7.5, -7.5, -7.5, 0.0, 0.0, 7.5, 7.5, 7.5]
    assert dst("TRN", "SAT_ZERO") == [0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 7.5, 0.0, 0.0]
    assert dst("RND", "SAT_SYM") == [-7.5, -7.5, -7.5, -7.5, 0.0, 0.0, 7.5, 7.5, 7.5]
    # SAT_SYM never yields the most negative code, even for an in-range -8.0
    assert qf.cast(
        qf.from_float(jnp.asarray([-8.0]), src), qf.Format(5, 4, overflow="SAT_SYM")
    ).mantissa.tolist() == [-15]


# -- properties ------------------------------------------------------------------------


@given(cast_cases(spread=20))
def test_recast_is_idempotent(case):
    src, (w, i, signed), ms = case
    fx = _fx(ms, src)
    for r in ROUND:
        for o in OVER:
            f = qf.Format(w, i, signed, r, o)
            once = qf.cast(fx, f)
            np.testing.assert_array_equal(qf.cast(once, f).mantissa, once.mantissa)


@given(cast_cases(spread=20))
def test_rounding_is_monotone_and_sat_stays_in_range(case):
    src, (w, i, signed), ms = case
    fx = _fx(sorted(ms), src)
    for r in ROUND:
        for o in ("SAT", "SAT_SYM"):
            f = qf.Format(w, i, signed, r, o)
            out = np.asarray(qf.cast(fx, f).mantissa)
            assert np.all(np.diff(out) >= 0), (r, o)
            lo = -f.max_mantissa if (o == "SAT_SYM" and signed) else f.min_mantissa
            assert out.min() >= lo and out.max() <= f.max_mantissa


@given(cast_cases(spread=20))
@settings(max_examples=examples(30))
def test_symmetric_modes_commute_with_negation(case):
    (sw, si, _), (w, i, _), ms = case
    ms = [m for m in ms if m > -(2 ** (sw - 1))]  # -m must be in the source range
    pos, negs = _fx(ms, (sw, si, True)), _fx([-m for m in ms], (sw, si, True))
    for r in ("RND_CONV", "RND_ZERO", "RND_INF", "TRN_ZERO"):
        f = qf.Format(w, i, True, r, "SAT_SYM")
        np.testing.assert_array_equal(qf.cast(negs, f).mantissa, -qf.cast(pos, f).mantissa, err_msg=r)


# -- stochastic rounding ----------------------------------------------------------------


@given(cast_cases(spread=40), st.integers(0, 2**31 - 1))
@settings(max_examples=examples(30))
def test_stochastic_gives_a_neighbour_of_the_exact_value(case, seed):
    src, (w, i, signed), ms = case
    fx = _fx(ms, src)
    sf = src[0] - src[1]
    out = qf.cast(fx, qf.Format(w, i, signed, "STOCHASTIC", "SAT"), key=jax.random.key(seed))
    for m, got in zip(ms, np.asarray(out.mantissa).tolist()):
        down = ref.cast(m, sf, w, i, signed, "TRN", "SAT")
        up = ref.overflow(
            ref.round_units(ref.value(m, sf) * Fraction(2) ** (w - i), "TRN") + 1, w, signed, "SAT"
        )
        exact = ref.value(m, sf) * Fraction(2) ** (w - i)
        if exact.denominator == 1 and down == exact:
            assert got == down
        else:
            assert got in (down, up)


@pytest.mark.parametrize(
    "m,d",
    [(3, 2), (-3, 2), (2**30, 32), (2**30, 33), (-(2**30), 33), (2**30 + 12345, 40), (-(2**29), 41)],
)
def test_stochastic_round_up_probability_is_exact(m, d):
    """P(round up) = (m mod 2^d) / 2^d, also for shifts wider than the int32 dtype."""
    n = 200_000
    src = qf.Format(31, 31 - d)  # d fraction bits
    dst = qf.Format(31, 31, rounding="STOCHASTIC", overflow="SAT")
    fx = qf.FixedArray(jnp.full((n,), m, jnp.int32), src)
    out = np.asarray(qf.cast(fx, dst, key=jax.random.key(d * 7 + (m > 0))).mantissa, np.int64)
    floor = m >> d
    assert set(np.unique(out).tolist()) <= {floor, floor + 1}
    p = (m % 2**d) / 2**d
    sigma = max(np.sqrt(p * (1 - p) / n), 1 / n)
    assert abs((out == floor + 1).mean() - p) < 5 * sigma, (m, d, p)


def test_stochastic_is_unbiased_and_keyed():
    x = jnp.full((20_000,), 0.3, jnp.float32)
    f = qf.Format(8, 1, rounding="STOCHASTIC", overflow="SAT")  # step 1/128
    a = qf.from_float(x, f, key=jax.random.key(0))
    assert abs(float(a.to_float().mean()) - 0.3) < 5 * (1 / 128) * 0.5 / np.sqrt(20_000)
    b = qf.from_float(x, f, key=jax.random.key(0))
    c = qf.from_float(x, f, key=jax.random.key(1))
    np.testing.assert_array_equal(a.mantissa, b.mantissa)
    assert not np.array_equal(a.mantissa, c.mantissa)
    y = qf.cast(qf.from_float(x, qf.Format(16, 1)), f, key=jax.random.key(2))
    exact = float(qf.from_float(jnp.asarray(0.3), qf.Format(16, 1)).to_float())
    assert abs(float(y.to_float().mean()) - exact) < 5 * (1 / 128) * 0.5 / np.sqrt(20_000)


def test_stochastic_without_key_is_an_error():
    f = qf.Format(8, 1, rounding="STOCHASTIC")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        qf.from_float(jnp.ones(2) * 0.3, f)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        qf.cast(qf.from_float(jnp.ones(2) * 0.3, qf.Format(16, 1)), f)


def test_cast_under_jit_and_vmap_matches_eager():
    fx = qf.from_float(jax.random.normal(jax.random.key(0), (4, 33)) * 10, qf.Format(20, 8))
    f = qf.Format(9, 5, rounding="RND_CONV", overflow="SAT_SYM")
    eager = qf.cast(fx, f).mantissa
    np.testing.assert_array_equal(jax.jit(lambda a: qf.cast(a, f))(fx).mantissa, eager)
    np.testing.assert_array_equal(jax.vmap(lambda a: qf.cast(a, f))(fx).mantissa, eager)


def test_cast_type_errors():
    with pytest.raises(TypeError, match="use from_float"):
        qf.cast(jnp.ones(3), qf.Format(8, 2))
    with pytest.raises(TypeError, match="Format"):
        qf.cast(qf.from_float(jnp.ones(3), qf.Format(8, 2)), "ap_fixed<8,2>")


def test_wrap_of_huge_values_does_not_overflow_the_reduction():
    """Found by hypothesis: ``x / 2^I`` overflowed float32 for I < 0; fmod cannot."""
    x = jnp.asarray([-1.0633823966279327e37, 3.3e38, -2.5e-3], jnp.float32)
    for signed in (False, True):
        got = qf.from_float(x, qf.Format(17, -5, signed=signed)).mantissa.tolist()
        want = [ref.quantize(Fraction(float(v)), 17, -5, signed, "TRN", "WRAP") for v in np.asarray(x)]
        assert got == want
