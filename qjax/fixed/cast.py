"""Casts between fixed-point formats (integer shifts and masks only) and from floats.

The core is :func:`cast_mantissa`: an integer mantissa with ``frac`` fraction bits
becomes a mantissa of a destination :class:`Format`. Dropping ``d`` fraction bits is an
arithmetic right shift (the floor) plus an increment decided by the destination's
rounding mode from three facts read off the dropped bits: the *round bit* (bit
``d - 1``), the *sticky bit* (any bit below it) and the sign; adding fraction bits is a
left shift. Overflow is then handled in the compute dtype (the wider of source and
destination, ``int32`` or ``int64``) with a sign-extending shift pair (WRAP) or
comparisons (SAT family). No float operation touches the values.

:func:`from_float` rounds floats with the same decision table; its arithmetic is exact
(scaling by powers of two, ``floor``, and the difference ``y - floor(y)``), so it
rounds exactly like an infinitely precise ``ap_fixed`` assignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qjax.fixed.array import FixedArray
from qjax.fixed.format import MAX_INT32_WIDTH, Format, require_x64

# -- helpers ---------------------------------------------------------------------------


def _bits(dtype) -> int:
    return jnp.iinfo(dtype).bits


def const(value: int, dtype) -> jax.Array:
    """A Python int as a scalar of a signed integer ``dtype``, wrapped two's-complement
    (``(1 << 32) - 1`` becomes ``-1`` in ``int32``: the bit pattern is what counts)."""
    bits = _bits(dtype)
    value &= (1 << bits) - 1
    if value >= 1 << (bits - 1):
        value -= 1 << bits
    return jnp.asarray(value, dtype)


def _low_mask(k: int, dtype) -> jax.Array:
    """The bit pattern with the low ``k`` bits set (``0 <= k <= bits``)."""
    return const((1 << k) - 1, dtype)


def _unsigned(dtype):
    return jnp.uint64 if _bits(dtype) == 64 else jnp.uint32


def as_int(m, dtype=None) -> jax.Array:
    """``m`` as a signed integer array (at least ``int32``; ``dtype`` if given).

    Raises:
      TypeError: ``m`` is not an integer array.
    """
    m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise TypeError(f"a mantissa must be an integer array, got dtype {m.dtype}")
    if dtype is None:
        dtype = jnp.int64 if _bits(m.dtype) == 64 or m.dtype == jnp.uint32 else jnp.int32
        if dtype == jnp.int64:
            require_x64(f"a {m.dtype} mantissa")
    return m.astype(dtype)


# -- rounding decisions ----------------------------------------------------------------


def round_increment(rounding: str, *, neg, q_odd, above, tie, inexact) -> jax.Array:
    """Whether to add one to the floor, for a deterministic rounding mode.

    Args:
      rounding: a mode of :data:`qjax.fixed.DETERMINISTIC_ROUNDING`.
      neg: the exact value is negative.
      q_odd: the floor is odd.
      above: the dropped fraction is more than one half.
      tie: the dropped fraction is exactly one half.
      inexact: the dropped fraction is not zero.

    Returns:
      A boolean array.
    """
    if rounding == "TRN":
        return jnp.zeros_like(neg)
    if rounding == "TRN_ZERO":
        return neg & inexact
    if rounding == "RND":
        return above | tie
    if rounding == "RND_ZERO":
        return above | (tie & neg)
    if rounding == "RND_INF":
        return above | (tie & ~neg)
    if rounding == "RND_MIN_INF":
        return above
    if rounding == "RND_CONV":
        return above | (tie & q_odd)
    raise ValueError(f"unknown rounding mode {rounding!r}")  # pragma: no cover - Format validates


def _random_words(key, n_bits: int, shape) -> jax.Array:
    """True where ``n_bits`` fresh uniform random bits are all zero (probability
    ``2^-n_bits``), built from 32-bit words."""
    zero = jnp.ones(shape, bool)
    words = -(-n_bits // 32)
    bits = jax.random.bits(key, (words, *shape), jnp.uint32)
    for i in range(words):
        width = min(32, n_bits - 32 * i)
        mask = jnp.uint32((1 << width) - 1)
        zero = zero & ((bits[i] & mask) == 0)
    return zero


def _stochastic_increment(m, d: int, key) -> jax.Array:
    """Add one with probability ``(m mod 2^d) / 2^d`` exactly (any ``d >= 1``).

    The dropped bits ``r = m mod 2^d`` are compared with ``d`` uniform random bits
    ``u``: the floor is incremented iff ``u < r``. For ``d`` wider than the dtype,
    ``r``'s high bits are all zeros (``m >= 0``) or all ones (``m < 0``), so ``u < r``
    reduces to an event on ``u``'s high bits of probability ``2^-(d - B)`` combined with a
    ``B``-bit comparison.
    """
    dtype = m.dtype
    B = _bits(dtype)
    udt = _unsigned(dtype)
    k_lo, k_hi = jax.random.split(key)
    if d <= B:
        r = lax.bitcast_convert_type(m & _low_mask(d, dtype), udt)
        u = jax.random.bits(k_lo, m.shape, udt)
        if d < B:
            u = u & jnp.asarray((1 << d) - 1, udt)
        return u < r
    r_lo = lax.bitcast_convert_type(m, udt)
    below = jax.random.bits(k_lo, m.shape, udt) < r_lo
    high_zero = _random_words(k_hi, d - B, m.shape)
    return jnp.where(m >= 0, high_zero & below, ~high_zero | below)


def shift_right_round(m, d: int, rounding: str, key=None) -> jax.Array:
    """``m / 2^d`` rounded to an integer by ``rounding`` (``d >= 1``, any size).

    Args:
      m: signed integer array (``int32``/``int64``); the result has its dtype.
      d: how many low bits to drop.
      rounding: a mode of :data:`qjax.fixed.ROUNDING_MODES`.
      key: PRNG key, required for ``"STOCHASTIC"``.

    Returns:
      The rounded quotient (it cannot overflow the dtype since ``d >= 1``).

    Raises:
      ValueError: stochastic rounding without a key.
    """
    dtype = m.dtype
    B = _bits(dtype)
    t = m >> const(min(d - 1, B - 1), dtype)  # floor(m / 2^(d-1)), sign-filled beyond B
    q = t >> const(1, dtype)  # floor(m / 2^d)
    if rounding == "STOCHASTIC":
        if key is None:
            raise ValueError("rounding='STOCHASTIC' needs a PRNG key (key=...)")
        incr = _stochastic_increment(m, d, key)
    else:
        round_bit = (t & const(1, dtype)) != 0
        sticky = (m & _low_mask(min(d - 1, B), dtype)) != 0
        incr = round_increment(
            rounding,
            neg=m < 0,
            q_odd=(q & const(1, dtype)) != 0,
            above=round_bit & sticky,
            tie=round_bit & ~sticky,
            inexact=round_bit | sticky,
        )
    return q + incr.astype(dtype)


def apply_overflow(q, fmt: Format) -> jax.Array:
    """Bring integers ``q`` (already at ``fmt``'s fraction bits) into ``fmt``'s range by
    its overflow mode. ``q``'s dtype must hold ``fmt``'s mantissas with a bit to spare
    for the signed wrap (``int32`` for ``W <= 31``)."""
    dtype = q.dtype
    B = _bits(dtype)
    lo, hi = fmt.min_mantissa, fmt.max_mantissa
    if fmt.overflow == "WRAP":
        if fmt.signed:
            s = const(B - fmt.width, dtype)
            return (q << s) >> s
        return q & _low_mask(fmt.width, dtype)
    if fmt.overflow == "SAT_SYM" and fmt.signed:
        lo = -hi
    lo_c, hi_c = const(lo, dtype), const(hi, dtype)
    if fmt.overflow == "SAT_ZERO":
        return jnp.where((q < lo_c) | (q > hi_c), const(0, dtype), q)
    return jnp.clip(q, lo_c, hi_c)


def _shift_left(m, s: int, fmt: Format) -> jax.Array:
    """``m · 2^s`` in ``fmt`` (``s >= 1``): exact, then the overflow mode."""
    dtype = m.dtype
    B = _bits(dtype)
    if fmt.overflow == "WRAP":
        if s >= fmt.width:
            return jnp.zeros_like(m)  # every multiple of 2^s is 0 mod 2^W
        return apply_overflow(m << const(s, dtype), fmt)
    lo, hi = fmt.min_mantissa, fmt.max_mantissa
    if fmt.overflow == "SAT_SYM" and fmt.signed:
        lo = -hi
    m_hi = hi >> s  # the largest m with m·2^s <= hi
    m_lo = -((-lo) >> s)  # the smallest m with m·2^s >= lo
    over, under = m > const(m_hi, dtype), m < const(m_lo, dtype)
    shifted = m << const(min(s, B - 1), dtype)  # in range only where m·2^s fits the format
    if fmt.overflow == "SAT_ZERO":
        return jnp.where(over | under, const(0, dtype), shifted)
    return jnp.where(over, const(hi, dtype), jnp.where(under, const(lo, dtype), shifted))


def cast_mantissa(m, frac: int, fmt: Format, *, key=None, dtype=None) -> jax.Array:
    """Integer mantissas with ``frac`` fraction bits, cast to ``fmt``.

    Args:
      m: integer array (any signed or unsigned integer dtype).
      frac: the fraction bits of ``m``.
      fmt: the destination format (its rounding and overflow modes apply).
      key: PRNG key for ``STOCHASTIC`` rounding.
      dtype: compute dtype (default: the wider of ``m``'s and ``fmt``'s).

    Returns:
      ``fmt.dtype`` mantissas.

    Raises:
      ValueError: stochastic rounding without a key, or 64-bit integers needed with
        x64 off.
    """
    m = as_int(m)
    if dtype is None:
        dtype = jnp.int64 if (m.dtype == jnp.int64 or fmt.width > MAX_INT32_WIDTH) else jnp.int32
        if dtype == jnp.int64:
            require_x64(f"casting to {fmt}")
    m = m.astype(dtype)
    d = frac - fmt.fraction
    if d > 0:
        q = apply_overflow(shift_right_round(m, d, fmt.rounding, key), fmt)
    elif d < 0:
        q = _shift_left(m, -d, fmt)
    else:
        q = apply_overflow(m, fmt)
    return q.astype(fmt.dtype)


def cast(fx: FixedArray, fmt: Format, *, key=None) -> FixedArray:
    """Cast a :class:`FixedArray` to another format with integer operations only.

    Args:
      fx: the source.
      fmt: the destination format; its rounding and overflow modes apply.
      key: PRNG key, required when ``fmt.rounding == "STOCHASTIC"``.

    Returns:
      A ``FixedArray`` in ``fmt``.

    Raises:
      TypeError: ``fx`` is not a ``FixedArray`` or ``fmt`` not a ``Format``.
      ValueError: stochastic rounding without a key; a format wider than 31 bits with
        x64 off.

    Example:
      >>> fy = cast(fx, Format(8, 3, rounding="RND_CONV", overflow="SAT"))
    """
    if not isinstance(fx, FixedArray):
        raise TypeError(f"cast expects a FixedArray, got {type(fx).__name__}; use from_float for floats")
    _check_format(fmt)
    return FixedArray(cast_mantissa(fx.mantissa, fx.format.fraction, fmt, key=key), fmt)


def _check_format(fmt) -> None:
    if not isinstance(fmt, Format):
        raise TypeError(f"expected a qjax.fixed.Format, got {fmt!r}")


# -- from float ------------------------------------------------------------------------


def _float_dtype(x):
    if x.dtype == jnp.float64:
        return jnp.float64
    return jnp.float32


def from_float(x, fmt: Format, *, key=None) -> FixedArray:
    """Round floats onto ``fmt`` by its rounding and overflow modes.

    The float arithmetic used is exact: ``x · 2^F`` (a power-of-two scaling), ``floor``,
    the dropped fraction ``y - floor(y)``, and for WRAP the reduction ``fmod(x, 2^I)``.
    The result is therefore the ``ap_fixed`` assignment of the exact float value
    (subnormal inputs count as 0 where XLA flushes denormals, as on CPU). NaN becomes 0;
    ±inf saturates under SAT/SAT_SYM and becomes 0 under SAT_ZERO and WRAP. Stochastic
    rounding compares the dropped fraction with a float uniform on a ``2^-23`` grid
    (float32), so its bias is below ``2^-23`` LSB (integer casts are exactly unbiased).

    Args:
      x: array-like of floats (ints are converted to float32 first).
      fmt: the destination :class:`Format`.
      key: PRNG key, required for ``STOCHASTIC`` rounding.

    Returns:
      A :class:`FixedArray` in ``fmt``.

    Raises:
      TypeError: ``fmt`` is not a ``Format``.
      ValueError: stochastic rounding without a key; ``W > 31`` with x64 off.
    """
    _check_format(fmt)
    x = jnp.asarray(x)
    fdt = _float_dtype(x)
    x = x.astype(fdt)
    out_dtype = fmt.dtype
    W, F = fmt.width, fmt.fraction
    finite = jnp.isfinite(x)
    neg = x < 0
    if fmt.overflow == "WRAP":
        # x mod 2^I (the value period of W bits): fmod is exact and cannot overflow; the
        # remainder may be negative, which the final integer wrap takes care of.
        period = jnp.asarray(2.0**fmt.integer, fdt)
        src = jnp.where(finite, jnp.fmod(x, period), 0)
    else:
        src = jnp.where(jnp.isnan(x), 0, x)
    y = src * jnp.asarray(2.0**F, fdt)
    floor = jnp.floor(y)
    frac = y - floor
    # y underflowed to zero from a nonzero value: floor is -1 (negative) and inexact.
    tiny = (y == 0) & (src != 0)
    tiny_neg = tiny & (src < 0)
    floor = jnp.where(tiny_neg, -1, floor)
    if fmt.rounding == "STOCHASTIC":
        if key is None:
            raise ValueError("rounding='STOCHASTIC' needs a PRNG key (key=...)")
        u = jax.random.uniform(key, x.shape, fdt)
        incr = u < jnp.where(tiny_neg, 1, frac)
    else:
        incr = round_increment(
            fmt.rounding,
            neg=neg,
            q_odd=jnp.fmod(floor, 2) != 0,
            above=(frac > 0.5) | tiny_neg,
            tie=frac == 0.5,
            inexact=(frac != 0) | tiny,
        )
    q = floor + incr.astype(fdt)
    if fmt.overflow == "WRAP":
        # |q| <= 2^W + 1: convert exactly in two halves (q = hi·2^S + lo, 0 <= lo < 2^S), the
        # integer sum wrapping mod 2^B, then keep the low W bits.
        S = _bits(out_dtype) // 2
        hi = jnp.floor(q * jnp.asarray(2.0**-S, fdt))
        lo = q - hi * jnp.asarray(2.0**S, fdt)
        m = (hi.astype(out_dtype) << const(S, out_dtype)) + lo.astype(out_dtype)
        return FixedArray(apply_overflow(m, fmt), fmt)
    top = 2.0 ** (W - 1) if fmt.signed else 2.0**W  # hi + 1, exact in float
    bottom = -(2.0 ** (W - 1)) if fmt.signed else 0.0  # lo
    over = q >= jnp.asarray(top, fdt)
    if fmt.overflow == "SAT_SYM" and fmt.signed:
        under = q <= jnp.asarray(bottom, fdt)  # q < -max
        lo = -fmt.max_mantissa
    else:
        under = q < jnp.asarray(bottom, fdt)
        lo = fmt.min_mantissa
    inside = jnp.where(over | under, 0, q).astype(out_dtype)
    if fmt.overflow == "SAT_ZERO":
        return FixedArray(inside, fmt)
    hi_c, lo_c = jnp.asarray(fmt.max_mantissa, out_dtype), jnp.asarray(lo, out_dtype)
    return FixedArray(jnp.where(over, hi_c, jnp.where(under, lo_c, inside)), fmt)
