"""Fixed-point matmul and convolution with a derived wide accumulator.

A contraction of ``K`` products of ``W_a``-bit and ``W_w``-bit mantissas cannot overflow
an accumulator of ``W_a + W_w + ⌈log2 K⌉`` bits (each product is at most
``2^(W_a + W_w - 2)`` in magnitude). :func:`accumulator_format` derives that format
(``F = F_a + F_w``) and checks it: more than 63 bits is an error, more than 31 needs
``jax_enable_x64``. The integer contraction runs with ``preferred_element_type`` the
accumulator dtype on the narrowest operand dtype (``int8``/``int16`` where the formats
allow); the result is exact and is cast to the requested format with integer shifts.

``dot_general`` also models a user accumulator (hls4ml's ``accum_t``, as in
``nnet::dense_latency``): with ``accum=`` every product is cast to ``accum`` (its rounding
and overflow), the accumulator starts at ``init`` (the bias) cast to ``accum``, the
products are added one contraction index at a time, each partial sum cast to ``accum``
(overflow; the fractions agree), and the sum is cast once to the output format. When
``accum`` provably neither rounds nor overflows, the exact contraction gives the same
result and is used instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from qjax.fixed.arith import add
from qjax.fixed.array import FixedArray
from qjax.fixed.cast import cast, cast_mantissa
from qjax.fixed.format import MAX_INT32_WIDTH, MAX_WIDTH, Format, exact_add_format, x64_enabled


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
    lhs: FixedArray,
    rhs: FixedArray,
    dimension_numbers,
    fmt: Format | None = None,
    *,
    accum: Format | None = None,
    init: FixedArray | None = None,
    key=None,
) -> FixedArray:
    """``lax.dot_general`` on fixed-point operands, accumulated exactly in integers or in
    a user accumulator format.

    Args:
      lhs, rhs: ``FixedArray`` operands.
      dimension_numbers: as ``lax.dot_general``.
      fmt: the output format (the accumulator is cast to it), or ``None`` to return the
        accumulator itself.
      accum: the accumulator format (hls4ml's ``accum_t``): each product is cast to it,
        the partial sums are accumulated in it in contraction order (row-major over
        the contracting dims), each cast with its overflow mode. ``None``: the exact
        derived accumulator (:func:`accumulator_format`).
      init: a ``FixedArray`` broadcastable to the output (a bias) the accumulator starts
        at: cast to ``accum``, or added exactly to the exact accumulator.
      key: PRNG key for ``STOCHASTIC`` output (or accumulator) rounding.

    Returns:
      A ``FixedArray``.

    Raises:
      TypeError: an operand, ``init`` or ``accum`` of the wrong type.
      ValueError: the derived accumulator is too wide (see :func:`accumulator_format`).
    """
    _check(lhs, rhs, *([] if init is None else [init]))
    if accum is not None and not isinstance(accum, Format):
        raise TypeError(f"accum must be a qjax.fixed.Format or None, got {accum!r}")
    (lc, _), _ = dimension_numbers
    k = math.prod(lhs.shape[d] for d in lc)
    acc_fmt = accumulator_format(lhs.format, rhs.format, k, what="dot_general")
    if accum is not None and not _accum_is_exact(acc_fmt, accum, init):
        k_out, k_acc = (None, None) if key is None else jax.random.split(key)
        acc = _accumulate(lhs, rhs, dimension_numbers, accum, init, k_acc)
        return acc if fmt is None else cast(acc, fmt, key=k_out)
    a, b = _operands(lhs, rhs)
    acc = FixedArray(lax.dot_general(a, b, dimension_numbers, preferred_element_type=acc_fmt.dtype), acc_fmt)
    if init is not None:
        acc = add(acc, init)
    if accum is not None and fmt is None:
        fmt = accum  # exact, so this cast only re-labels the format
    return _finish(acc.mantissa, acc.format, fmt, key)


def _accum_is_exact(acc_fmt: Format, accum: Format, init: FixedArray | None) -> bool:
    """Whether accumulating in ``accum`` provably equals the exact sum: no product or bias
    loses fraction bits and every partial sum (at most the exact sum's range) fits."""
    total = acc_fmt if init is None else exact_add_format(acc_fmt, init.format)
    if accum.fraction < total.fraction or (total.signed and not accum.signed):
        return False
    bits = total.integer + (1 if accum.signed and not total.signed else 0)
    return accum.integer >= bits


def _accumulate(lhs, rhs, dimension_numbers, accum: Format, init, key) -> FixedArray:
    """hls4ml's ``dense_latency`` order: ``acc = (accum_t) init``, then for each contraction
    index ``acc += (accum_t) (lhs_k * rhs_k)``, in ``accum`` throughout."""
    (lc, rc), _ = dimension_numbers
    sizes = tuple(lhs.shape[d] for d in lc)
    one = lambda x, d, i: lax.dynamic_slice_in_dim(x, i, 1, axis=d)
    shape = jax.eval_shape(
        lambda a, b: lax.dot_general(a, b, dimension_numbers), lhs.mantissa, rhs.mantissa
    ).shape
    # the bias cast draws from its own key, independent of the per-product ones
    k_init, k_steps = (None, None) if key is None else jax.random.split(key)
    if init is None:
        acc0 = FixedArray(jnp.zeros(shape, accum.dtype), accum)
    else:
        acc0 = cast(FixedArray(jnp.broadcast_to(init.mantissa, shape), init.format), accum, key=k_init)

    def step(i, acc):
        idx = jnp.unravel_index(i, sizes)
        a, b = lhs.mantissa, rhs.mantissa
        for d_l, d_r, j in zip(lc, rc, idx):
            a, b = one(a, d_l, j), one(b, d_r, j)
        k_i = None if k_steps is None else jax.random.fold_in(k_steps, i)
        term = dot_general(
            FixedArray(a, lhs.format), FixedArray(b, rhs.format), dimension_numbers, accum, key=k_i
        )
        return add(acc, term, accum)

    return lax.fori_loop(0, math.prod(sizes), step, acc0)


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
