"""Sparsity types (which groups of weights are pruned together) and the exact rank-based
selection that every pruner shares.

A sparsity type splits a leaf into *units* and says how a unit is scored:

* :class:`Unstructured` — every element is a unit (optionally ranked separately within
  each slice along an axis, e.g. Wanda's per-output comparison group);
* :class:`NM` — N:M semi-structured: in every group of ``m`` consecutive elements along
  ``axis`` exactly ``n`` are kept; the requested sparsity is ignored (density is n/m);
* :class:`Block` — rectangular blocks on the last two axes (partial edge blocks allowed);
* :class:`Channel` — whole slices along ``axis`` (e.g. output channels, ``axis=-1`` for
  Dense ``(in, out)`` and Conv ``(h, w, in, out)`` kernels).

A unit's score is the mean of its elements' scores. Units are ranked by score, and pruned
from the lowest up. The rules (details in :func:`select_prune`):

* rounding: a sparsity ``s`` over ``n`` elements prunes ``floor(s*n + 0.5)`` (round half
  up; :func:`target_count`); structured units are pruned while at least half of the next
  unit fits in that budget;
* ties: equal scores are pruned in index order (lower flat index first; across leaves
  in global scope, the earlier leaf in flatten order first);
* NaN: a NaN score is the lowest priority to keep: NaN weights are pruned first, and a
  block/channel containing a NaN has a NaN mean and is pruned first.

Everything here is jit-safe: shapes are static, the sparsity may be a traced scalar
(selection is by rank with a stable sort, no Python branching on values).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "NM",
    "Block",
    "Channel",
    "LeafConfig",
    "SparsityType",
    "Unstructured",
    "check_sparsity",
    "select_prune",
    "target_count",
    "top_units",
]


# -- counts and ranking --------------------------------------------------------------------


def check_sparsity(sparsity: Any, what: str = "sparsity") -> Any:
    """Validate a sparsity: a Python/NumPy number must lie in ``[0, 1]`` (returned as a
    Python float); a scalar JAX array is returned as is, checked when concrete (a traced
    value cannot be checked: it is clipped to ``[0, 1]`` where it is used).

    Raises:
      ValueError: a concrete value outside ``[0, 1]`` or NaN (names ``what``).
      TypeError: not a number or scalar array.

    Example:
      >>> check_sparsity(0.9)
      0.9
    """
    if isinstance(sparsity, bool):
        raise TypeError(f"{what} must be a float in [0, 1], got {sparsity!r}")
    if isinstance(sparsity, numbers.Real) or (isinstance(sparsity, np.ndarray) and sparsity.ndim == 0):
        s = float(sparsity)
        if not 0.0 <= s <= 1.0:  # NaN fails too
            raise ValueError(f"{what} must be in [0, 1], got {sparsity!r}")
        return s
    if isinstance(sparsity, jax.Array) and sparsity.ndim == 0:
        if not isinstance(sparsity, jax.core.Tracer):
            s = float(sparsity)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], got {s!r}")
        return sparsity
    raise TypeError(f"{what} must be a float in [0, 1] or a scalar array, got {sparsity!r}")


def target_count(sparsity: Any, n: int) -> Any:
    """How many of ``n`` elements a sparsity prunes: ``floor(sparsity * n + 0.5)`` (round
    half up), clipped to ``[0, n]``.

    A Python float is computed exactly in float64 (a Python ``int`` comes back); a JAX
    array (e.g. a traced schedule value) in float32 (an int32 scalar comes back), which is
    exact while ``n < 2**24`` and otherwise off by at most float32 rounding of
    ``sparsity * n``.

    Example:
      >>> target_count(0.5, 5), target_count(0.25, 2), target_count(0.3, 10)
      (3, 1, 3)
    """
    if isinstance(sparsity, float | int | np.floating | np.integer):
        return min(max(math.floor(float(sparsity) * n + 0.5), 0), n)
    s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    k = jnp.floor(s * jnp.float32(n) + 0.5).astype(jnp.int32)
    return jnp.clip(k, 0, n)


def _rank_order(scores: jax.Array, protected: jax.Array | None = None) -> jax.Array:
    """Indices of ``scores`` (1-D) from first-to-prune to last: protected units last, then
    NaN first, then ascending score, ties by ascending index (stable sort)."""
    s = scores.astype(jnp.float32)
    keys = [s, ~jnp.isnan(s)]
    if protected is not None:
        keys.append(protected)
    return jnp.lexsort(tuple(keys))


def _order_keys(scores: jax.Array, protected: jax.Array | None) -> jax.Array:
    """``uint32`` keys whose ascending order is the pruning order of :func:`_rank_order`
    (ties aside): NaN lowest, then ascending score (``-0.0 == 0.0``), protected highest."""
    s = scores.astype(jnp.float32)
    s = jnp.where(s == 0, jnp.float32(0), s)
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    key = jnp.where(jnp.isnan(s), jnp.uint32(0), key)
    if protected is not None:
        key = jnp.where(protected, jnp.uint32(0xFFFFFFFF), key)
    return key


def _select_elements(scores: jax.Array, target: Any, protected: jax.Array | None) -> jax.Array:
    """:func:`select_prune` for units of size 1 without sorting: the ``target``-th
    smallest key is found by bisection over its 32 bits (32 counting passes, O(n) each;
    XLA:CPU sorts millions of elements far slower), then ties at that key are pruned
    lowest index first. Same result as the sorted order."""
    key = _order_keys(scores, protected)
    k = jnp.clip(jnp.asarray(target, jnp.int32), 0, key.shape[0])
    if protected is not None:
        k = jnp.minimum(k, jnp.sum(~protected, dtype=jnp.int32))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    kth, _ = lax.fori_loop(0, 32, bisect, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    below = key < kth
    ties = key == kth
    need = k - jnp.sum(below, dtype=jnp.int32)
    return (below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))) & (k > 0)


def top_units(scores: jax.Array, k: int) -> jax.Array:
    """Boolean ``(U,)``: the ``min(k, U)`` highest-priority units of a 1-D score vector
    (the last ones in pruning order: highest score, later index on ties).

    Example:
      >>> top_units(jnp.array([0.5, 2.0, 1.0]), 1)
      Array([False,  True, False], dtype=bool)
    """
    u = scores.shape[0]
    k = min(int(k), u)
    out = jnp.zeros((u,), bool)
    if k == 0:
        return out
    order = _rank_order(scores)
    return out.at[order[u - k :]].set(True)


def select_prune(scores: jax.Array, sizes: Any, target: Any, protected: jax.Array | None = None) -> jax.Array:
    """Which units to prune, exactly and deterministically.

    Units are ordered for pruning by ascending score; **NaN scores come first** (a NaN
    score is the lowest priority to keep, so NaN weights are pruned first); ties are
    broken by index (the lower index is pruned first); ``protected`` units are never
    pruned. Walking that order, a unit is pruned when at least half of it still fits in
    the remaining budget: with ``cum`` the elements pruned before it and ``z`` its size,
    it is pruned iff ``cum + ceil(z / 2) <= target``. For units of size 1 this prunes
    exactly ``target`` units; for structured units it is the prefix of the ranking whose
    element count is closest to the target (halves round up).

    Args:
      scores: ``(U,)`` unit scores (any float dtype; compared in float32).
      sizes: ``(U,)`` elements per unit (static NumPy ints or an int array).
      target: the number of elements to prune (int or int32 scalar, may be traced).
      protected: optional ``(U,)`` bool, units that must be kept.

    Returns:
      ``(U,)`` bool, True for a pruned unit.

    Example:
      >>> select_prune(jnp.array([3.0, 1.0, jnp.nan, 1.0]), np.ones(4, int), 2)
      Array([False,  True,  True, False], dtype=bool)
    """
    u = scores.shape[0]
    if u == 0:
        return jnp.zeros((0,), bool)
    if isinstance(sizes, np.ndarray | list | tuple) and np.all(np.asarray(sizes) == 1):
        return _select_elements(scores, target, protected)
    order = _rank_order(scores, protected)
    z = jnp.asarray(sizes, jnp.int32)[order]
    cum = jnp.cumsum(z) - z
    pruned_sorted = cum + (z + 1) // 2 <= jnp.asarray(target, jnp.int32)
    if protected is not None:
        pruned_sorted &= ~protected[order]
    return jnp.zeros((u,), bool).at[order].set(pruned_sorted)


# -- sparsity types ------------------------------------------------------------------------


def _axis(axis: int, ndim: int, path: str, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for leaf {path!r} with {ndim} dims")
    return axis % ndim


class SparsityType:
    """Base of the sparsity types. A type either splits a leaf into units
    (:meth:`units` / :meth:`expand`, ranked layer-wise or globally) or, when
    ``per_leaf_only`` is true, computes a leaf's mask on its own (:meth:`leaf_mask`).
    """

    per_leaf_only: ClassVar[bool] = False  # never part of a global ranking
    fixed_density: ClassVar[bool] = False  # ignores the sparsity (left out of distributions)
    min_keep: int = 0

    def validate(self, path: str, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming ``path`` if the type cannot prune this shape."""

    def units(self, score: jax.Array, path: str) -> tuple[jax.Array, np.ndarray]:
        """``(unit_scores (U,), unit_sizes (U,) static ints)``; a unit's score is the mean
        of its elements' scores."""
        raise NotImplementedError

    def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """A ``(U,)`` bool keep vector back to an element mask of ``shape``."""
        raise NotImplementedError

    def per_layer(self, stack: int) -> SparsityType | None:
        """This type for one layer of a leaf whose first ``stack`` axes index stacked layers
        (axes counted in the layer's own shape), or ``None`` when the type decides the
        stack as a whole (default; :class:`Channel` keeps the same channels in every layer,
        :class:`NM` decides every group on its own anyway)."""
        return None

    def leaf_mask(self, score: jax.Array, target: Any, path: str) -> jax.Array:
        """Keep-mask of one leaf pruning about ``target`` elements (layer scope)."""
        units, sizes = self.units(score, path)
        protected = top_units(units, self.min_keep) if self.min_keep else None
        return self.expand(~select_prune(units, sizes, target, protected), score.shape)


@dataclasses.dataclass(frozen=True)
class Unstructured(SparsityType):
    """Any element may be pruned.

    Args:
      per_slice: ``None`` (default) ranks all elements of the leaf together. An axis
        ranks separately within each slice along it; the leaf's count (exactly
        ``round_half_up(sparsity * n)``) is shared as evenly as possible, the first
        ``count % slices`` slices pruning one more (every slice prunes exactly
        ``sparsity * slice_size`` when that is an integer): ``per_slice=-1`` on a Dense kernel
        ``(in, out)`` is Wanda's per-output comparison group. With ``per_slice`` set,
        global scope falls back to layer scope for the leaf. The axis counts in the full
        leaf: on a stacked leaf (``LeafConfig(stack=n)``) ``per_slice=0`` is the layer axis,
        so prefer negative axes, which mean the same in the stacked and the unrolled model.

    Example:
      >>> qjax.prune.magnitude(params, 0.5, sparsity_type=Unstructured())
    """

    per_slice: int | None = None

    @property
    def per_leaf_only(self) -> bool:  # type: ignore[override]
        return self.per_slice is not None

    def validate(self, path, shape):
        if self.per_slice is not None:
            _axis(self.per_slice, len(shape), path, "Unstructured(per_slice)")

    def per_layer(self, stack):
        if self.per_slice is None or self.per_slice < 0:
            return self
        # a slice along a stack axis is a layer: ranked per layer already
        return Unstructured() if self.per_slice < stack else Unstructured(self.per_slice - stack)

    def units(self, score, path):
        return score.reshape(-1), np.ones(score.size, np.int64)

    def expand(self, keep, shape):
        return keep.reshape(shape)

    def leaf_mask(self, score, target, path):
        if self.per_slice is None:
            return super().leaf_mask(score, target, path)
        # ``target`` counts elements of the whole leaf; the slices share it as evenly as
        # possible (the first ``target % slices`` slices prune one more).
        shape = score.shape
        ax = self.per_slice % len(shape)
        n_slices = shape[ax]
        x = jnp.moveaxis(score, ax, 0).reshape(n_slices, -1)
        size = x.shape[1]
        t = jnp.asarray(target, jnp.int32)
        per = t // max(n_slices, 1) + (jnp.arange(n_slices) < t % max(n_slices, 1))
        prune = jax.vmap(lambda s, k: select_prune(s, np.ones(size, np.int64), k))(x, per)
        keep = ~prune.reshape((shape[ax], *shape[:ax], *shape[ax + 1 :]))
        return jnp.moveaxis(keep, 0, ax)


@dataclasses.dataclass(frozen=True)
class NM(SparsityType):
    """N:M semi-structured sparsity: in every group of ``m`` consecutive elements along
    ``axis``, exactly ``n`` (the highest-scoring; NaN lowest, ties: lower index pruned
    first) are kept. The requested sparsity is ignored: the density is fixed at ``n/m``.
    Global scope is identical to layer scope (every group is decided on its own).

    Args:
      n: elements kept per group (``0 <= n <= m``).
      m: group length (``>= 1``).
      axis: the axis the groups run along (the contracted/input axis, 0 for a Dense
        kernel ``(in, out)``, matches NVIDIA 2:4 sparse tensor cores for ``x @ w``).

    Raises:
      ValueError: bad ``n``/``m``; the leaf's ``axis`` length is not divisible by ``m``
        (the message names the leaf path).

    Example:
      >>> qjax.prune.magnitude(params, 0.5, sparsity_type=NM(2, 4))
    """

    n: int = 2
    m: int = 4
    axis: int = 0
    per_leaf_only: ClassVar[bool] = True
    fixed_density: ClassVar[bool] = True

    def __post_init__(self):
        if not (
            isinstance(self.m, int) and isinstance(self.n, int) and self.m >= 1 and 0 <= self.n <= self.m
        ):
            raise ValueError(f"NM needs integers 0 <= n <= m and m >= 1, got n={self.n!r}, m={self.m!r}")

    @property
    def density(self) -> float:
        return self.n / self.m

    def validate(self, path, shape):
        ax = _axis(self.axis, len(shape), path, f"NM({self.n}, {self.m})")
        if shape[ax] % self.m:
            raise ValueError(
                f"NM({self.n}, {self.m}, axis={self.axis}): leaf {path!r} has length {shape[ax]} "
                f"along axis {self.axis}, not divisible by m={self.m} (skip it with a rule "
                f"({path!r}, None) or pick another sparsity type for it)"
            )

    def leaf_mask(self, score, target, path):
        del target  # the density is fixed
        shape = score.shape
        ax = self.axis % len(shape)
        x = jnp.moveaxis(score, ax, -1)
        moved = x.shape
        g = x.reshape((*moved[:-1], moved[-1] // self.m, self.m)).astype(jnp.float32)
        order = jnp.lexsort((g, ~jnp.isnan(g)), axis=-1)
        rank = jnp.argsort(order, axis=-1)  # position of each element in pruning order
        keep = (rank >= self.m - self.n).reshape(moved)
        return jnp.moveaxis(keep, -1, ax)


@dataclasses.dataclass(frozen=True)
class Block(SparsityType):
    """Rectangular blocks on the last two axes are pruned together (each leading index has
    its own blocks). Edge blocks may be partial; a block's score is the mean of its real
    elements, its size the number of real elements.

    Args:
      shape: ``(rows, cols)`` of a block (positive ints).
      min_keep: blocks kept per leaf at least (default 0: sparsity 1 prunes everything).

    Raises:
      ValueError: bad ``shape``; a leaf with fewer than 2 dims (names the path).

    Example:
      >>> qjax.prune.magnitude(params, 0.75, sparsity_type=Block((4, 4)), scope="global")
    """

    shape: tuple[int, int] = (4, 4)
    min_keep: int = 0

    def __post_init__(self):
        shp = tuple(self.shape)
        if len(shp) != 2 or not all(isinstance(s, int) and s >= 1 for s in shp):
            raise ValueError(f"Block shape must be two positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shp)

    def validate(self, path, shape):
        if len(shape) < 2:
            raise ValueError(f"Block{self.shape}: leaf {path!r} of shape {shape} has fewer than 2 dims")

    def per_layer(self, stack):
        return self

    def _grid(self, shape):
        (h, w), (bh, bw) = shape[-2:], self.shape
        return h, w, bh, bw, -(-h // bh), -(-w // bw)

    def units(self, score, path):
        shape = score.shape
        lead = shape[:-2]
        h, w, bh, bw, nh, nw = self._grid(shape)
        pad = [(0, 0)] * len(lead) + [(0, nh * bh - h), (0, nw * bw - w)]
        x = jnp.pad(score.astype(jnp.float32), pad)
        sums = x.reshape((*lead, nh, bh, nw, bw)).sum(axis=(-3, -1))
        real = np.pad(np.ones((h, w), np.int64), pad[-2:]).reshape(nh, bh, nw, bw).sum(axis=(1, 3))
        counts = np.broadcast_to(real, (*lead, nh, nw))
        means = sums / jnp.asarray(np.maximum(counts, 1), jnp.float32)
        return means.reshape(-1), counts.reshape(-1)

    def expand(self, keep, shape):
        h, w, bh, bw, nh, nw = self._grid(shape)
        k = keep.reshape((*shape[:-2], nh, nw))
        k = jnp.repeat(jnp.repeat(k, bh, axis=-2), bw, axis=-1)
        return k[..., :h, :w]


@dataclasses.dataclass(frozen=True)
class Channel(SparsityType):
    """Whole slices along ``axis`` are pruned together (a slice's score is the mean of
    its elements' scores).

    Args:
      axis: the channel axis; ``-1`` is the output channel of Dense ``(in, out)`` and Conv
        ``(h, w, in, out)`` kernels, ``-2`` the input channel of a Conv kernel.
      min_keep: channels kept per leaf at least (default 1, so even sparsity 1.0 leaves
        every pruned layer one channel and the network connected). Protected channels are
        each leaf's best ones; in global scope the budget goes to the other channels.

    Raises:
      ValueError: ``axis`` out of range for a leaf (names the path).

    Example:
      >>> qjax.prune.magnitude(params, 0.5, sparsity_type=Channel(-1), scope="global")
    """

    axis: int = -1
    min_keep: int = 1

    def __post_init__(self):
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise ValueError(f"Channel min_keep must be an int >= 0, got {self.min_keep!r}")

    def validate(self, path, shape):
        _axis(self.axis, len(shape), path, "Channel")

    def units(self, score, path):
        shape = score.shape
        ax = self.axis % len(shape)
        length = shape[ax]
        per = math.prod(shape) // length if length else 0
        x = jnp.moveaxis(score.astype(jnp.float32), ax, 0).reshape(length, per)
        return x.sum(axis=1) / max(per, 1), np.full(length, per, np.int64)

    def expand(self, keep, shape):
        ax = self.axis % len(shape)
        bshape = [1] * len(shape)
        bshape[ax] = shape[ax]
        return jnp.broadcast_to(keep.reshape(bshape), shape)


@dataclasses.dataclass(frozen=True)
class LeafConfig:
    """A rule value that sets a leaf's sparsity and/or sparsity type.

    Args:
      sparsity: this leaf's sparsity (layer-wise, outside any global ranking and
        distribution); ``None`` keeps the pruner's.
      sparsity_type: this leaf's type; ``None`` keeps the pruner's.
      stack: how many leading axes of the leaf index stacked layers (``1`` for an
        ``nn.scan`` stack ``(L, K, N)``): each layer is then counted and ranked as its own
        leaf, as in the unrolled model (``Unstructured``, ``Block``; ``Channel`` keeps the
        same channels in every layer, ``NM`` is per group anyway). ``None``: what the
        pruner knows (Wanda: from :func:`~qjax.prune.activations.activation_norms`), else 0.
        A rule that sets only ``stack`` does not target the leaf by itself: the default
        (per-layer rank ``>= 2``) decides, so match the whole stacked subtree and its
        biases and norm scales stay unpruned, as in the unrolled model. Axes of a sparsity
        type count in the full stacked shape (``Unstructured(per_slice=0)`` is the layer
        axis): prefer negative axes.

    Example:
      >>> rules = [(r".*/embed/.*", None), (r".*/Conv_0/kernel", LeafConfig(0.3, Channel(-1)))]
      >>> rules = [(r"params/layers/.*", LeafConfig(stack=1))]   # an nn.scan stack
    """

    sparsity: float | None = None
    sparsity_type: SparsityType | None = None
    stack: int | None = None

    def __post_init__(self):
        if self.stack is not None and (
            not isinstance(self.stack, int) or isinstance(self.stack, bool) or self.stack < 0
        ):
            raise ValueError(f"LeafConfig.stack must be an int >= 0 or None, got {self.stack!r}")
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, "LeafConfig.sparsity"))
        if self.sparsity_type is not None and not isinstance(self.sparsity_type, SparsityType):
            raise TypeError(f"LeafConfig.sparsity_type must be a SparsityType, got {self.sparsity_type!r}")
