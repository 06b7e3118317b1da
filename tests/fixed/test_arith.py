"""Arithmetic against exact rationals; accumulator width derivation and checks; integer
matmul and convolution against integer references."""

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

RNG = np.random.default_rng(0)


@st.composite
def operand(draw, max_width=12):
    w = draw(st.integers(2, max_width))
    i = draw(st.integers(w - 10, w + 6))
    signed = draw(st.booleans())
    lo, hi = (-(2 ** (w - 1)), 2 ** (w - 1) - 1) if signed else (0, 2**w - 1)
    ms = draw(st.lists(st.integers(lo, hi), min_size=16, max_size=16))
    return qf.Format(w, i, signed), ms


def _fx(fmt, ms):
    return qf.FixedArray(jnp.asarray(ms, jnp.int32), fmt)


def _values(fx):
    return [ref.value(int(m), fx.format.fraction) for m in np.asarray(fx.mantissa).tolist()]


OPS = {
    "add": (qf.add, lambda a, b: a + b),
    "sub": (qf.sub, lambda a, b: a - b),
    "mul": (qf.mul, lambda a, b: a * b),
}


@given(operand(), operand(), st.sampled_from(sorted(OPS)))
def test_exact_results(a, b, op):
    (fa, ma), (fb, mb) = a, b
    fn, exact = OPS[op]
    out = fn(_fx(fa, ma), _fx(fb, mb))
    want = [exact(ref.value(x, fa.fraction), ref.value(y, fb.fraction)) for x, y in zip(ma, mb)]
    assert _values(out) == want
    exact_format = {"add": qf.exact_add_format, "sub": qf.exact_sub_format, "mul": qf.exact_mul_format}[op]
    assert out.format == exact_format(fa, fb)
    m = np.asarray(out.mantissa)  # the result is a valid value of its own format
    assert np.all(m >= out.format.min_mantissa) and np.all(m <= out.format.max_mantissa)
    assert np.array_equal(np.asarray(qf.cast(out, out.format).mantissa), m)


@given(operand())
def test_neg_is_exact_and_signed(a):
    fa, ma = a
    out = qf.neg(_fx(fa, ma))
    assert out.format.signed
    assert _values(out) == [-ref.value(x, fa.fraction) for x in ma]
    m = np.asarray(out.mantissa)
    assert np.all(m >= out.format.min_mantissa) and np.all(m <= out.format.max_mantissa)


def test_difference_of_unsigned_values_is_signed():
    """``ap_ufixed - ap_ufixed`` is an ``ap_fixed`` one integer bit wider (ap_fixed's
    ``minus`` type): 1 - 3 is -2, not a negative mantissa in an unsigned format."""
    u = qf.Format(8, 4, signed=False)
    d = qf.sub(
        qf.from_float(jnp.asarray([1.0, 15.9375, 0.0]), u), qf.from_float(jnp.asarray([3.0, 0.0, 15.9375]), u)
    )
    assert d.format == qf.Format(9, 5, signed=True)
    np.testing.assert_array_equal(qf.to_float(d), [-2.0, 15.9375, -15.9375])
    np.testing.assert_array_equal(qf.to_float(qf.cast(d, d.format)), [-2.0, 15.9375, -15.9375])
    assert qf.exact_add_format(u, u) == qf.Format(9, 5, signed=False)


@given(operand(15), operand(15), st.sampled_from(sorted(OPS)), st.integers(1, 20), st.integers(-4, 10))
@settings(max_examples=examples(40))
def test_results_cast_to_a_target(a, b, op, w, i):
    (fa, ma), (fb, mb) = a, b
    fn, exact = OPS[op]
    for r in ("TRN", "RND_CONV", "RND_ZERO"):
        for o in ("WRAP", "SAT", "SAT_SYM"):
            out = fn(_fx(fa, ma), _fx(fb, mb), qf.Format(w, i, True, r, o))
            want = [
                ref.quantize(exact(ref.value(x, fa.fraction), ref.value(y, fb.fraction)), w, i, True, r, o)
                for x, y in zip(ma, mb)
            ]
            assert np.asarray(out.mantissa).tolist() == want, (op, r, o)


def test_wide_products_need_a_target_or_x64():
    a = qf.from_float(jnp.asarray([-128.0, 127.99]), qf.Format(16, 8))
    with pytest.raises(ValueError, match=r"exact result ap_fixed<32,16.*pass fmt="):
        qf.mul(a, a)
    out = qf.mul(a, a, qf.Format(24, 16, rounding="RND_CONV", overflow="SAT"))  # int32 suffices
    want = [ref.quantize(Fraction(m, 256) ** 2, 24, 16, True, "RND_CONV", "SAT") for m in (-32768, 32765)]
    assert np.asarray(out.mantissa).tolist() == want
    with jax.enable_x64(True):
        assert qf.mul(a, a).format == qf.Format(32, 16)


def test_neg_is_exact_including_the_most_negative_value():
    a = qf.FixedArray(jnp.asarray([-128, 127, 0], jnp.int32), qf.Format(8, 3))
    n = qf.neg(a)
    assert _values(n) == [Fraction(4), Fraction(-127, 32), Fraction(0)]


@pytest.mark.parametrize("bits", [8, 16, 24])
def test_requantize_is_integer_multiply_and_shift(bits):
    x = qf.FixedArray(jnp.asarray(RNG.integers(-(2**15), 2**15, 64), jnp.int32), qf.Format(16, 4))
    scale = np.float32(0.0137)
    mult, shift = qf.quantize_multiplier(scale, bits)
    assert 2 ** (bits - 1) <= int(mult) < 2**bits
    assert abs(float(mult) * 2.0**-shift / float(scale) - 1) <= 2.0**-bits
    fmt = qf.Format(10, 2, rounding="RND_CONV", overflow="SAT")
    out = qf.requantize(x, scale, fmt, bits=bits) if bits < 24 else None
    if out is None:  # 16 + 24 bits exceed int32: a clear error without x64
        with pytest.raises(ValueError, match="jax_enable_x64"):
            qf.requantize(x, scale, fmt, bits=bits)
        return
    want = [
        ref.quantize(Fraction(m) * int(mult) * Fraction(2) ** -(12 + shift), 10, 2, True, "RND_CONV", "SAT")
        for m in np.asarray(x.mantissa).tolist()
    ]
    assert np.asarray(out.mantissa).tolist() == want


def test_requantize_per_channel_scales():
    x = qf.FixedArray(jnp.asarray(RNG.integers(-128, 128, (5, 3)), jnp.int32), qf.Format(8, 8))
    scales = np.array([0.5, 0.01, 0.12], np.float32)
    out = qf.requantize(x, scales, qf.Format(12, 6, rounding="RND", overflow="SAT"))
    mult, shift = qf.quantize_multiplier(scales)
    want = [
        [
            ref.quantize(Fraction(int(m)) * int(mult[j]) / 2 ** int(shift[j]), 12, 6, True, "RND", "SAT")
            for j, m in enumerate(row)
        ]
        for row in np.asarray(x.mantissa)
    ]
    assert np.asarray(out.mantissa).tolist() == want
    with pytest.raises(ValueError, match="positive and finite"):
        qf.quantize_multiplier([0.5, -1.0])


def _dyadic_ref(scale: float, bits: int) -> tuple[int, int]:
    """``(M, shift)``: ``2^(bits-1) <= M < 2^bits`` nearest (ties up) to ``scale · 2^shift``,
    found by exact search in Fractions."""
    v, shift = Fraction(scale), 0
    while v * Fraction(2) ** shift >= 2**bits:
        shift -= 1
    while v * Fraction(2) ** shift < 2 ** (bits - 1):
        shift += 1
    exact = v * Fraction(2) ** shift
    m = int(exact) + (1 if exact - int(exact) >= Fraction(1, 2) else 0)
    return (m // 2, shift - 1) if m == 2**bits else (m, shift)


def _dyadic_value(scale: float, bits: int) -> Fraction:
    m, shift = _dyadic_ref(scale, bits)
    return Fraction(m) / Fraction(2) ** shift


def _requant_ref(row, scales, bits, fmt, frac_x=0):
    """Exact reference of one row of per-channel requantization."""
    exact = [Fraction(int(m), 2**frac_x) * _dyadic_value(s, bits) for m, s in zip(row, scales)]
    return [ref.quantize(v, fmt.width, fmt.integer, True, fmt.rounding, fmt.overflow) for v in exact]


@st.composite
def decades_of_scales(draw):
    """1 to 8 per-channel scales, mantissa in [1, 10), exponents spread over 60 decades."""
    n = draw(st.integers(1, 8))
    return [draw(st.floats(1.0, 9.999)) * 10.0 ** draw(st.integers(-30, 30)) for _ in range(n)]


@settings(max_examples=examples(60), deadline=None)
@given(decades_of_scales(), st.integers(1, 31))
def test_quantize_multiplier_bound_holds_in_every_channel(scales, bits):
    mult, shift = qf.quantize_multiplier(np.array(scales), bits)
    assert mult.shape == shift.shape == (len(scales),)
    for c, s in enumerate(scales):
        m, sh = int(mult[c]), int(shift[c])
        assert (m, sh) == _dyadic_ref(s, bits), c
        rel = abs(Fraction(m) / Fraction(2) ** sh - Fraction(s)) / Fraction(s)
        assert rel <= Fraction(1, 2**bits), (c, float(rel))


def test_quantize_multiplier_scalar_scale_keeps_a_scalar_shift():
    mult, shift = qf.quantize_multiplier(0.75, 8)
    assert isinstance(shift, int) and mult.shape == () and (int(mult), shift) == (192, 8)
    # rounding up to 2^bits renormalises to one bit less shift (exact), not 2^bits - 1
    mult, shift = qf.quantize_multiplier(1.0 - 2.0**-20, 8)
    assert (int(mult), shift) == (128, 7)
    mult, shift = qf.quantize_multiplier(3.0 * 2.0**40, 4)  # shift < 0: a left shift
    assert (int(mult), shift) == (12, -38)


def test_requantize_scales_spanning_decades_keep_every_channel():
    """The old shared shift gave multipliers [58982, 81, 0]: 0.24% error and an all-zero channel."""
    scales = np.array([0.9, 0.9e-3 * 1.37, 0.9e-6 * 1.37])
    mult, shift = qf.quantize_multiplier(scales, 16)
    assert mult.tolist() == [_dyadic_ref(s, 16)[0] for s in scales] and shift.tolist() == [16, 25, 35]
    with jax.enable_x64(True):
        acc = qf.FixedArray(jnp.full((2, 3), 2**20, jnp.int64), qf.Format(32, 32))
        out = qf.requantize(acc, scales, qf.Format(24, 24, rounding="RND_CONV", overflow="SAT"))
    got = np.asarray(out.mantissa)[0].tolist()
    assert got == [943712, 1293, 1]
    for g, s in zip(got, scales):  # within the final rounding plus 2^-16 relative of the exact product
        exact = Fraction(2**20) * Fraction(s)
        assert abs(g - exact) <= Fraction(1, 2) + exact / 2**16


@settings(max_examples=examples(6), deadline=None)
@given(
    decades_of_scales(),
    st.sampled_from(["TRN", "RND", "RND_CONV", "RND_ZERO"]),
    st.sampled_from(["SAT", "WRAP"]),
    st.integers(0, 2**31 - 1),
)
def test_requantize_per_channel_matches_exact_reference(scales, rounding, overflow, seed):
    scales = np.array(scales) / 10.0**27  # e-57 .. e3: results from 0 to saturated
    xs = np.random.default_rng(seed).integers(-(2**11), 2**11, (3, len(scales)))
    x = qf.FixedArray(jnp.asarray(xs, jnp.int32), qf.Format(12, 8))
    fmt = qf.Format(10, 6, rounding=rounding, overflow=overflow)
    out = np.asarray(qf.requantize(x, scales, fmt, bits=12).mantissa)
    assert out.tolist() == [_requant_ref(row, scales, 12, fmt, frac_x=4) for row in xs.tolist()]


def test_requantize_extreme_scales_are_exact_and_never_zero_multipliers():
    scales = np.array([1e-300, 3.0, 1e300, 2.0**-1074])
    mult, _ = qf.quantize_multiplier(scales, 16)
    assert (mult >= 2**15).all()
    x = qf.FixedArray(jnp.asarray([[-5, 7, -3, 1]], jnp.int32), qf.Format(8, 8))
    fmt = qf.Format(8, 4, rounding="RND_INF", overflow="SAT")
    out = np.asarray(qf.requantize(x, scales, fmt).mantissa)[0].tolist()
    assert out == _requant_ref([-5, 7, -3, 1], scales, 16, fmt) == [0, 127, -128, 0]


def test_requantize_stochastic_per_channel_picks_a_neighbour():
    scales = np.array([0.3, 2.5e-4, 7.0])
    x = qf.FixedArray(jnp.asarray(RNG.integers(-(2**15), 2**15, (64, 3)), jnp.int32), qf.Format(16, 16))
    fmt = qf.Format(24, 24, rounding="STOCHASTIC", overflow="SAT")
    out = np.asarray(qf.requantize(x, scales, fmt, key=jax.random.key(0)).mantissa)
    for row, orow in zip(np.asarray(x.mantissa).tolist(), out.tolist()):
        for m, s, o in zip(row, scales, orow):
            v = m * _dyadic_value(s, 16)
            assert o in (int(np.floor(v)), -int(np.floor(-v))), (m, s, o)


def test_requantize_bad_scales_name_the_element():
    with pytest.raises(ValueError, match=r"scale\[1\] = 0\.0"):
        qf.quantize_multiplier([0.5, np.float32(1e-46)])  # float32 underflow is not silently M = 0
    with pytest.raises(ValueError, match=r"scale\[1, 0\] = nan"):
        qf.quantize_multiplier(np.array([[0.5, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match=r"scale = -1\.0"):
        qf.quantize_multiplier(-1.0)
    with pytest.raises(ValueError, match="empty"):
        qf.quantize_multiplier([])


def test_requantize_too_wide_products_name_bits_not_the_format():
    x = qf.FixedArray(jnp.asarray([[1000, -1000]], jnp.int32), qf.Format(24, 24))
    scales, fmt = np.array([0.05, 2e-5]), qf.Format(16, 16, rounding="RND_CONV", overflow="SAT")
    msg = r"24-bit mantissas.*16-bit multipliers need 40-bit.*jax_enable_x64.*bits <= 8"
    with pytest.raises(ValueError, match=msg):
        qf.requantize(x, scales, fmt)
    out = qf.requantize(x, scales, fmt, bits=8)  # int32 products, x64 off
    assert np.asarray(out.mantissa)[0].tolist() == _requant_ref([1000, -1000], scales, 8, fmt)
    with jax.enable_x64(True):
        out = qf.requantize(x, scales, fmt)
        assert out.mantissa.dtype == jnp.int32  # the 16-bit result; the product was int64
        assert np.asarray(out.mantissa)[0].tolist() == _requant_ref([1000, -1000], scales, 16, fmt) == [50, 0]
        msg = r"63-bit mantissas.*need 93-bit.*more than the 64 bits.*bits <= 1 "
        with pytest.raises(ValueError, match=msg):
            qf.requantize(qf.FixedArray(jnp.asarray([1], jnp.int64), qf.Format(63, 63)), 0.5, fmt, bits=31)


# -- accumulators ----------------------------------------------------------------------


def test_accumulator_width_is_derived():
    a, w = qf.Format(8, 3), qf.Format(6, 1)
    assert qf.accumulator_format(a, w, 1) == qf.Format(14, 4, overflow="SAT")
    acc = qf.accumulator_format(a, w, 64)
    assert (acc.width, acc.integer, acc.fraction) == (20, 10, 10)
    assert qf.accumulator_format(a, w, 65).width == 21


def test_accumulator_width_errors():
    a = qf.Format(16, 4)
    with pytest.raises(
        ValueError, match=r"W_a \+ W_w \+ ceil\(log2 K\) = 16 \+ 16 \+ 7 = 39 bits.*jax_enable_x64"
    ):
        qf.accumulator_format(a, a, 100)
    with jax.enable_x64(True):
        assert qf.accumulator_format(a, a, 100).width == 39
        with pytest.raises(ValueError, match=r"= 64 bits .* more than the 63"):
            qf.accumulator_format(qf.Format(31, 4), qf.Format(31, 4), 4)
    with pytest.raises(ValueError, match="at least 1"):
        qf.accumulator_format(a, a, 0)


def test_matmul_accumulates_exactly_and_casts():
    a = qf.FixedArray(jnp.asarray(RNG.integers(-128, 128, (7, 50)), jnp.int32), qf.Format(8, 2))
    w = qf.FixedArray(jnp.asarray(RNG.integers(-32, 32, (50, 9)), jnp.int32), qf.Format(6, 1))
    acc = qf.matmul(a, w)
    want = np.asarray(a.mantissa, np.int64) @ np.asarray(w.mantissa, np.int64)
    np.testing.assert_array_equal(np.asarray(acc.mantissa), want)
    assert acc.format.width == 8 + 6 + 6 and acc.format.fraction == 6 + 5
    out = qf.matmul(a, w, qf.Format(10, 4, rounding="RND_CONV", overflow="SAT"))
    cast = [[ref.cast(int(m), 11, 10, 4, True, "RND_CONV", "SAT") for m in row] for row in want]
    assert np.asarray(out.mantissa).tolist() == cast


def test_worst_case_accumulation_does_not_overflow():
    for k in (1, 2, 3, 64, 100):
        a = qf.FixedArray(jnp.full((1, k), -128, jnp.int32), qf.Format(8, 8))
        w = qf.FixedArray(jnp.full((k, 1), -128, jnp.int32), qf.Format(8, 8))
        assert int(qf.matmul(a, w).mantissa[0, 0]) == k * 128 * 128


def _conv_ref(x, w, pad):
    """NHWC x HWIO, stride 1, in Python integers (numpy int64)."""
    kh, kw = w.shape[:2]
    if pad == "SAME":
        x = np.pad(x, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
    n, h, ww, _ = x.shape
    out = np.zeros((n, h - kh + 1, ww - kw + 1, w.shape[3]), np.int64)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.einsum("nhwc,hwco->no", x[:, i : i + kh, j : j + kw], w)
    return out


@pytest.mark.parametrize("pad", ["SAME", "VALID"])
def test_conv_accumulates_exactly(pad):
    x = RNG.integers(0, 256, (2, 6, 6, 3))
    w = RNG.integers(-128, 128, (3, 3, 3, 4))
    fx = qf.FixedArray(jnp.asarray(x, jnp.int32), qf.Format(8, 1, signed=False))
    fw = qf.FixedArray(jnp.asarray(w, jnp.int32), qf.Format(8, 0))
    acc = qf.conv_general_dilated(fx, fw, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(np.asarray(acc.mantissa), _conv_ref(x, w, pad))
    assert acc.format.width == 8 + 8 + 5  # K = 27


def test_float_round_trip_and_type_errors():
    x = jnp.asarray([0.1, -2.7, 3.0])
    fx = qf.from_float(x, qf.Format(12, 4, rounding="RND_CONV", overflow="SAT"))
    assert np.all(np.abs(np.asarray(fx.to_float()) - np.asarray(x)) <= 2.0**-9)
    with pytest.raises(TypeError, match="FixedArray"):
        qf.add(x, fx)
    with pytest.raises(TypeError, match="FixedArray"):
        qf.matmul(fx.reshape(1, 3), x)


def _t(f: qf.Format):
    return (f.width, f.integer, f.signed, f.rounding, f.overflow)


DENSE_X, DENSE_W, DENSE_B = qf.Format(8, 3), qf.Format(8, 2), qf.Format(10, 3)
DENSE_OUT = qf.Format(8, 3, rounding="RND", overflow="SAT")


@pytest.mark.parametrize(
    "accum",
    [
        qf.Format(24, 10),  # wide: provably exact (the exact contraction is used)
        qf.Format(12, 5, rounding="TRN", overflow="WRAP"),  # drops product bits, wraps
        qf.Format(10, 4, rounding="TRN", overflow="SAT"),  # narrow: partial sums saturate
        qf.Format(10, 4, rounding="RND", overflow="WRAP"),
        qf.Format(9, 3, rounding="RND", overflow="SAT"),
        qf.Format(16, 4, rounding="TRN", overflow="SAT_SYM"),  # every fraction bit, saturates
    ],
)
def test_dense_with_an_accumulator_format_matches_hls4ml_dense_latency(accum):
    xm = RNG.integers(-128, 128, (16, 6))
    wm = RNG.integers(-128, 128, (6, 4))
    bm = RNG.integers(-512, 512, (4,))
    fx = qf.FixedArray(jnp.asarray(xm, jnp.int32), DENSE_X)
    fw = qf.FixedArray(jnp.asarray(wm, jnp.int32), DENSE_W)
    fb = qf.FixedArray(jnp.asarray(bm, jnp.int32), DENSE_B)
    dn = (((1,), (0,)), ((), ()))
    got = jax.jit(lambda x, w, b: qf.dot_general(x, w, dn, DENSE_OUT, accum=accum, init=b))(fx, fw, fb)
    want = [
        ref.dense_latency(row.tolist(), wm.tolist(), bm.tolist(), 5, 6, 7, _t(accum), _t(DENSE_OUT))
        for row in xm
    ]
    assert np.asarray(got.mantissa).tolist() == want
    exact = [[ref.cast(int(a) + int(b) * 16, 11, *_t(DENSE_OUT)) for a, b in zip(row @ wm, bm)] for row in xm]
    assert (want == exact) == (accum.width == 24)  # the narrow accumulators do change results


def test_accumulator_order_and_no_bias():
    """Two contracting dims are accumulated row-major (the order matters under SAT);
    without ``init`` the accumulator starts at 0; ``fmt=None`` returns the accumulator."""
    xm = RNG.integers(-128, 128, (5, 2, 3))
    wm = RNG.integers(-128, 128, (2, 3, 4))
    accum = qf.Format(9, 4, rounding="RND", overflow="SAT")
    fx = qf.FixedArray(jnp.asarray(xm, jnp.int32), DENSE_X)
    fw = qf.FixedArray(jnp.asarray(wm, jnp.int32), DENSE_W)
    got = qf.dot_general(fx, fw, (((1, 2), (0, 1)), ((), ())), accum=accum)
    assert got.format == accum
    zero = [0] * 4
    want = [
        ref.dense_latency(
            row.reshape(-1).tolist(), wm.reshape(6, 4).tolist(), zero, 5, 6, 0, _t(accum), _t(accum)
        )
        for row in xm
    ]
    assert np.asarray(got.mantissa).tolist() == want


def test_stochastic_accumulator_rounds_the_bias_with_its_own_key():
    """A bias with more fraction bits than a STOCHASTIC ``accum`` is cast to it with a key
    of its own (it raised "needs a PRNG key" although ``key=`` was given): products exact
    in ``accum`` (fraction 11 ≤ 11), bias 0.3 (fraction 14) lands on a neighbour step of
    2^-11 with mean 0.3 over keys, both via ``dot_general`` and ``fixed_point``."""
    accum = qf.Format(16, 5, rounding="STOCHASTIC", overflow="SAT")
    fx = qf.from_float(jnp.array([[1.0, 2.0]]), qf.Format(8, 3))
    fw = qf.from_float(jnp.array([[0.5, -0.25], [1.0, 0.75]]), qf.Format(8, 2))
    fb = qf.from_float(jnp.array([0.3, -0.7]), qf.Format(16, 2))
    dn = (((1,), (0,)), ((), ()))
    run = lambda k: qf.to_float(qf.dot_general(fx, fw, dn, accum=accum, init=fb, key=k))[0]
    ys = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 2000)), np.float64)
    exact = np.array([2.5, 1.25]) + np.asarray(qf.to_float(fb), np.float64)
    step = 2.0**-11
    assert np.all(np.abs(ys - exact) < step)  # a neighbour of the exact value
    assert len(np.unique(ys[:, 0])) == 2
    np.testing.assert_allclose(ys.mean(0), exact, atol=step / 10)
    f = lambda p, x: x @ p["w"] + p["b"]
    lf = qf.LayerFormats(qf.Format(8, 2), qf.Format(8, 3), qf.Format(16, 5), accum=accum)
    p = {"w": jnp.array([[0.5, -0.25], [1.0, 0.75]]), "b": jnp.array([0.3, -0.7])}
    y = qf.fixed_point(f, [("w", lf), ("b", qf.Format(16, 2))], key=jax.random.key(1))(
        p, jnp.array([[1.0, 2.0]])
    )
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) < step)
