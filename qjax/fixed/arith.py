"""Elementwise fixed-point arithmetic: exact results, then an optional cast.

``add``/``sub``/``mul`` compute the exact result on integer mantissas (operands
aligned by left shifts) in the format that holds it (:func:`exact_add_format`, :func:`exact_sub_format`,
:func:`exact_mul_format`, as ``ap_fixed`` does), then cast it to ``fmt`` when one is
given. :func:`requantize` multiplies by real scales as integer multipliers and shifts
(``scale ≈ M · 2^-S``, one shift per element), the rounding done by the cast.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
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
    x64_enabled,
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


def _dyadic(v: float, bits: int) -> tuple[int, int]:
    """``v > 0`` as ``(M, shift)`` with ``2^(bits-1) <= M < 2^bits`` the integer nearest to
    ``v · 2^shift`` (ties up), in exact rational arithmetic."""
    _, e = math.frexp(v)  # v in [2^(e-1), 2^e)
    shift = bits - e
    m = math.floor(Fraction(v) * Fraction(2) ** shift + Fraction(1, 2))
    if m == 1 << bits:  # rounded up to the next power of two: one bit less shift, exactly
        m, shift = m >> 1, shift - 1
    return m, shift


def quantize_multiplier(scale, bits: int = 16) -> tuple[np.ndarray, int | np.ndarray]:
    """Positive real scales as dyadic numbers ``scale ≈ M · 2^-shift``, one shift per element.

    Every ``M`` has exactly ``bits`` significant bits (``2^(bits-1) <= M < 2^bits``), rounded
    to nearest with ties up, so ``|M · 2^-shift - scale| <= 2^-bits · scale`` for every
    element, however many decades the scales span (as gemmlowp / HAWQ-V3 per-channel
    requantization). The shift may be negative (``scale >= 2^bits``).

    Args:
      scale: positive finite float or array of floats (e.g. one per output channel).
      bits: multiplier bits (1 to 31).

    Returns:
      ``(M, shift)``: ``M`` an ``int64`` numpy array of ``scale``'s shape; ``shift`` a Python
      int for a scalar ``scale``, else an ``int64`` numpy array of ``scale``'s shape.

    Raises:
      ValueError: ``bits`` outside 1..31; ``scale`` empty, or an element (named by its
        index) not positive and finite.
    """
    if not 1 <= bits <= 31:
        raise ValueError(f"multiplier bits must be between 1 and 31, got {bits}")
    s = np.asarray(scale, np.float64)
    if s.size == 0:
        raise ValueError("scale is empty; requantization needs at least one positive scale")
    ok = np.isfinite(s) & (s > 0)
    if not ok.all():
        idx = tuple(int(i) for i in np.argwhere(~ok)[0])
        where = f"[{', '.join(map(str, idx))}]" if idx else ""
        raise ValueError(f"requantization scales must be positive and finite, got scale{where} = {s[idx]}")
    pairs = [_dyadic(float(v), bits) for v in s.reshape(-1)]
    m = np.array([p[0] for p in pairs], np.int64).reshape(s.shape)
    shift = np.array([p[1] for p in pairs], np.int64).reshape(s.shape)
    return m, (int(shift) if s.ndim == 0 else shift)


def _product_dtype(fmt: Format, mmax: int, bits: int):
    """The integer dtype of ``mantissa · M`` (``M <= mmax``), or a ValueError that says
    whether ``bits`` or ``x``'s width is what to reduce."""
    lo, hi = _range(fmt)
    need = signed_bits(min(lo * mmax, 0), hi * mmax)
    if need <= 32:
        return jnp.int32
    limit = 64 if x64_enabled() else 32
    if need <= limit:
        return jnp.int64
    fit = [b for b in range(1, 32) if signed_bits(min(lo * ((1 << b) - 1), 0), hi * ((1 << b) - 1)) <= limit]
    fix = f"pass bits <= {fit[-1]} or cast x to a narrower format" if fit else "cast x to a narrower format"
    x64 = "" if limit == 64 else " with jax_enable_x64 off (enabling it allows 64)"
    raise ValueError(
        f"requantize: x's {fmt.width}-bit mantissas ({fmt}) times {bits}-bit multipliers need "
        f"{need}-bit products, more than the {limit} bits available{x64}: {fix}"
    )


def _cast_per_shift(m, frac: int, shift, fmt: Format, key) -> jax.Array:
    """Cast ``m`` (``frac + shift`` fraction bits, ``shift`` per element) to ``fmt``: one
    :func:`cast_mantissa` per distinct shift, each element taken from its own."""
    shifts = np.unique(shift)
    out = cast_mantissa(m, frac + int(shifts[0]), fmt, key=key)
    for s in shifts[1:]:
        out = jnp.where(jnp.asarray(shift == s), cast_mantissa(m, frac + int(s), fmt, key=key), out)
    return out


def requantize(x: FixedArray, scale, fmt: Format, *, bits: int = 16, key=None) -> FixedArray:
    """``x · scale`` in ``fmt`` by an integer multiply and a rounding shift.

    ``scale`` is turned into ``M · 2^-S`` per element (:func:`quantize_multiplier`); the
    product ``mantissa · M`` is exact and the cast to ``fmt`` drops ``F_x + S - F_fmt`` bits
    with ``fmt``'s rounding (each distinct ``S`` is one cast, selected per element). The only
    approximation is ``M``'s rounding: relative error at most ``2^-bits`` in every channel.

    Args:
      x: a ``FixedArray``.
      scale: positive float or array broadcastable against ``x`` (e.g. per channel).
      fmt: the target format.
      bits: multiplier bits.
      key: PRNG key for a ``STOCHASTIC`` target.

    Returns:
      A ``FixedArray`` in ``fmt``.

    Raises:
      ValueError: bad scales (naming the element); products wider than 32 bits with x64 off
        (or 64 with it on), naming ``bits`` or ``x``'s format as the thing to narrow.
    """
    _check(x)
    mult, shift = quantize_multiplier(scale, bits)
    dtype = _product_dtype(x.format, int(mult.max()), bits)
    m = as_int(x.mantissa, dtype) * jnp.asarray(mult, dtype)
    return FixedArray(_cast_per_shift(m, x.format.fraction, shift, fmt, key), fmt)


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
