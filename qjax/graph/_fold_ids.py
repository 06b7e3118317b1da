"""Channel identities through single ops, for :mod:`qjax.graph.fold`: which input channel
each output element carries (an index array follows every channel), or ``None`` when an
op mixes channels."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qjax.graph.layout import _reshape_groups

_IDENTITY = frozenset(
    "convert_element_type copy copy_p reduce_precision sharding_constraint pvary neg stop_gradient "
    "optimization_barrier".split()
)


@dataclasses.dataclass
class _Node:
    prim: str
    params: dict
    ins: list  # int value keys or _Lit
    outs: list[int]
    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class _Lit:
    val: Any


@dataclasses.dataclass
class _View:
    """A params leaf seen through layout ops."""

    path: str
    leaf_shape: tuple[int, ...]
    parent: int | None  # the view it was computed from (None: the leaf itself)
    node: _Node | None
    leaf_axes: list[int] | None  # view axis -> leaf axis, while only transposes/casts were applied


def _to_rank(ids: np.ndarray, ndim: int) -> np.ndarray:
    return ids.reshape((1,) * (ndim - ids.ndim) + ids.shape) if ids.ndim < ndim else ids


def _reshape_ids(ids: np.ndarray, old: tuple[int, ...], new: tuple[int, ...]) -> np.ndarray | None:
    """Channel ids through a reshape; ``ids`` has ``old``'s rank with size 1 on the axes that
    carry no channel. Contiguous runs of axes are reshaped independently."""
    groups = _reshape_groups(tuple(old), tuple(new))
    if groups is None:
        return None
    full_old, full_new = [1] * len(old), [1] * len(new)
    for gi, gj in groups:
        if any(ids.shape[d] > 1 for d in gi):
            for d in gi:
                full_old[d] = old[d]
            for d in gj:
                full_new[d] = new[d]
    out = np.broadcast_to(ids, full_old).reshape(full_new)
    for d in range(out.ndim):
        first = np.take(out, [0], axis=d)
        if out.shape[d] > 1 and (out == first).all():
            out = first
    return out


def _transfer(node: _Node, ids: np.ndarray) -> np.ndarray | None:
    """Channel ids of a unary op's output, or ``None`` if the op mixes channels."""
    name, p = node.prim, node.params
    in_shape, out_shape = node.in_shapes[0], node.out_shapes[0]
    full = [d for d in range(ids.ndim) if ids.shape[d] > 1]
    if name in _IDENTITY:
        return ids
    if name == "transpose":
        return ids.transpose(p["permutation"])
    if name == "reshape":
        return None if p.get("dimensions") is not None else _reshape_ids(ids, in_shape, out_shape)
    if name == "broadcast_in_dim":
        dims = dict(zip(p["broadcast_dimensions"], ids.shape))
        shape = [dims.get(d, 1) for d in range(len(out_shape))]
        return ids.transpose(np.argsort(p["broadcast_dimensions"])).reshape(shape)
    if name == "squeeze":
        dims = {d % ids.ndim for d in p["dimensions"]}
        return ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])
    if name == "slice":
        bounds = zip(p["start_indices"], p["limit_indices"], p.get("strides") or (1,) * ids.ndim)
        return ids[tuple(slice(*b) if d in full else slice(None) for d, b in enumerate(bounds))]
    if name == "rev":
        return np.flip(ids, [d for d in p["dimensions"] if d in full]) if full else ids
    if name == "dynamic_slice":
        return ids if all(p["slice_sizes"][d] == in_shape[d] for d in full) else None
    if name in ("reduce_sum", "reduce_max", "reduce_min"):
        axes = set(p["axes"])
        return (
            None if axes & set(full) else ids.reshape([s for d, s in enumerate(ids.shape) if d not in axes])
        )
    return None
