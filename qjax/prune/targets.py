"""Pruning targets, and leaves that stack several layers (an ``nn.scan`` stack ``(L, K, N)``):
each layer is counted and ranked as its own leaf, so a stack is pruned exactly as the
unrolled model would be (see :class:`~qjax.prune.sparsity.LeafConfig` ``stack``)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax

from qjax.prune.distribution import leaf_counts
from qjax.prune.sparsity import SparsityType, target_count

__all__ = ["Target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A targeted leaf: its path, shape, sparsity override (``None``: the pruner's) and type;
    ``stack`` leading axes of stacked layers, each pruned as its own leaf with ``layer_type``
    (0 and ``None`` when the leaf is decided as a whole)."""

    path: str
    shape: tuple[int, ...]
    sparsity: float | None
    sparsity_type: SparsityType
    stack: int = 0
    layer_type: SparsityType | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def layers(self) -> int:
        return math.prod(self.shape[: self.stack])

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[self.stack :]


def make_target(path: str, shape: tuple, sparsity: Any, stype: SparsityType, stack: int) -> Target:
    if not stack:
        return Target(path, shape, sparsity, stype)
    if stack >= len(shape):
        raise ValueError(f"leaf {path!r} of shape {shape} cannot have {stack} stacked-layer axes")
    layer_type = stype.per_layer(stack)
    if layer_type is None:  # decided as a whole (the same channels in every layer, N:M groups)
        return Target(path, shape, sparsity, stype)
    layer_type.validate(path, shape[stack:])
    return Target(path, shape, sparsity, stype, stack, layer_type)


@functools.partial(jax.jit, static_argnums=(0, 1))
def stacked_select(stype: SparsityType, stack: int, score: jax.Array, counts: jax.Array) -> jax.Array:
    layers = score.reshape(-1, *score.shape[stack:])
    keep = jax.vmap(lambda s, c: stype.leaf_mask(s, c, ""))(layers, counts)
    return keep.reshape(score.shape)


def uniform_count(t: Target, sparsity: Any) -> Any:
    """The leaf's count at ``sparsity``, per layer for a stack (each rounded as a leaf)."""
    if t.stack:
        return [target_count(sparsity, math.prod(t.layer_shape))] * t.layers
    return target_count(sparsity, t.size)


def layer_counts(pool: dict[str, Target], sparsity: Any, distribution: Any) -> dict[str, Any]:
    """Per-leaf counts of a distribution, a stack's layers entering it as separate leaves
    (``path[i]``), exactly as the unrolled model's would."""
    shapes = {}
    for p, t in pool.items():
        if t.stack:
            shapes.update({f"{p}[{i}]": t.layer_shape for i in range(t.layers)})
        else:
            shapes[p] = t.shape
    counts = leaf_counts(shapes, sparsity, distribution)
    return {
        p: [counts[f"{p}[{i}]"] for i in range(t.layers)] if t.stack else counts[p] for p, t in pool.items()
    }
