"""Integer evaluation of real functions (integer-only GELU, exp, rsqrt, ...) and the wide
integer arithmetic under it: exact against Python / NumPy int64 integers, close to the
float64 functions."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given
from hypothesis import strategies as st

from qjax.quant.integer_arith import divide, mul_shift
from qjax.quant.integer_functions import FAIL_BITS, fit_integer_function


def _mul_shift_reference(a: int, b: int, shift: int) -> int:
    p = a * b
    mag = (abs(p) + ((1 << (shift - 1)) if shift else 0)) >> shift
    return mag if p >= 0 else -mag


@given(
    st.lists(
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1), st.integers(0, 62)),
        min_size=1,
        max_size=64,
    )
)
def test_mul_shift_is_exact_wherever_the_result_fits(cases):
    for shift in {c for _, _, c in cases}:
        a, b = (np.array(v, np.int64) for v in zip(*[(x, y) for x, y, c in cases if c == shift]))
        got = np.asarray(mul_shift(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32), shift)).tolist()
        for x, y, g in zip(a.tolist(), b.tolist(), got):
            want = _mul_shift_reference(x, y, shift)
            if -(2**31) < want < 2**31:
                assert g == want, (x, y, shift)


def test_mul_shift_edges_and_bad_shift():
    a = jnp.asarray([0, 1, -1, 2**31 - 1, -(2**31), 46341, -46341, 3, -3], jnp.int32)
    for b, shift in [(1, 0), (-1, 0), (2**31 - 1, 31), (-(2**31), 32), (46341, 1), (3, 1), (-3, 2)]:
        got = np.asarray(mul_shift(a, jnp.int32(b), shift)).tolist()
        for x, g in zip(np.asarray(a).tolist(), got):
            want = _mul_shift_reference(x, b, shift)
            if -(2**31) < want < 2**31:
                assert g == want, (x, b, shift)
    with pytest.raises(ValueError, match="shift"):
        mul_shift(a, a, 63)


@given(st.lists(st.tuples(st.integers(0, 2**24 - 1), st.integers(1, 2**24 - 1)), min_size=1, max_size=32))
def test_divide_is_floor_of_the_fixed_point_quotient(pairs):
    num = np.array([min(n, d) for n, d in pairs], np.int64)
    den = np.array([d for _, d in pairs], np.int64)
    for bits in (0, 7, 24, 30):
        got = np.asarray(divide(jnp.asarray(num, jnp.int32), jnp.asarray(den, jnp.int32), bits)).tolist()
        assert got == [(int(n) << bits) // int(d) for n, d in zip(num, den)]


def test_divide_refuses_bits_out_of_range_and_takes_zero_denominators_as_one():
    assert np.asarray(divide(jnp.int32(0), jnp.int32(0), 8)) == 0
    with pytest.raises(ValueError, match="bits"):
        divide(jnp.int32(1), jnp.int32(2), 31)


_GELU = lambda x: 0.5 * x * sp.erfc(-x / np.sqrt(2))
_CASES = {
    # name: (g, input scale, lo, hi)
    "gelu_loose": (_GELU, 1e-4, -2_000_000, 2_000_000),
    "gelu_tanh": (
        lambda x: 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3))),
        3e-3,
        -30000,
        30000,
    ),
    "exp_nonpositive": (np.exp, 1e-5, -(2**30), 0),
    "tanh": (np.tanh, 1e-3, -(2**20), 2**20),
    "rsqrt_eps": (lambda x: 1 / np.sqrt(np.maximum(x, 0) + 1e-6), 7e-5, -(2**28), 2**28),
    "square": (np.square, 1e-3, -40000, 40000),
    "silu_small": (lambda x: x * sp.expit(x), 0.05, -100, 100),
    "line": (lambda x: 2 * x + 1, 1e-3, -(2**29), 2**29),
    "zero": (lambda x: 0 * x, 1.0, -5, 5),
    "one_code": (np.exp, 0.5, 3, 3),
    "full_int32": (np.tanh, 2**-20, -(2**31) + 1, 2**31 - 1),
    # the last uniform segment holds 27 of its 8192 codes (was fitted as a constant)
    "cut_segment": (lambda v: (v / 64) ** 2, 0.0022648270552345917, -204813, 204813),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_fitted_function_is_exact_in_int64_and_close_to_float64(name):
    g, scale, lo, hi = _CASES[name]
    f = fit_integer_function(g, scale, lo, hi, name=name)
    rng = np.random.default_rng(0)
    q = np.concatenate([rng.integers(lo, hi + 1, 20000), np.arange(-300, 300), [lo, hi, 0]])
    q = np.clip(q, lo, hi)
    got = np.asarray(f(jnp.asarray(q, jnp.int32)))
    np.testing.assert_array_equal(got, f.reference(q))  # jnp int32 == NumPy int64 program
    span = max(np.max(np.abs(g(np.linspace(lo, hi, 4097) * scale))), 1e-300)
    error = np.abs(got * f.out_scale - g(q * scale))
    # the fit's own bound (2^-18 of the range, relative near large values) and a rounding
    assert np.max(error) <= 2.0**-FAIL_BITS * span
    assert np.max(error) <= 2 * f.max_error + 4 * f.out_scale
    assert np.max(np.abs(got)) <= f.bound
    assert f.lo_value <= g(np.float64(lo) * scale) + 1e-12 and f.hi_value >= g(np.float64(hi) * scale) - 1e-12


def test_values_beyond_the_range_saturate_at_its_ends():
    f = fit_integer_function(np.tanh, 1e-2, -500, 500)
    got = np.asarray(f(jnp.asarray([-(2**31), -501, 501, 2**31 - 1], jnp.int32)))
    np.testing.assert_array_equal(got, f.reference([-500, -500, 500, 500]))


def test_a_measured_output_range_keeps_a_pole_out():
    rsqrt = lambda v: 1 / np.sqrt(np.maximum(v, 0) + 1e-12)
    with pytest.raises(ValueError, match="fewer than 14 bits"):
        fit_integer_function(rsqrt, 1e-3, 0, 2**30, name="rsqrt")
    f = fit_integer_function(rsqrt, 1e-3, 0, 2**30, name="rsqrt", out_limit=0.2)  # var >= 25 measured
    assert f.lo >= round(1 / 0.2**2 / 1e-3) - 1000
    q = np.arange(25_000, 2**30, 7919)
    np.testing.assert_allclose(f.reference(q) * f.out_scale, rsqrt(q * 1e-3), rtol=1e-5)


def test_a_measured_range_keeps_the_run_around_zero():
    # |GELU| <= 0.12 on [-6, 6] in two runs (its negative dip splits them): the one at 0
    gelu = lambda v: 0.5 * v * sp.erfc(-v / np.sqrt(2))
    f = fit_integer_function(gelu, 1e-3, -6000, 6000, out_limit=0.12)
    assert -400 < f.lo < -300 and 150 < f.hi < 300  # GELU(x) = -0.12 near -0.32, 0.12 near 0.21
    q = np.arange(-300, 201)
    np.testing.assert_allclose(f.reference(q) * f.out_scale, gelu(q * 1e-3), atol=1e-6)


def test_not_finite_or_discontinuous_functions_raise():
    with pytest.raises(ValueError, match=r"log is not finite at 0"):
        fit_integer_function(np.log, 1e-3, 0, 1000, name="log")
    jump = lambda x: np.sin(x) + (x > 0.3)  # a jump inside a curved stretch
    with pytest.raises(ValueError, match="cannot be evaluated on integers"):
        fit_integer_function(jump, 1e-3, -(2**22), 2**22, name="jump")
