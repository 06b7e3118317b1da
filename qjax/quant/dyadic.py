"""Dyadic numbers: a real multiplier ``m`` as ``b / 2^c`` with integers ``b`` and ``c``, and
the integer-only rescaling of int32 values by it (HAWQ-V3's requantization).

An int32 accumulator with scale ``S`` becomes codes of scale ``S'`` by multiplying by
``m = S / S'``. Integer-only inference does that with an integer multiply and a shift:
``round(acc · b / 2^c)``. :func:`dyadic` picks ``b`` with 15 significant bits
(``2^14 ≤ b < 2^15``, a relative error of at most ``2^-15`` on ``m``), and
:func:`dyadic_mul` computes the product exactly in 32-bit integer arithmetic (no int64,
which JAX only has with ``jax_enable_x64``): the accumulator is split into its high and
low 16 bits, each product fits in int32, and the shift is taken from the parts. Rounding
is half up (``floor(x + 1/2)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MULTIPLIER_BITS = 15  # b < 2^15: (acc >> 16) * b and (acc & 0xffff) * b fit in int32
MAX_SHIFT = 46  # |acc * b| < 2^46: a larger shift rounds every int32 accumulator to 0


def dyadic(m) -> tuple[np.ndarray, np.ndarray]:
    """``(b, c)`` int32 arrays with ``b / 2^c ≈ m`` for positive ``m`` (float64 array-like).

    ``2^14 ≤ b < 2^15`` (15 significant bits) where the shift allows it; multipliers below
    ``2^-(MAX_SHIFT - 14)`` get ``c = MAX_SHIFT`` (their products round to 0 or nearly), and
    ``m = 0`` gives ``b = 0``.

    Raises:
      ValueError: ``m`` negative, not finite, or ``≥ 2^15`` (no multiplier of 15 bits with
        a shift ``≥ 0``).
    """
    m = np.asarray(m, np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("dyadic: multipliers must be finite and >= 0")
    if np.any(m >= 2.0**MULTIPLIER_BITS):
        raise ValueError(f"dyadic: a multiplier of {float(m.max()):g} is >= 2^{MULTIPLIER_BITS}")
    safe = np.where(m > 0, m, 1.0)
    c = np.clip((MULTIPLIER_BITS - 1) - np.floor(np.log2(safe)), 0, MAX_SHIFT).astype(np.int64)
    b = np.round(safe * np.exp2(c)).astype(np.int64)
    carry = b >= 2**MULTIPLIER_BITS  # rounding up to 2^15: one bit less
    b = np.where(carry & (c > 0), b // 2, b)
    c = np.where(carry & (c > 0), c - 1, c)
    b = np.where(m > 0, np.minimum(b, 2**MULTIPLIER_BITS - 1), 0)
    return b.astype(np.int32), c.astype(np.int32)


def dyadic_mul(acc: jnp.ndarray, b, c) -> jnp.ndarray:
    """``round(acc · b / 2^c)`` (half up) in int32 arithmetic, exactly.

    Args:
      acc: int32 values.
      b: int32 multipliers, ``0 ≤ b < 2^15``, broadcastable to ``acc``.
      c: int32 shifts, ``0 ≤ c ≤ MAX_SHIFT``, broadcastable to ``acc``.

    Returns:
      int32, exact whenever the result fits in int32 (the caller keeps it there: a
      requantization clamps ``acc`` first, an alignment has ``b / 2^c ≤ 1``).
    """
    # a concrete shift (NumPy or Python) takes one branch below, not both (half the ops)
    static = None if isinstance(c, jax.Array) else np.asarray(c)
    acc = jnp.asarray(acc, jnp.int32)
    b, c = jnp.asarray(b, jnp.int32), jnp.asarray(c, jnp.int32)
    hi = lax.shift_right_arithmetic(acc, jnp.int32(16))  # acc = hi·2^16 + lo, 0 ≤ lo < 2^16
    lo = acc & jnp.int32(0xFFFF)
    x, y = hi * b, lo * b  # |x| < 2^30, 0 ≤ y < 2^31

    # c ≥ 16: acc·b = (x + y_hi)·2^16 + y_lo with y_lo < 2^16, and the low part cannot
    # carry into floor(· / 2^c) once the rounding half (2^(c-1), a multiple of 2^16 for
    # c ≥ 17) is added to the high part
    def wide():
        z = x + lax.shift_right_logical(y, jnp.int32(16))
        y_lo = y & jnp.int32(0xFFFF)
        cs = jnp.maximum(c - 16, 1)
        half = lax.shift_left(jnp.int32(1), jnp.maximum(c - 17, 0))
        return jnp.where(
            c == 16, z + (y_lo >= 2**15).astype(jnp.int32), lax.shift_right_arithmetic(z + half, cs)
        )

    def narrow():  # c < 16: acc·b / 2^c = x·2^(16-c) + y / 2^c, the first term an integer
        cn = jnp.clip(c, 0, 15)
        half_n = jnp.where(cn > 0, lax.shift_left(jnp.int32(1), jnp.maximum(cn - 1, 0)), 0)
        return lax.shift_left(x, 16 - cn) + lax.shift_right_logical(y + half_n, cn)

    if static is not None and np.all(static >= 16):
        return wide()
    if static is not None and np.all(static < 16):
        return narrow()
    return jnp.where(c >= 16, wide(), narrow())


def requantize(acc: jnp.ndarray, m, qmin: int, qmax: int) -> jnp.ndarray:
    """int32 ``acc`` of scale ``S`` as integer codes of scale ``S / m`` in ``[qmin, qmax]``:
    ``clip(round(acc · b / 2^c))`` with ``(b, c) = dyadic(m)`` (``m``: concrete positive
    multipliers broadcastable to ``acc``). ``acc`` is clamped first to the values that
    can still land inside the range, so the product never overflows. Returns int32."""
    m = np.asarray(m, np.float64)
    # a multiplier of 2^15 or more saturates every nonzero accumulator already (a layer
    # whose next range is below one of its steps): the largest dyadic one does the same
    b, c = dyadic(np.minimum(m, 2.0**MULTIPLIER_BITS - 1))
    reach = np.where(m > 0, (max(abs(qmin), abs(qmax)) + 2) / np.maximum(m, 1e-300), 2.0**31 - 1)
    bound = np.minimum(np.ceil(reach), 2**31 - 1).astype(np.int64).astype(np.int32)
    acc = jnp.clip(jnp.asarray(acc, jnp.int32), -bound, bound)
    return jnp.clip(dyadic_mul(acc, b, c), qmin, qmax)


def fine_dyadic(m) -> tuple[np.ndarray, ...]:
    """``(b1, c1, b2, c2, s2)``: ``m ≈ b1 / 2^c1 + s2 · b2 / 2^c2`` for non-negative ``m``
    (float64 array-like), two 15-bit dyadic numbers, the second the first's remainder: 30
    significant bits where :func:`dyadic` has 15."""
    m = np.asarray(m, np.float64)
    b1, c1 = dyadic(m)
    rest = m - b1 / np.exp2(c1.astype(np.float64))
    b2, c2 = dyadic(np.abs(rest))
    return b1, c1, b2, c2, np.where(rest < 0, -1, 1).astype(np.int32)


def fine_dyadic_mul(acc: jnp.ndarray, terms) -> jnp.ndarray:
    """``acc · m`` for ``terms = fine_dyadic(m)``: the two dyadic products summed (each
    rounded half up, so within two units of ``acc · m``), int32."""
    b1, c1, b2, c2, s2 = terms
    return dyadic_mul(acc, b1, c1) + jnp.asarray(s2) * dyadic_mul(acc, b2, c2)


def fine_dyadic_mul_reference(acc, terms) -> np.ndarray:
    """:func:`fine_dyadic_mul` in NumPy int64 (bit-identical)."""
    b1, c1, b2, c2, s2 = (np.asarray(t, np.int64) for t in terms)
    one = lambda b, c: (
        (np.asarray(acc, np.int64) * b + np.where(c > 0, np.int64(1) << np.maximum(c - 1, 0), 0)) >> c
    )
    return one(b1, c1) + s2 * one(b2, c2)
