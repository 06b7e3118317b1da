"""Weights as the graph walker sees them: a :class:`WeightRef` is a params leaf (or a view
of it) flowing through a jaxpr, with the layout ops (:class:`LayoutOp`) applied to it since;
the views that ``jnp.split`` / ``jnp.unstack`` make of it; and how a stacked weight's
views become views of one slice inside a ``scan``."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax import lax

from qjax.graph.layout import IDENTITY_LAYOUT
from qjax.numerics.transposed import is_quantized


@dataclasses.dataclass(frozen=True)
class LayoutOp:
    """One layout equation applied to a weight: primitive, params, extra operands."""

    primitive: Any
    params: dict
    operands: tuple = ()

    def apply(self, x):
        out = self.primitive.bind(x, *self.operands, **self.params)
        return out[0] if self.primitive.multiple_results else out  # optimization_barrier


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """A params leaf (or a layout view of it) flowing through the jaxpr.

    Attributes:
      path: the leaf's path (the op identity of everything that reads it).
      leaf: the stored leaf: a ``QArray``, a ``TransposedQArray`` or a float array (a
        per-iteration slice inside a ``scan`` over stacked params). A ``TransposedQArray``
        stands for its logical layout (:meth:`float_leaf`, specs); handlers that read codes
        unwrap it themselves.
      ops: layout ops applied since the leaf, in order.
      depth: how many leading axes of the params leaf enclosing ``scan``s sliced off
        (a spec written for the stacked leaf is adapted with :func:`spec_for_slice`).
      aux: an array the handler keeps with the leaf (:meth:`Handler.aux`, e.g. a learned
        LSQ scale); a ``scan`` over the stacked leaf slices it too (a leading axis of
        size 1 is shared by every slice).
      aux_shared: how many slices share the first array of ``aux`` (the product of the lengths of the
        enclosing scans that did not slice it).
      shard_axes: inside a ``shard_map`` body, the manual mesh axes that split each axis
        of ``leaf`` (its logical layout; ``()`` for a whole axis): the leaf is a shard.
        Empty outside ``shard_map``.
    """

    path: str
    leaf: Any
    ops: tuple[LayoutOp, ...] = ()
    depth: int = 0  # leading (stacked) axes of the params leaf sliced off by enclosing scans
    aux: Any = None
    aux_shared: int = 1
    shard_axes: tuple[tuple[str, ...], ...] = ()

    def float_leaf(self):
        return self.leaf.dequantize() if is_quantized(self.leaf) else self.leaf


def spec_for_slice(spec, depth: int):
    """A weight spec written for a stacked params leaf, adapted to one ``scan`` slice of
    it (``depth`` leading axes removed): non-negative axes shift down, axes that named a
    stacked dim are dropped (each slice gets its own scales there), negative axes stay.

    Raises:
      ValueError: the spec's group axis is a stacked dim.
    """
    if depth == 0 or spec is None:
        return spec
    from qjax.numerics.spec import PER_TOKEN

    def shift(a):
        return a if a < 0 else a - depth

    changes = {}
    if spec.channel_axes is not PER_TOKEN:
        changes["channel_axes"] = tuple(shift(a) for a in spec.channel_axes if a < 0 or a >= depth)
    if spec.group_axis is not None:
        if 0 <= spec.group_axis < depth:
            raise ValueError(f"group_axis={spec.group_axis} is a stacked (scanned) axis of the leaf")
        changes["group_axis"] = shift(spec.group_axis)
    if spec.pack_axis >= 0:
        changes["pack_axis"] = max(spec.pack_axis - depth, 0)
    if spec.tile_axis is not None:
        if 0 <= spec.tile_axis < depth:
            raise ValueError(f"tile_axis={spec.tile_axis} is a stacked (scanned) axis of the leaf")
        changes["tile_axis"] = shift(spec.tile_axis)
    return spec.replace(**changes)


def weight_operand(invals) -> int | None:
    """Index of the single ``WeightRef`` among a binary target op's first two operands
    (``None`` if both or neither are weights)."""
    refs = [i for i in (0, 1) if isinstance(invals[i], WeightRef)]
    return refs[0] if len(refs) == 1 else None


RAGGED_DIMS = ((((1,), (1,)), ((), ())), (0,), (0,))  # (M, K) x (G, K, N), groups along M


def ragged_weight(eqn, invals) -> WeightRef | None:
    """The expert weight of a ``lax.ragged_dot`` of an activation ``(M, K)`` and a params
    leaf ``(G, K, N)`` (the standard dimension numbers), or ``None``."""
    if eqn.primitive.name != "ragged_dot_general" or len(invals) != 3:
        return None
    lhs, rhs, sizes = invals
    if not isinstance(rhs, WeightRef) or isinstance(lhs, WeightRef) or isinstance(sizes, WeightRef):
        return None
    d = eqn.params.get("ragged_dot_dimension_numbers")
    dims = (d.dot_dimension_numbers, tuple(d.lhs_ragged_dimensions), tuple(d.rhs_group_dimensions))
    if eqn.params.get("group_offset") is not None or dims != RAGGED_DIMS:
        return None
    return rhs if len(eqn.invars[1].aval.shape) == 3 else None


def leaf_axes(ref: WeightRef, ndim: int) -> list[int] | None:
    """For each axis of the weight as the op sees it (``ndim`` axes), the axis of ``ref``'s
    leaf (a ``scan`` slice inside a loop) it is, through transposes and dtype conversions;
    ``None`` when another layout op (a reshape, a slice) came between."""
    axes = list(range(ndim))
    for op in reversed(ref.ops):
        if op.primitive.name == "transpose":
            perm = op.params["permutation"]
            axes = [perm[a] for a in axes]
        elif op.primitive.name not in IDENTITY_LAYOUT:
            return None
    return axes


def materialize(value):
    """The float value of a ``WeightRef`` (dequantized, layout ops replayed); other
    values are returned as they are."""
    if not isinstance(value, WeightRef):
        return value
    x = value.float_leaf()
    for op in value.ops:
        x = op.apply(x)
    return x


def split_views(eqn, ref: WeightRef) -> list[WeightRef]:
    """``jnp.split`` of a weight (a fused QKV projection): one ``slice`` layout op per
    part, so each part reaches its matmul as a view of the leaf, as ``w[:, a:b]`` does."""
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    shape = eqn.invars[0].aval.shape
    outs, start = [], 0
    for size in sizes:
        begin = [0] * len(shape)
        end = list(shape)
        begin[axis], end[axis] = start, start + size
        params = {"start_indices": tuple(begin), "limit_indices": tuple(end), "strides": None}
        op = LayoutOp(lax.slice_p, params)
        outs.append(dataclasses.replace(ref, ops=(*ref.ops, op)))
        start += size
    return outs


def unstack_views(eqn, ref: WeightRef) -> list[WeightRef]:
    """``jnp.unstack`` of a weight (a primitive since jax 0.10): a view per index, the
    ``slice`` + ``squeeze`` that ``w[i]`` is."""
    axis = eqn.params["axis"]
    shape = eqn.invars[0].aval.shape
    axis %= len(shape)
    outs = []
    for i in range(shape[axis]):
        begin, end = [0] * len(shape), list(shape)
        begin[axis], end[axis] = i, i + 1
        bounds = {"start_indices": tuple(begin), "limit_indices": tuple(end), "strides": None}
        cut = LayoutOp(lax.slice_p, bounds)
        drop = LayoutOp(lax.squeeze_p, {"dimensions": (axis,)})
        outs.append(dataclasses.replace(ref, ops=(*ref.ops, cut, drop)))
    return outs


def slice_views(ops: tuple[LayoutOp, ...], length: int) -> tuple[LayoutOp, ...] | None:
    """The layout ops of a view of a stacked leaf (``length`` layers along axis 0) as ops
    on one layer's slice, or ``None`` when an op moves, merges or slices that axis.

    Casts, copies, ``stop_gradient``, transposes that keep axis 0 first, squeezes and
    reversals of other axes, and reshapes that keep the leading ``length`` (row-major: each layer stays
    whole) commute with taking a layer, so a ``scan`` slices the stored leaf and replays
    them: ``jax.tree.map(lambda a: a.astype(bf16), params)`` before an ``nn.scan`` stack
    keeps one op per layer."""
    out = []
    for op in ops:
        name, p = op.primitive.name, dict(op.params)
        if op.operands:
            return None
        if name in IDENTITY_LAYOUT:
            pass
        elif name == "transpose" and p["permutation"][0] == 0:
            p["permutation"] = tuple(a - 1 for a in p["permutation"][1:])
        elif name in ("squeeze", "rev") and all(d > 0 for d in p["dimensions"]):
            p["dimensions"] = tuple(d - 1 for d in p["dimensions"])
        elif (
            name == "reshape"
            and p.get("dimensions") is None
            and p.get("sharding") is None
            and p["new_sizes"][0] == length
        ):
            p["new_sizes"] = tuple(p["new_sizes"][1:])
        else:
            return None
        out.append(LayoutOp(op.primitive, p))
    return tuple(out)
