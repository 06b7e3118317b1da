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
            ref.quantize(Fraction(int(m)) * int(mult[j]) / 2**shift, 12, 6, True, "RND", "SAT")
            for j, m in enumerate(row)
        ]
        for row in np.asarray(x.mantissa)
    ]
    assert np.asarray(out.mantissa).tolist() == want
    with pytest.raises(ValueError, match="positive and finite"):
        qf.quantize_multiplier([0.5, -1.0])


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
