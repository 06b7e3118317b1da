"""Exact wide integer arithmetic in int32 / uint32 (no int64, which JAX only has with
``jax_enable_x64``): the product of two int32 values shifted back into int32, and the
fixed-point quotient of two non-negative values. Integer-only inference uses them where
two integer values meet (a normalisation's ``(x - mean) · rsqrt(var)``, a softmax's
``exp / sum``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

_U = jnp.uint32


def _wide_product(a: jnp.ndarray, b: jnp.ndarray):
    """``|a · b|`` as two uint32 words ``(hi, lo)``, and the product's sign (int32 ±1)."""
    sign = jnp.where((a < 0) != (b < 0), -1, 1).astype(jnp.int32)
    ua, ub = jnp.abs(a).astype(_U), jnp.abs(b).astype(_U)  # |-2^31| = 2^31 fits uint32
    a1, a0 = ua >> _U(16), ua & _U(0xFFFF)
    b1, b0 = ub >> _U(16), ub & _U(0xFFFF)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^32
    mid = p01 + p10  # may wrap: its carry is worth 2^48
    mid_carry = (mid < p01).astype(_U)
    lo = p00 + (mid << _U(16))
    lo_carry = (lo < p00).astype(_U)
    hi = p11 + (mid >> _U(16)) + (mid_carry << _U(16)) + lo_carry
    return hi, lo, sign


def mul_shift(a: jnp.ndarray, b: jnp.ndarray, shift: int) -> jnp.ndarray:
    """``round(a · b / 2^shift)`` of int32 arrays, exactly (the 64-bit product is formed in
    16-bit limbs), rounding half away from zero.

    Args:
      a, b: int32 arrays (broadcastable).
      shift: a static integer, ``0 ≤ shift ≤ 62``.

    Returns:
      int32: exact whenever the result fits in int32 (the caller picks ``shift`` from the
      operands' bounds so that it does).
    """
    if not 0 <= shift <= 62:
        raise ValueError(f"mul_shift: shift must be in [0, 62], got {shift}")
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
    hi, lo, sign = _wide_product(a, b)
    if shift:
        half = 1 << (shift - 1)
        add_lo, add_hi = _U(half & 0xFFFFFFFF), _U(half >> 32)
        new_lo = lo + add_lo
        hi = hi + add_hi + (new_lo < lo).astype(_U)
        lo = new_lo
        if shift < 32:
            mag = (hi << _U(32 - shift)) | (lo >> _U(shift))
        elif shift == 32:
            mag = hi
        else:
            mag = hi >> _U(shift - 32)
    else:
        mag = lo
    return sign * mag.astype(jnp.int32)


def divide(num: jnp.ndarray, den: jnp.ndarray, bits: int, den_bound: float = 2.0**24) -> jnp.ndarray:
    """``floor(num · 2^bits / den)`` for int32 ``0 ≤ num ≤ den ≤ den_bound < 2^30``, by
    long division, as many bits per step as keep every partial remainder below ``2^31``
    (seven for ``den < 2^24``, one for ``den < 2^30``). A ``den`` below 1 is taken as 1.

    Returns:
      int32 in ``[0, 2^bits]`` (``bits ≤ 30``).
    """
    if not 0 <= bits <= 30:
        raise ValueError(f"divide: bits must be in [0, 30], got {bits}")
    if not 1 <= den_bound < 2**30:
        raise ValueError(f"divide: den_bound must be in [1, 2^30), got {den_bound}")
    per_step = max(1, min(7, 31 - math.ceil(math.log2(den_bound + 1))))
    num = jnp.asarray(num, jnp.int32)
    den = jnp.maximum(jnp.asarray(den, jnp.int32), 1)
    num, den = jnp.broadcast_arrays(num, den)
    q, r = lax.div(num, den), lax.rem(num, den)  # non-negative: truncation is the floor
    done = 0
    while done < bits:
        step = min(per_step, bits - done)
        r = lax.shift_left(r, jnp.int32(step))  # r < den: r · 2^step < 2^31
        q = lax.shift_left(q, jnp.int32(step)) + lax.div(r, den)
        r = lax.rem(r, den)
        done += step
    return q


def normalize(num: jnp.ndarray, den: jnp.ndarray, bits: int) -> jnp.ndarray:
    """``num / den`` as codes of ``2^-bits`` (within one code of the floor), for int32
    ``0 ≤ num ≤ den < 2^30`` with ``den`` broadcast along some axes of ``num`` (a row's
    sum): one reciprocal per ``den`` element by long division, then one exact wide
    product per ``num`` element. A ``den`` below 1 is taken as 1.

    Returns:
      int32 in ``[0, 2^bits]`` (``bits ≤ 29``).
    """
    if not 0 <= bits <= 29:
        raise ValueError(f"normalize: bits must be in [0, 29], got {bits}")
    den = jnp.maximum(jnp.asarray(den, jnp.int32), 1)
    shift = lax.clz(den) - 2  # den · 2^shift in [2^29, 2^30)
    den = lax.shift_left(den, shift)
    num = lax.shift_left(jnp.asarray(num, jnp.int32), shift)  # num <= den: still < 2^30
    inverse = divide(jnp.full(den.shape, 2**29, jnp.int32), den, 30, den_bound=2**30 - 1)  # 2^59 / den
    return jnp.clip(mul_shift(num, inverse, 59 - bits), 0, 2**bits)


__all__ = ["divide", "mul_shift", "normalize"]
