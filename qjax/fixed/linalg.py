"""Fixed-point matmul and convolution with a derived wide accumulator.

A contraction of ``K`` products of ``W_a``-bit and ``W_w``-bit mantissas cannot overflow
an accumulator of ``W_a + W_w + ⌈log2 K⌉`` bits (each product is at most
``2^(W_a + W_w - 2)`` in magnitude). :func:`accumulator_format` derives that format
(``F = F_a + F_w``) and checks it: more than 63 bits is an error, more than 31 needs
``jax_enable_x64``. The integer contraction runs with ``preferred_element_type`` the
accumulator dtype on the narrowest operand dtype (``int8``/``int16`` where the formats
allow); the result is exact and is cast to the requested format with integer shifts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qjax.fixed.array import FixedArray
from qjax.fixed.cast import cast_mantissa
from qjax.fixed.format import MAX_INT32_WIDTH, MAX_WIDTH, Format, x64_enabled


def accumulator_format(a: Format, w: Format, k: int, *, what: str = "contraction") -> Format:
    """The accumulator format of a ``K``-term sum of products of ``a`` and ``w`` values.

    ``W = W_a + W_w + ⌈log2 K⌉``, ``I = I_a + I_w + ⌈log2 K⌉`` (``F = F_a + F_w``), signed
    if either operand is, saturating (it never overflows).

    Args:
      a, w: operand formats.
      k: the number of products summed (``K >= 1``).
      what: names the op in errors.

    Returns:
      The accumulator :class:`Format`.

    Raises:
      ValueError: ``K < 1``; the accumulator needs more than 63 bits; it needs more than
        31 bits and ``jax_enable_x64`` is off. The message shows the derivation.
    """
    if k < 1:
        raise ValueError(f"{what}: the contraction size K must be at least 1, got {k}")
    extra = math.ceil(math.log2(k)) if k > 1 else 0
    width = a.width + w.width + extra
    how = f"W_a + W_w + ceil(log2 K) = {a.width} + {w.width} + {extra} = {width} bits (K={k})"
    if width > MAX_WIDTH:
        raise ValueError(
            f"{what}: the accumulator needs {how}, more than the {MAX_WIDTH} a 64-bit integer holds: "
            "use narrower operand formats or split the contraction"
        )
    if width > MAX_INT32_WIDTH and not x64_enabled():
        raise ValueError(
            f"{what}: the accumulator needs {how}, more than {MAX_INT32_WIDTH}: enable jax_enable_x64 "
            "for an int64 accumulator, or use narrower operand formats"
        )
    return Format(width, a.integer + w.integer + extra, a.signed or w.signed, "TRN", "SAT")


def _operands(a: FixedArray, w: FixedArray) -> tuple[jax.Array, jax.Array]:
    """Both mantissas in one dtype, the narrowest that holds both formats."""
    dts = [a.format.narrow_dtype(), w.format.narrow_dtype()]
    dt = max(dts, key=lambda d: jnp.iinfo(d).bits)
    return jnp.asarray(a.mantissa).astype(dt), jnp.asarray(w.mantissa).astype(dt)


def _finish(acc, acc_fmt: Format, fmt: Format | None, key) -> FixedArray:
    if fmt is None:
        return FixedArray(acc.astype(acc_fmt.dtype), acc_fmt)
    if not isinstance(fmt, Format):
        raise TypeError(f"fmt must be a qjax.fixed.Format or None, got {fmt!r}")
    return FixedArray(cast_mantissa(acc, acc_fmt.fraction, fmt, key=key), fmt)


def _check(*xs) -> None:
    for x in xs:
        if not isinstance(x, FixedArray):
            raise TypeError(f"expected FixedArray operands, got {type(x).__name__}; convert with from_float")


def dot_general(
    lhs: FixedArray, rhs: FixedArray, dimension_numbers, fmt: Format | None = None, *, key=None
) -> FixedArray:
    """``lax.dot_general`` on fixed-point operands, accumulated exactly in integers.

    Args:
      lhs, rhs: ``FixedArray`` operands.
      dimension_numbers: as ``lax.dot_general``.
      fmt: the output format (the accumulator is cast to it), or ``None`` to return the
        accumulator itself (:func:`accumulator_format`).
      key: PRNG key for a ``STOCHASTIC`` output format.

    Returns:
      A ``FixedArray``.

    Raises:
      ValueError: the derived accumulator is too wide (see :func:`accumulator_format`).
    """
    _check(lhs, rhs)
    (lc, _), _ = dimension_numbers
    k = math.prod(lhs.shape[d] for d in lc)
    acc_fmt = accumulator_format(lhs.format, rhs.format, k, what="dot_general")
    a, b = _operands(lhs, rhs)
    acc = lax.dot_general(a, b, dimension_numbers, preferred_element_type=acc_fmt.dtype)
    return _finish(acc, acc_fmt, fmt, key)


def matmul(a: FixedArray, w: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``a @ w`` contracting ``a``'s last axis with ``w``'s first (``w`` 2-D); see
    :func:`dot_general`."""
    _check(a, w)
    if w.ndim != 2:
        raise ValueError(f"matmul expects a 2-D right operand, got shape {w.shape}")
    dn = (((a.ndim - 1,), (0,)), ((), ()))
    return dot_general(a, w, dn, fmt, key=key)


def conv_contraction_size(rhs_shape: Sequence[int], dimension_numbers, ndim: int) -> int:
    """Products summed per convolution output: the kernel size divided by its output
    features (input features per group × window)."""
    dn = lax.conv_dimension_numbers((1,) * ndim, tuple(rhs_shape), dimension_numbers)
    out_features = rhs_shape[dn.rhs_spec[0]]
    return max(1, math.prod(rhs_shape) // max(out_features, 1))


def conv_general_dilated(
    lhs: FixedArray,
    rhs: FixedArray,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    fmt: Format | None = None,
    *,
    key=None,
) -> FixedArray:
    """``lax.conv_general_dilated`` on fixed-point operands (``lhs`` input, ``rhs``
    kernel), accumulated exactly in integers; zero padding is exact (mantissa 0 is 0).

    Args: as ``lax.conv_general_dilated``, plus ``fmt`` and ``key`` as :func:`dot_general`.

    Returns:
      A ``FixedArray``.

    Raises:
      ValueError: the derived accumulator is too wide.
    """
    _check(lhs, rhs)
    k = conv_contraction_size(rhs.shape, dimension_numbers, lhs.ndim)
    acc_fmt = accumulator_format(lhs.format, rhs.format, k, what="conv_general_dilated")
    a, b = _operands(lhs, rhs)
    acc = lax.conv_general_dilated(
        a,
        b,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        preferred_element_type=acc_fmt.dtype,
    )
    return _finish(acc, acc_fmt, fmt, key)
