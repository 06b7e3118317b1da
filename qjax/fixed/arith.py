"""Elementwise fixed-point arithmetic: exact results, then an optional cast.

``add``/``sub``/``mul`` compute the exact result on integer mantissas (operands
aligned by left shifts) in the format that holds it (:func:`exact_add_format`, :func:`exact_sub_format`,
:func:`exact_mul_format`, as ``ap_fixed`` does), then cast it to ``fmt`` when one is
given. :func:`requantize` multiplies by a real scale as an integer multiplier and a
shift (``scale ≈ M · 2^-S``), the rounding done by the cast.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np

from qjax.fixed.array import FixedArray
from qjax.fixed.cast import as_int, cast_mantissa, const
from qjax.fixed.format import (
    Format,
    exact_add_format,
    exact_mul_format,
    exact_sub_format,
    int_dtype_for_bits,
)


def _check(*xs) -> None:
    for x in xs:
        if not isinstance(x, FixedArray):
            raise TypeError(f"expected a FixedArray, got {type(x).__name__}; convert floats with from_float")


def signed_bits(lo: int, hi: int) -> int:
    """Bits of the smallest two's-complement integer type holding ``[lo, hi]``."""
    return max(max(hi, 0).bit_length(), max(-lo - 1, 0).bit_length()) + 1


def _exact_dtype(lo: int, hi: int, what: str):
    return int_dtype_for_bits(signed_bits(lo, hi), what)


def _finish(m, frac: int, exact: Format, fmt: Format | None, key, what: str) -> FixedArray:
    """Return the exact result, or its cast to ``fmt``."""
    if fmt is None:
        try:
            dtype = exact.dtype
        except ValueError as e:
            raise ValueError(f"{what}: the exact result {exact} {e}; pass fmt= to cast it") from None
        return FixedArray(m.astype(dtype), exact)
    if not isinstance(fmt, Format):
        raise TypeError(f"fmt must be a qjax.fixed.Format or None, got {fmt!r}")
    return FixedArray(cast_mantissa(m, frac, fmt, key=key), fmt)


def _range(fmt: Format) -> tuple[int, int]:
    return fmt.min_mantissa, fmt.max_mantissa


def _add_sub(a: FixedArray, b: FixedArray, fmt, key, sign: int, what: str) -> FixedArray:
    _check(a, b)
    exact = (exact_add_format if sign > 0 else exact_sub_format)(a.format, b.format)
    frac = exact.fraction
    sa, sb = frac - a.format.fraction, frac - b.format.fraction
    (alo, ahi), (blo, bhi) = _range(a.format), _range(b.format)
    lo_b, hi_b = (blo, bhi) if sign > 0 else (-bhi, -blo)
    dtype = _exact_dtype(min(alo << sa, 0) + min(lo_b << sb, 0), max(ahi << sa, 0) + max(hi_b << sb, 0), what)
    ma = as_int(a.mantissa, dtype) << const(sa, dtype)
    mb = as_int(b.mantissa, dtype) << const(sb, dtype)
    m = ma + mb if sign > 0 else ma - mb
    return _finish(m, frac, exact, fmt, key, what)


def add(a: FixedArray, b: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``a + b`` (broadcasting), exact, then cast to ``fmt`` if given.

    Args:
      a, b: ``FixedArray``s in any formats.
      fmt: target format, or ``None`` for the exact result format
        (:func:`qjax.fixed.exact_add_format`).
      key: PRNG key for a ``STOCHASTIC`` target.

    Returns:
      A ``FixedArray``.

    Raises:
      TypeError: an operand is not a ``FixedArray``.
      ValueError: the exact result needs 64-bit integers and x64 is off (with
        ``fmt=None``, or when even the computation does not fit 32 bits).
    """
    return _add_sub(a, b, fmt, key, +1, "add")


def sub(a: FixedArray, b: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``a - b``, exact, then cast to ``fmt`` if given (see :func:`add`). The exact format
    (:func:`qjax.fixed.exact_sub_format`) is signed even for unsigned operands."""
    return _add_sub(a, b, fmt, key, -1, "sub")


def mul(a: FixedArray, b: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``a · b`` (broadcasting), exact, then cast to ``fmt`` if given.

    The product is computed in ``int32`` when its exact range fits 32 bits (e.g. two
    16-bit operands) even though its ``ap_fixed`` format is 32 bits wide, so a cast to a
    narrower ``fmt`` needs no x64.

    Args:
      a, b: ``FixedArray``s.
      fmt: target format, or ``None`` for :func:`qjax.fixed.exact_mul_format`.
      key: PRNG key for a ``STOCHASTIC`` target.

    Returns:
      A ``FixedArray``.

    Raises:
      TypeError: an operand is not a ``FixedArray``.
      ValueError: 64-bit integers needed with x64 off.
    """
    _check(a, b)
    exact = exact_mul_format(a.format, b.format)
    (alo, ahi), (blo, bhi) = _range(a.format), _range(b.format)
    corners = [x * y for x in (alo, ahi) for y in (blo, bhi)]
    dtype = _exact_dtype(min(corners), max(corners), "mul")
    m = as_int(a.mantissa, dtype) * as_int(b.mantissa, dtype)
    return _finish(m, exact.fraction, exact, fmt, key, "mul")


def neg(a: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``-a``, exact (one more integer bit, signed), then cast to ``fmt`` if given."""
    _check(a)
    zero = FixedArray(jnp.zeros((), jnp.int32), Format(1, 1 - a.format.fraction, signed=False))
    return sub(zero, a, fmt, key=key)


def quantize_multiplier(scale, bits: int = 16) -> tuple[np.ndarray, int]:
    """A positive real scale (or array of scales) as integer multipliers and one shift:
    ``scale ≈ M · 2^-shift`` with the largest ``M`` below ``2^bits`` (rounded to nearest).

    Args:
      scale: positive finite float or array of floats.
      bits: multiplier bits (1 to 31).

    Returns:
      ``(M, shift)``: ``M`` an ``int64`` numpy array of ``scale``'s shape, ``shift`` an int
      shared by every element (channels with smaller scales keep fewer significant bits).

    Raises:
      ValueError: a scale is not positive and finite, or ``bits`` outside 1..31.
    """
    if not 1 <= bits <= 31:
        raise ValueError(f"multiplier bits must be between 1 and 31, got {bits}")
    s = np.asarray(scale, np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"requantization scales must be positive and finite, got {scale!r}")
    _, e = math.frexp(float(s.max()))  # max in [2^(e-1), 2^e)
    shift = bits - e
    exact = [Fraction(float(v)) * (Fraction(2) ** shift) for v in s.reshape(-1)]
    m = np.array([min(math.floor(v + Fraction(1, 2)), (1 << bits) - 1) for v in exact], np.int64)
    return m.reshape(s.shape), shift


def requantize(x: FixedArray, scale, fmt: Format, *, bits: int = 16, key=None) -> FixedArray:
    """``x · scale`` in ``fmt`` by an integer multiply and a rounding shift.

    ``scale`` is turned into ``M · 2^-S`` (:func:`quantize_multiplier`); the product
    ``mantissa · M`` is exact and the cast to ``fmt`` drops ``F_x + S - F_fmt`` bits with
    ``fmt``'s rounding. The only approximation is ``M``'s rounding (relative error at most
    ``2^-bits``).

    Args:
      x: a ``FixedArray``.
      scale: positive float or array broadcastable against ``x`` (e.g. per channel).
      fmt: the target format.
      bits: multiplier bits.
      key: PRNG key for a ``STOCHASTIC`` target.

    Returns:
      A ``FixedArray`` in ``fmt``.

    Raises:
      ValueError: bad scales; 64-bit integers needed with x64 off.
    """
    _check(x)
    mult, shift = quantize_multiplier(scale, bits)
    lo, hi = _range(x.format)
    mmax = int(mult.max())
    dtype = _exact_dtype(min(lo * mmax, 0), hi * mmax, "requantize")
    m = as_int(x.mantissa, dtype) * jnp.asarray(mult, dtype)
    return FixedArray(cast_mantissa(m, x.format.fraction + shift, fmt, key=key), fmt)


def constant(value: float, fmt: Format) -> FixedArray:
    """A scalar constant on ``fmt``: rounded to nearest (ties to even) exactly in Python,
    then saturated to ``fmt``'s range (``fmt``'s own modes are not used)."""
    m = round(Fraction(value) * (Fraction(2) ** fmt.fraction))
    m = min(max(m, fmt.min_mantissa), fmt.max_mantissa)
    return FixedArray(jnp.asarray(m, fmt.dtype), fmt)


def where(cond, a: FixedArray, b: FixedArray) -> FixedArray:
    """Elementwise select between two ``FixedArray``s of the same format."""
    _check(a, b)
    if a.format != b.format:
        raise ValueError(f"where needs equal formats, got {a.format} and {b.format}")
    return FixedArray(jnp.where(cond, a.mantissa, b.mantissa), a.format)
