"""``quantize``, ``dequantize`` and ``compute_scale``."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.calibration import Fixed, _unsharded
from qjax.numerics.granularity import (
    Layout,
    from_grouped,
    normalize_axis,
    reduce_groups,
    scale_from_grouped,
    scale_to_grouped,
    to_grouped,
)
from qjax.numerics.packing import pack
from qjax.numerics.qarray import QArray
from qjax.numerics.scaling import compute_dtype, quantize_values, round_scale_up, scale_from_range
from qjax.numerics.spec import QuantSpec
from qjax.numerics.transposed import TransposedQArray


def as_float_array(x, name: str = "x") -> jax.Array:
    """``x`` as a JAX array, checking it is floating point.

    Raises:
      TypeError: ``x`` is not a floating-point array (the message names ``name``).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array to quantize, got dtype {x.dtype}")
    return x


def _check_spec(spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qjax.QuantSpec, got {type(spec).__name__}")
    return spec


class Grouped(NamedTuple):
    """A tensor in its grouped view with the scale that goes with it."""

    x: jax.Array  # grouped view, compute dtype
    scale: jax.Array  # grouped view, broadcastable
    zero_point: jax.Array | None
    layout: Layout


def _given(value, layout: Layout, name: str, dtype) -> jax.Array:
    value = jnp.asarray(value, dtype=dtype)
    want = layout.scale_shape
    try:
        return jnp.broadcast_to(value, want)
    except ValueError:
        raise ValueError(
            f"{name} of shape {value.shape} does not broadcast to the scale shape {want}"
        ) from None


def _check_zero_point_use(spec: QuantSpec, scale, zero_point) -> None:
    if zero_point is None:
        return
    if spec.symmetric:
        raise ValueError(
            "zero_point was given but the spec is symmetric (it has no zero point): use a spec "
            "with symmetric=False, or drop zero_point"
        )
    if scale is None:
        raise ValueError("zero_point is used only with a given scale: pass scale=... as well")


def check_zero_point(zero_point, spec: QuantSpec) -> None:
    """Refuse a given ``zero_point`` that ``spec`` cannot use, or (when concrete) whose values
    do not round into the format's code range ``[qmin, qmax]``. A traced zero point cannot
    be checked: it is clipped to the range instead (see :func:`_zero_point_codes`).

    Raises:
      ValueError: naming ``zero_point``.
    """
    if zero_point is None or spec.symmetric or isinstance(zero_point, jax.core.Tracer):
        return
    fmt = spec.format
    z = np.round(np.asarray(zero_point, np.float64))
    bad = ~((z >= fmt.qmin) & (z <= fmt.qmax))  # NaN is bad too
    if bad.any():
        raise ValueError(
            f"zero_point must round into {fmt.name}'s code range [{fmt.qmin}, {fmt.qmax}], got "
            f"{np.asarray(zero_point, np.float64)[bad].ravel()[:4].tolist()} (before rounding)"
        )


def _zero_point_codes(zero_point, fmt) -> jax.Array:
    """A given zero point as codes: rounded to nearest (ties to even) and clipped to
    ``[qmin, qmax]`` (the clip only acts on a traced value, which cannot be checked)."""
    z = jnp.round(jnp.asarray(zero_point, jnp.float32))
    return jnp.clip(z, fmt.qmin, fmt.qmax).astype(fmt.storage_dtype)


def _grouped_axis(axis: int, layout: Layout) -> int:
    """The negative index of the tensor's (negative) ``axis`` in ``layout``'s grouped view."""
    return axis - 1 if layout.group_axis is not None and axis < layout.group_axis else axis


def tiled(a: jax.Array, axis: int, size: int, op) -> jax.Array:
    """``op`` (``jnp.min`` / ``jnp.max``) over tiles of ``size`` consecutive entries along
    ``axis`` (negative; a short last tile reduces its own entries), repeated back over each
    tile: the same shape as ``a``."""
    a = _unsharded(a, tuple(range(-a.ndim, 0)))  # Explicit mesh axes: the (scale-sized) ranges whole
    n, pos = a.shape[axis], a.ndim + axis
    tiles = -(-n // size)
    if tiles * size != n:
        widths = [(0, 0)] * a.ndim
        widths[pos] = (0, tiles * size - n)
        a = jnp.pad(a, widths, mode="edge")
    t = a.reshape(*a.shape[:pos], tiles, size, *a.shape[pos + 1 :])
    t = jnp.broadcast_to(op(t, axis=pos + 1, keepdims=True), t.shape).reshape(a.shape)
    return t if tiles * size == n else jax.lax.slice_in_dim(t, 0, n, axis=pos)


def scale_grouped(x: jax.Array, spec: QuantSpec, *, scale=None, zero_point=None) -> Grouped:
    """Lay ``x`` out by ``spec``'s granularity and compute (or take) its scale.

    Shared by :func:`quantize` and ``fake_quant`` so both round identically.
    """
    _check_zero_point_use(spec, scale, zero_point)
    layout = spec.layout(x.shape)
    cdt = compute_dtype(x.dtype)
    xg = to_grouped(x.astype(cdt), layout, pad_mode="edge")
    fmt = spec.format
    axes = layout.grouped_reduce_axes()
    if scale is None:
        lo, hi = reduce_groups(lambda part: spec.calibration(part, axes, fmt, spec.symmetric), xg, layout)
        tile = spec.tile(x.ndim)
        if tile is not None:
            lo, hi = (
                tiled(a, _grouped_axis(tile[0], layout), tile[1], op)
                for a, op in ((lo, jnp.min), (hi, jnp.max))
            )
        s, zp = scale_from_range(lo, hi, fmt, spec.symmetric, spec.scale_dtype)
        check_finite = isinstance(spec.calibration, Fixed)
    else:
        s = scale_to_grouped(_given(scale, layout, "scale", cdt), layout)
        # A given scale that is not positive (e.g. an LSQ step pushed below zero by the
        # optimizer) would silently flip or zero values: make it NaN, visibly.
        s = jnp.where(s > 0, s, jnp.nan)
        zp = None
        if not spec.symmetric:
            if zero_point is None:
                raise ValueError("asymmetric quantization with a given scale also needs zero_point")
            zp = scale_to_grouped(
                _given(_zero_point_codes(zero_point, fmt), layout, "zero_point", fmt.storage_dtype), layout
            )
        check_finite = True
    if check_finite and xg.size:
        bad = jnp.any(~jnp.isfinite(xg), axis=axes, keepdims=True)
        s = jnp.where(bad, jnp.nan, s)
    if spec.scale_dtype is not None:  # round (up: no clipping) to what will be stored
        s = round_scale_up(s, spec.scale_dtype)
    # The barrier keeps XLA from folding the scale's arithmetic into the elementwise
    # division differently in different programs, so quantize/dequantize and fake_quant
    # round identically whether run eagerly or inside any jit.
    s = jax.lax.optimization_barrier(s)
    return Grouped(xg, s, zp, layout)


def compute_scale(x, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """Calibrate ``x`` per ``spec`` and return ``(scale, zero_point)`` in stored shape.

    Raises:
      TypeError: ``x`` is not floating point; ValueError: granularity does not fit ``x``.
    """
    return _compute_scale(as_float_array(x), _check_spec(spec))


@functools.partial(jax.jit, static_argnames=("spec",))
def _compute_scale(x, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    # Jitted like quantize: run op by op, percentile/MSE calibration can differ from the
    # compiled program in the last ulp, and then quantize(x, spec, scale=compute_scale(x,
    # spec)[0]) would not reproduce quantize(x, spec).
    g = scale_grouped(x, spec)
    zp = None if g.zero_point is None else scale_from_grouped(g.zero_point, g.layout)
    return stored_scale(scale_from_grouped(g.scale, g.layout), spec), zp


def stored_scale(scale: jax.Array, spec: QuantSpec) -> jax.Array:
    """``scale`` in the dtype ``spec`` stores it in (``spec.scale_dtype``, else as it is)."""
    return scale if spec.scale_dtype is None else scale.astype(spec.scale_dtype)


def quantize(
    x,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    scale=None,
    zero_point=None,
) -> QArray:
    """Quantize a float array.

    Args:
      x: floating-point array (any float dtype; bf16 is computed in float32).
      spec: the :class:`QuantSpec`.
      key: PRNG key, required when ``spec.rounding == "stochastic"``.
      scale: optional precomputed scale (broadcastable to the stored scale shape); when
        given, calibration is skipped.
      zero_point: with ``scale``, for asymmetric specs only: rounded to the nearest code
        (ties to even); a concrete value outside the format's code range is refused, a
        traced one (inside ``jit``) is clipped to it.

    Returns:
      A :class:`QArray`; ``dequantize(quantize(x, spec))`` has ``x``'s shape and dtype.
      Groups that contain NaN/Inf, or whose given scale is not positive, dequantize
      to NaN.

    Raises:
      TypeError: ``x`` is not floating point or ``spec`` is not a QuantSpec.
      ValueError: an axis is out of range, the group size does not divide, a stochastic
        spec has no key, a given scale has the wrong shape, or a given zero point is out
        of range, lacks a scale, or comes with a symmetric spec.

    Example:
      >>> q = qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))
      >>> w_hat = qjax.dequantize(q)
    """
    spec = _check_spec(spec)
    check_zero_point(zero_point, spec)
    return _quantize(as_float_array(x), spec, key, scale, zero_point)


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize(x, spec: QuantSpec, key, scale, zero_point) -> QArray:
    # Compiled once per (shape, dtype, spec): eager calls cost one dispatch, not dozens.
    g = scale_grouped(x, spec, scale=scale, zero_point=zero_point)
    layout = g.layout
    q = from_grouped(quantize_values(g.x, g.scale, g.zero_point, spec.format, spec.rounding, key), layout)
    packed_axis = packed_len = None
    if spec.packed and x.ndim > 0:
        packed_axis = normalize_axis(spec.pack_axis, x.ndim, "pack_axis")
        packed_len = x.shape[packed_axis]
        q = pack(spec.format.to_codes(q), spec.format.pack_bits, packed_axis)
    zp = None if g.zero_point is None else scale_from_grouped(g.zero_point, layout)
    return QArray(
        q,
        stored_scale(scale_from_grouped(g.scale, layout), spec),
        zp,
        format=spec.format,
        dtype=x.dtype,
        channel_axes=layout.channel_axes,
        group_axis=layout.group_axis,
        group_size=layout.group_size,
        packed_axis=packed_axis,
        packed_length=packed_len,
    )


def dequantize(q: QArray | TransposedQArray) -> jax.Array:
    """The real values a :class:`QArray` (or ``TransposedQArray``) stands for
    (``q.dequantize()``).

    Raises:
      TypeError: ``q`` is not a QArray.
    """
    if isinstance(q, TransposedQArray):
        return q.dequantize()
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a qjax.QArray, got {type(q).__name__}")
    return _dequantize(q)


_dequantize = jax.jit(lambda q: q.dequantize())
