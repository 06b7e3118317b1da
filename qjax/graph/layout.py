"""Layout ops applied to a ``QArray`` without dequantizing it.

When a params leaf reaches a matmul through transposes, reshapes, dtype casts,
broadcasts or slices, the graph layer replays those ops on the integer codes and on
the scale, so the matmul sees the quantized weight in the operand's own layout.
:func:`apply_layout` returns ``None`` when a scale cannot follow an op exactly (e.g. a
reshape that merges a per-group axis); the caller then falls back to the float path.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from qjax.numerics.qarray import QArray, channel_axes_from_scale

# ops that keep every element's value and position (a dtype cast rounds it): a weight
# passes through them unchanged for every purpose but its dtype and its gradient
IDENTITY_LAYOUT = frozenset(
    {"convert_element_type", "copy", "copy_p", "pvary", "stop_gradient", "optimization_barrier"}
)
LAYOUT_PRIMITIVES = IDENTITY_LAYOUT | {
    "transpose",
    "reshape",
    "broadcast_in_dim",
    "squeeze",
    "slice",
    "dynamic_slice",
    "rev",
}


def unpacked(q: QArray) -> QArray:
    """The same ``QArray`` with int4/int2 codes unpacked to one per byte."""
    if q.packed_axis is None:
        return q
    return _rebuild(q, q.unpacked_values(), q.scale, q.zero_point, q.group_axis)


def leading_slice(q: QArray) -> QArray:
    """Fix up a ``QArray`` whose children lost leading axes (a ``scan``/``vmap`` slice of a
    stacked weight): negative axes still point at the same dims; channel axes that named
    a removed leading axis are dropped (each slice has its own scale there).

    Raises:
      ValueError: the group or packed axis was the sliced one.
    """
    ndim = len(q.values.shape)
    for name in ("group_axis", "packed_axis"):
        a = getattr(q, name)
        if a is not None and a < -ndim:
            raise ValueError(f"cannot slice a stacked QArray along its {name.replace('_', ' ')} ({a})")
    chans = tuple(a for a in q.channel_axes if a >= -ndim)
    if chans == q.channel_axes:
        return q
    aux = (q.format, q.dtype, chans, q.group_axis, q.group_size, q.packed_axis, q.packed_length)
    return QArray.tree_unflatten(aux, [q.values, q.scale, q.zero_point, q.act_scale, q.act_zero_point])


def _rebuild(q: QArray, values, scale, zero_point, group_axis, dtype=None) -> QArray:
    """A QArray from transformed parts; channel axes are read off the scale's shape."""
    ndim = values.ndim
    pos_g = None if group_axis is None else group_axis % ndim
    chans = channel_axes_from_scale(values.shape, scale.shape, group_axis)
    return QArray(
        values,
        scale,
        zero_point,
        act_scale=q.act_scale,
        act_zero_point=q.act_zero_point,
        format=q.format,
        dtype=q.dtype if dtype is None else dtype,
        channel_axes=chans,
        group_axis=None if pos_g is None else pos_g - ndim,
        group_size=q.group_size if pos_g is not None else None,
    )


def _map_parts(q: QArray, fn_values, fn_scale):
    zp = None if q.zero_point is None else fn_scale(q.zero_point)
    return fn_values(q.values), fn_scale(q.scale), zp


def _transpose(q: QArray, permutation) -> QArray:
    perm = tuple(permutation)
    values, scale, zp = _map_parts(q, lambda v: jnp.transpose(v, perm), lambda s: jnp.transpose(s, perm))
    g = None if q.group_axis is None else perm.index(q.group_axis % q.ndim)
    return _rebuild(q, values, scale, zp, g)


def _reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
    """Pair contiguous runs of non-unit dims of ``old`` and ``new`` with equal products.
    Returns ``[(old_dims, new_dims), ...]`` or ``None`` if the shapes do not factor."""
    a = [i for i, s in enumerate(old) if s != 1]
    b = [j for j, s in enumerate(new) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [a[i]] if i < len(a) else [], [b[j]] if j < len(b) else []
        if not gi or not gj:
            return None
        pi, pj = old[a[i]], new[b[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                gi.append(a[i])
                pi *= old[a[i]]
                i += 1
            elif pj < pi and j < len(b):
                gj.append(b[j])
                pj *= new[b[j]]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshape(q: QArray, new_sizes, dimensions) -> QArray | None:
    if dimensions is not None:
        return None
    old, new = q.shape, tuple(int(s) for s in new_sizes)
    groups = _reshape_groups(old, new)
    if groups is None:
        return None
    g_old = None if q.group_axis is None else q.group_axis % q.ndim
    new_scale_shape = [1] * len(new)
    g_new = None
    for gi, gj in groups:
        full = [q.scale.shape[d] == old[d] for d in gi]
        if g_old is not None and g_old in gi:
            if len(gi) != 1 or len(gj) != 1:
                return None  # a reshape through the group axis would mix groups
            g_new = gj[0]
            new_scale_shape[gj[0]] = q.scale.shape[g_old]
        elif all(full):
            for d in gj:
                new_scale_shape[d] = new[d]
        elif any(full):
            return None  # part of a merged run has per-channel scales: not representable
    values, scale, zp = _map_parts(q, lambda v: v.reshape(new), lambda s: s.reshape(tuple(new_scale_shape)))
    return _rebuild(q, values, scale, zp, g_new)


def _broadcast_in_dim(q: QArray, shape, broadcast_dimensions) -> QArray:
    shape = tuple(shape)
    sshape = [1] * len(shape)
    for i, d in enumerate(broadcast_dimensions):
        sshape[d] = q.scale.shape[i]
    values, scale, zp = _map_parts(
        q,
        lambda v: lax.broadcast_in_dim(v, shape, broadcast_dimensions),
        lambda s: lax.broadcast_in_dim(s, tuple(sshape), broadcast_dimensions),
    )
    g = None if q.group_axis is None else broadcast_dimensions[q.group_axis % q.ndim]
    return _rebuild(q, values, scale, zp, g)


def axis_after_squeeze(axis: int, dims, ndim: int) -> int | None:
    """Axis ``axis`` of a rank-``ndim`` array once the axes ``dims`` (non-negative) are
    squeezed away, as a negative index; ``None`` if it is one of them."""
    pos = axis % ndim
    return None if pos in dims else pos - sum(d < pos for d in dims) - (ndim - len(dims))


def _squeeze(q: QArray, dimensions) -> QArray:
    """Drop size-1 axes; packed int4/int2 codes stay packed unless the packed axis goes."""
    ndim = q.ndim
    dims = tuple(sorted({d % ndim for d in dimensions}))
    if q.packed_axis is not None and q.packed_axis % ndim in dims:
        q = unpacked(q)

    def moved(a):
        return axis_after_squeeze(a, dims, ndim)

    values, scale, zp = _map_parts(q, lambda v: lax.squeeze(v, dims), lambda s: lax.squeeze(s, dims))
    group = None if q.group_axis is None else moved(q.group_axis)
    return QArray(
        values,
        scale,
        zp,
        act_scale=q.act_scale,
        act_zero_point=q.act_zero_point,
        format=q.format,
        dtype=q.dtype,
        channel_axes=tuple(c for a in q.channel_axes if (c := moved(a)) is not None),
        group_axis=group,
        group_size=None if group is None else q.group_size,
        packed_axis=None if q.packed_axis is None else moved(q.packed_axis),
        packed_length=None if q.packed_axis is None else q.packed_length,
    )


def _scale_slice(q: QArray, starts, limits) -> tuple[list[int], list[int]] | None:
    """Slice bounds for the scale; ``None`` if a slice cuts through a group."""
    s_start, s_limit = [], []
    g = None if q.group_axis is None else q.group_axis % q.ndim
    for d, (lo, hi) in enumerate(zip(starts, limits)):
        if d == g:
            gs = q.group_size
            if lo % gs or (hi % gs and hi != q.shape[d]):
                return None
            s_start.append(lo // gs)
            s_limit.append(-(-hi // gs))
        elif q.scale.shape[d] == 1:
            s_start.append(0)
            s_limit.append(1)
        else:
            s_start.append(lo)
            s_limit.append(hi)
    return s_start, s_limit


def _slice(q: QArray, start_indices, limit_indices, strides) -> QArray | None:
    """A (strided) slice; ``None`` when it cuts through a group or strides along the group axis."""
    strides = tuple(strides) if strides is not None else (1,) * q.ndim
    g = None if q.group_axis is None else q.group_axis % q.ndim
    if g is not None and strides[g] != 1:
        return None
    bounds = _scale_slice(q, start_indices, limit_indices)
    if bounds is None:
        return None
    # a scale that varies along an axis (per channel) takes the same stride; a broadcast one none
    s_strides = tuple(st if q.scale.shape[d] > 1 else 1 for d, st in enumerate(strides))
    values, scale, zp = _map_parts(
        q,
        lambda v: lax.slice(v, start_indices, limit_indices, strides),
        lambda s: lax.slice(s, bounds[0], bounds[1], s_strides),
    )
    return _rebuild(q, values, scale, zp, q.group_axis)


def _dynamic_slice(q: QArray, starts, slice_sizes) -> QArray | None:
    g = None if q.group_axis is None else q.group_axis % q.ndim
    if g is not None and slice_sizes[g] != q.shape[g]:
        return None  # the start along the group axis is dynamic: cannot prove alignment
    s_starts, s_sizes = [], []
    for d, (start, size) in enumerate(zip(starts, slice_sizes)):
        full = q.scale.shape[d] == q.shape[d] and d != g
        s_starts.append(start if full else 0)
        s_sizes.append(size if full else q.scale.shape[d])
    values, scale, zp = _map_parts(
        q,
        lambda v: lax.dynamic_slice(v, starts, slice_sizes),
        lambda s: lax.dynamic_slice(s, s_starts, s_sizes),
    )
    return _rebuild(q, values, scale, zp, q.group_axis)


def _rev(q: QArray, dimensions) -> QArray | None:
    """Reverse axes; ``None`` when a reversed group axis is not a whole number of groups."""
    g = None if q.group_axis is None else q.group_axis % q.ndim
    dims = tuple(d % q.ndim for d in dimensions)
    if g in dims and q.shape[g] % q.group_size:
        return None
    scale_dims = tuple(d for d in dims if q.scale.shape[d] > 1)
    values, scale, zp = _map_parts(q, lambda v: lax.rev(v, dims), lambda s: lax.rev(s, scale_dims))
    return _rebuild(q, values, scale, zp, q.group_axis)


def apply_layout(
    q: QArray, primitive: str, params: dict[str, Any], operands: tuple = (), op=None
) -> QArray | None:
    """Replay one layout primitive on a ``QArray``.

    Args:
      q: the quantized array (packed codes are unpacked first).
      primitive: primitive name, one of :data:`LAYOUT_PRIMITIVES`.
      params: the equation's params.
      operands: the primitive's other operands (start indices of ``dynamic_slice``).
      op: ``x -> primitive.bind(x, **params)``, for primitives replayed as they are.

    Returns:
      The transformed ``QArray``, or ``None`` when its scales cannot follow the op.
    """
    if primitive == "squeeze":
        return _squeeze(q, params["dimensions"])
    q = unpacked(q)
    if primitive in ("copy", "copy_p", "stop_gradient", "optimization_barrier"):
        return q  # the codes carry no gradient; a barrier only orders float computations
    if primitive == "pvary":  # shard_map bookkeeping: mark every part as varying
        values, scale, zp = _map_parts(q, lambda v: op(v), lambda s: op(s))
        return _rebuild(q, values, scale, zp, q.group_axis)
    if primitive == "convert_element_type":
        dtype = jnp.dtype(params["new_dtype"])
        if not jnp.issubdtype(dtype, jnp.floating):
            return None
        return _rebuild(q, q.values, q.scale, q.zero_point, q.group_axis, dtype=dtype)
    if primitive == "transpose":
        return _transpose(q, params["permutation"])
    if primitive == "reshape":
        return _reshape(q, params["new_sizes"], params.get("dimensions"))
    if primitive == "broadcast_in_dim":
        return _broadcast_in_dim(q, params["shape"], params["broadcast_dimensions"])
    if primitive == "slice":
        return _slice(q, params["start_indices"], params["limit_indices"], params.get("strides"))
    if primitive == "dynamic_slice":
        return _dynamic_slice(q, list(operands), params["slice_sizes"])
    if primitive == "rev":
        return _rev(q, params["dimensions"])
    return None
