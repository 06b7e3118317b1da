"""Masks as pytrees: which leaves are pruned, masks from scores, applying, counting and
bit-packing them.

A mask tree mirrors the params tree (boxes such as NNX ``Variable`` preserved): a
``bool`` array of the leaf's shape for each *targeted* leaf (True = kept), ``None`` for a
skipped one. By default leaves of per-layer rank ``>= 2`` are targeted (``ndim`` less the
stacked-layer axes known from a ``LeafConfig(stack=n)`` rule or ``stacks=``); ``rules`` (the rule
engine of :mod:`qjax.rules`: ``re.fullmatch`` on the ``/``-joined path, first match wins)
override per leaf: ``None`` skips, a float sets the leaf's sparsity, a
:class:`~qjax.prune.sparsity.LeafConfig` or a sparsity type sets sparsity and/or type,
``True`` targets with the defaults; a ``LeafConfig`` that sets only ``stack`` states the
layout and leaves the choice to the default. A rule that matches no leaf is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.transposed import is_quantized
from qjax.prune.distribution import get_distribution
from qjax.prune.sparsity import (
    LeafConfig,
    SparsityType,
    Unstructured,
    check_sparsity,
    select_prune,
    target_count,
    top_units,
)
from qjax.prune.targets import Target, layer_counts, make_target, stacked_select, uniform_count
from qjax.quant.lsq_params import LSQParams
from qjax.rules import RuleSet, leaves_with_paths, map_with_path

__all__ = [
    "SCOPES",
    "LeafSummary",
    "PackedMask",
    "Summary",
    "Target",
    "apply_masks",
    "as_rules",
    "masks_from_scores",
    "pack_masks",
    "resolve_targets",
    "summary",
    "unpack_masks",
]

SCOPES = ("layer", "global")


class _Absent:
    """Stands in for a ``None`` leaf so that its path can be listed."""


_ABSENT = _Absent()


def _paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` including ``None`` leaves (as ``None``), boxes transparent; the
    learned scales of an :class:`qjax.LSQParams` count as ``None`` (never pruned)."""
    marked = _mark_absent(tree)
    return [(p, None if leaf is _ABSENT else leaf) for p, leaf in leaves_with_paths(marked)]


def _mark_absent(tree: Any) -> Any:
    def mark(x):
        if x is None:
            return _ABSENT
        if isinstance(x, LSQParams):
            return LSQParams(_mark_absent(x.params), {p: _ABSENT for p in x.scales})
        return x

    return jax.tree.map(mark, tree, is_leaf=lambda x: x is None or isinstance(x, LSQParams))


def as_rules(rules: Any) -> RuleSet:
    """``rules`` as a :class:`qjax.rules.RuleSet` (a RuleSet, or ``(pattern, value)`` pairs).

    Raises:
      ValueError, TypeError: a malformed rule or pattern (from ``RuleSet``).
    """
    if isinstance(rules, RuleSet):
        return rules
    return RuleSet(list(rules or ()))


def check_scope(scope: str) -> str:
    """Raise ``ValueError`` for an unknown scope (lists the known ones)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {list(SCOPES)}")
    return scope


def resolve_targets(
    tree: Any, rules: Any = (), sparsity_type: SparsityType | None = None, stacks: Any = None
) -> dict[str, Target]:
    """Which leaves of ``tree`` are pruned, and how.

    Args:
      tree: params (or scores: a ``None`` leaf is skipped).
      rules: ``(pattern, value)`` pairs or a RuleSet (see the module docstring).
      sparsity_type: the default type (``Unstructured()``).
      stacks: ``{path: number of leading stacked-layer axes}`` for leaves whose rule sets no
        ``LeafConfig(stack=...)`` (e.g. ``activation_norms(...).stacks``).

    Returns:
      ``{path: Target}`` for the targeted leaves, in flatten order.

    Raises:
      ValueError: a rule matches no leaf (names the pattern); a bad rule value or a leaf
        the type cannot prune (names the path).
      TypeError: a targeted leaf is a ``QArray`` (prune before quantizing).

    Example:
      >>> list(resolve_targets(variables, [(r".*/embed/.*", None)]))
      ['params/Dense_0/kernel', 'params/Dense_1/kernel']
    """
    default = sparsity_type if sparsity_type is not None else Unstructured()
    if not isinstance(default, SparsityType):
        raise TypeError(
            f"sparsity_type must be a SparsityType (Unstructured(), NM(..), ...), got {default!r}"
        )
    rs = as_rules(rules)
    pairs = _paths(tree)
    unused = rs.unused([p for p, _ in pairs])
    if unused:
        raise ValueError(f"pruning rule pattern(s) {unused} match no leaf of the tree")
    out: dict[str, Target] = {}
    for path, leaf in pairs:
        if leaf is None:
            continue
        m = rs.match(path)
        shape = tuple(np.shape(leaf))
        sparsity, stype, stack = None, default, None
        if m is None or _layout_only(m.value):
            stack = None if m is None else m.value.stack
            depth = _known_stack(stacks, path) if stack is None else stack
            if len(shape) - depth < 2 and not (stack and stack >= len(shape)):  # (that: an error below)
                continue  # by default, leaves of per-layer rank < 2 (biases, norm scales) are kept
        elif m.value is None:
            continue
        elif m.value is True:
            pass
        elif isinstance(m.value, LeafConfig):
            sparsity = m.value.sparsity
            stype = m.value.sparsity_type or default
            stack = m.value.stack
        elif isinstance(m.value, SparsityType):
            stype = m.value
        elif isinstance(m.value, float | int) and not isinstance(m.value, bool):
            sparsity = check_sparsity(m.value, f"sparsity of rule {m.pattern!r} for {path!r}")
        else:
            raise ValueError(
                f"rule {m.pattern!r} matching {path!r} has value {m.value!r}; expected None (skip), a "
                f"float sparsity, a LeafConfig, a sparsity type or True"
            )
        if is_quantized(leaf):
            raise TypeError(f"leaf {path!r} is quantized: prune before quantizing (or skip it with a rule)")
        stype.validate(path, shape)
        stack = _known_stack(stacks, path) if stack is None else stack
        out[path] = make_target(path, shape, sparsity, stype, stack)
    return out


def _layout_only(value: Any) -> bool:
    """A ``LeafConfig`` that only states the stack depth: the leaf is targeted (or not) as
    by default, on its per-layer rank."""
    return (
        isinstance(value, LeafConfig)
        and value.stack is not None
        and value.sparsity is None
        and value.sparsity_type is None
    )


def _known_stack(stacks: Any, path: str) -> int:
    return (stacks or {}).get(path, 0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _leaf_select(stype: SparsityType, path: str, score: jax.Array, count: jax.Array) -> jax.Array:
    return stype.leaf_mask(score, count, path)


def _leaf_mask(t: Target, score: jax.Array, count: Any) -> jax.Array:
    """``count``: elements to prune in the leaf, or per layer (a sequence) for a stack."""
    # One compiled selection per (type, path, shape); the count is traced, so eager calls at
    # many sparsities reuse it. Counts are int32: a ranking covers fewer than 2**31 elements.
    if t.stack:
        counts = jnp.stack([jnp.asarray(c, jnp.int32) for c in count])
        return stacked_select(t.layer_type, t.stack, score, counts)
    return _leaf_select(t.sparsity_type, "", score, jnp.asarray(count, jnp.int32))


def masks_from_scores(
    scores: Any,
    sparsity: Any,
    *,
    sparsity_type: SparsityType | None = None,
    scope: str = "layer",
    distribution: str | Callable = "uniform",
    rules: Any = (),
    params: Any = None,
    stacks: Any = None,
) -> Any:
    """Masks keeping the highest-scoring elements/units.

    Rounding: a leaf of ``n`` elements at sparsity ``s`` prunes ``floor(s*n + 0.5)``
    elements (layer scope, uniform); global scope prunes ``floor(s*N + 0.5)`` of all ``N``
    elements it ranks. Structured units (blocks, channels) are pruned in rank order while
    at least half of the next unit fits in the budget (closest count). Ties: the lower
    index (within a leaf; across leaves, the earlier leaf in flatten order) is pruned
    first. NaN scores are pruned first. See :func:`qjax.prune.sparsity.select_prune`.

    Scopes: ``"layer"`` ranks within each leaf (the ``distribution`` gives each leaf its
    sparsity); ``"global"`` ranks the units of all targeted leaves together by mean element
    score (``distribution`` must be ``"uniform"``). Leaves with a rule sparsity are pruned
    layer-wise at that sparsity, outside the distribution and the global ranking; ``NM``
    (fixed density) and ``Unstructured(per_slice=...)`` leaves are always decided per leaf.

    Args:
      scores: a params-shaped tree of scores (``None`` leaves are skipped).
      sparsity: fraction of zeros among targeted elements, in [0, 1]; may be traced.
      sparsity_type: default type (``Unstructured()``).
      scope: ``"layer"`` or ``"global"``.
      distribution: ``"uniform"``, ``"erk"`` or ``fn(shapes, sparsity) -> {path: sparsity}``.
      rules: per-path overrides (see the module docstring).
      params: if given, targets are resolved on ``params`` and the masks mirror its
        structure (scores are looked up by path).
      stacks: ``{path: leading stacked-layer axes}`` (see :func:`resolve_targets`); a
        stack's layers are counted and ranked as separate leaves in layer scope.

    Returns:
      The mask tree (bool, True = kept; ``None`` for skipped leaves).

    Raises:
      ValueError: unknown scope/distribution; sparsity outside [0, 1]; a rule matching
        no leaf; a targeted leaf without a score or with a score of another shape.

    Example:
      >>> scores = jax.tree.map(jnp.abs, params)
      >>> masks = masks_from_scores(scores, 0.9, scope="global")
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    get_distribution(distribution)
    if scope == "global" and distribution != "uniform":
        raise ValueError(
            f"distribution={distribution!r} applies to scope='layer'; scope='global' ranks all leaves "
            f"together"
        )
    struct = scores if params is None else params
    targets = resolve_targets(struct, rules, sparsity_type, stacks)
    score_of = dict(leaves_with_paths(scores))
    for path, t in targets.items():
        sc = score_of.get(path)
        if sc is None:
            raise ValueError(f"no score for targeted leaf {path!r}")
        if tuple(np.shape(sc)) != t.shape:
            raise ValueError(f"score of {path!r} has shape {np.shape(sc)}, the leaf {t.shape}")

    masks: dict[str, jax.Array] = {}
    own = {p: t for p, t in targets.items() if t.sparsity is not None or t.sparsity_type.fixed_density}
    for p, t in own.items():
        s = t.sparsity if t.sparsity is not None else 0.0
        masks[p] = _leaf_mask(t, score_of[p], uniform_count(t, s))
    pool = {p: t for p, t in targets.items() if p not in own}
    if scope == "layer":
        counts = layer_counts(pool, sparsity, distribution)
        for p, t in pool.items():
            masks[p] = _leaf_mask(t, score_of[p], counts[p])
    else:
        masks.update(_global_masks(pool, score_of, sparsity))
    return map_with_path(lambda p, _: masks.get(p), struct)


def _global_masks(pool: dict[str, Target], score_of: dict[str, Any], sparsity: Any) -> dict[str, jax.Array]:
    out = {}
    ranked = {}
    for p, t in pool.items():
        if t.sparsity_type.per_leaf_only:
            out[p] = _leaf_mask(t, score_of[p], uniform_count(t, sparsity))
        else:
            ranked[p] = t
    if ranked:
        stypes = tuple(t.sparsity_type for t in ranked.values())
        count = jnp.asarray(target_count(sparsity, sum(t.size for t in ranked.values())), jnp.int32)
        keep = _global_keep(stypes, tuple(score_of[p] for p in ranked), count)
        start = 0
        for (p, t), stype in zip(ranked.items(), stypes):
            n = _unit_count(stype, t.shape)
            out[p] = _expand_span(stype, t.shape, n, keep, start)
            start += n
    return out


# The global ranking is one compiled program with ONE output, the flat keep vector over all
# units; each leaf's mask is cut from it by a small program compiled once per (type, shape)
# (the start is traced). One program returning every leaf's slice compiles a fusion per
# output on XLA:CPU (tens of ms per leaf: minutes for a large model).
@functools.partial(jax.jit, static_argnums=0)
def _global_keep(stypes: tuple, scores: tuple, count: jax.Array) -> jax.Array:
    units, sizes, prot = [], [], []
    for stype, score in zip(stypes, scores):
        u, z = stype.units(score, "")
        units.append(u.astype(jnp.float32))
        sizes.append(np.asarray(z, np.int64))
        prot.append(top_units(u, stype.min_keep) if stype.min_keep else jnp.zeros(u.shape, bool))
    return ~select_prune(jnp.concatenate(units), np.concatenate(sizes), count, jnp.concatenate(prot))


@functools.cache
def _unit_count(stype: SparsityType, shape: tuple[int, ...]) -> int:
    """How many units ``stype`` splits a leaf of ``shape`` into."""
    units = jax.eval_shape(lambda s: stype.units(s, "")[0], jax.ShapeDtypeStruct(shape, jnp.float32))
    return int(units.shape[0])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _expand_span(stype: SparsityType, shape: tuple, n: int, keep: jax.Array, start: Any) -> jax.Array:
    """The element mask of the leaf whose ``n`` units start at ``start`` in ``keep``."""
    return stype.expand(jax.lax.dynamic_slice_in_dim(keep, start, n), shape)


# -- applying and counting -------------------------------------------------------------------


def apply_masks(tree: Any, masks: Any) -> Any:
    """``tree`` with pruned elements zeroed (``x * mask``, dtype kept).

    Works on params and any params-shaped tree (gradients, optimizer moments); leaves
    whose mask is ``None`` (or that the mask tree lacks) are returned unchanged. Jit-safe.

    Args:
      tree: params or a params-shaped tree.
      masks: a mask tree (e.g. from :func:`masks_from_scores`) or a packed one
        (:func:`pack_masks`), matched by path.

    Returns:
      The masked tree, same structure (boxes kept).

    Raises:
      ValueError: a mask path not in ``tree``, or a mask of the wrong shape (names the path).
      TypeError: a masked leaf is a ``QArray`` (prune before quantizing).

    Example:
      >>> sparse_params = apply_masks(params, qjax.prune.magnitude(params, 0.9))
    """
    mask_of = {p: m for p, m in leaves_with_paths(unpack_masks(masks))}
    seen = set()

    def visit(path, leaf):
        m = mask_of.get(path)
        if m is None or leaf is None:
            return leaf
        seen.add(path)
        if is_quantized(leaf):
            raise TypeError(f"leaf {path!r} is quantized: apply masks before quantizing")
        if tuple(np.shape(m)) != tuple(np.shape(leaf)):
            raise ValueError(f"mask of {path!r} has shape {np.shape(m)}, the leaf {np.shape(leaf)}")
        return jnp.where(m, leaf, jnp.zeros((), jnp.asarray(leaf).dtype))

    out = map_with_path(visit, tree)
    extra = sorted(set(mask_of) - seen)
    if extra:
        raise ValueError(f"masks for paths not in the tree: {extra}")
    return out


@dataclasses.dataclass(frozen=True)
class LeafSummary:
    """Counts of one masked leaf: elements, zeros (pruned) and their ratio."""

    total: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """Exact counts per targeted leaf and in total; ``str()`` is a table.

    Attributes:
      leaves: ``{path: LeafSummary}`` in flatten order.
    """

    leaves: dict[str, LeafSummary]

    @property
    def total(self) -> int:
        return sum(s.total for s in self.leaves.values())

    @property
    def zeros(self) -> int:
        return sum(s.zeros for s in self.leaves.values())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [(p, f"{s.total:,}", f"{s.zeros:,}", f"{s.sparsity:.2%}") for p, s in self.leaves.items()]
        rows.append(("total", f"{self.total:,}", f"{self.zeros:,}", f"{self.sparsity:.2%}"))
        head = ("leaf", "elements", "zeros", "sparsity")
        w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        line = lambda r: "  ".join([r[0].ljust(w[0])] + [c.rjust(w[i + 1]) for i, c in enumerate(r[1:])])
        sep = "-" * (sum(w) + 6)
        return "\n".join([line(head), sep, *map(line, rows[:-1]), sep, line(rows[-1])])


def summary(masks: Any) -> Summary:
    """Exact per-leaf and total counts of a mask tree (host-side: not for use under jit).

    Args:
      masks: a mask tree (``None`` leaves are skipped and not counted) or a packed one.

    Returns:
      A :class:`Summary`: ``.leaves[path].total / .zeros / .sparsity``, ``.total``,
      ``.zeros``, ``.sparsity`` (over targeted leaves) and a readable ``str()`` table.

    Example:
      >>> print(summary(masks))          # one row per pruned leaf, then the total
      >>> summary(masks).sparsity        # 0.9
    """
    masks = unpack_masks(masks)
    leaves = {}
    for path, m in leaves_with_paths(masks):
        m = np.asarray(m)
        total = int(m.size)
        leaves[path] = LeafSummary(total, total - int(np.count_nonzero(m)))
    return Summary(leaves)


# -- bit packing ------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A bool mask packed 8 per byte: ``bits`` (uint8, ``ceil(size / 8)``) is
    ``np.packbits(mask.reshape(-1))`` (big-endian bit order); ``shape`` is static."""

    bits: Any
    shape: tuple[int, ...]

    def tree_flatten(self):
        return (self.bits,), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        return cls(children[0], shape)

    def unpack(self) -> jax.Array:
        n = math.prod(self.shape)
        shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
        bits = (jnp.asarray(self.bits, jnp.uint8)[:, None] >> shifts) & 1
        return bits.reshape(-1)[:n].astype(bool).reshape(self.shape)


def _pack(mask: jax.Array) -> PackedMask:
    flat = jnp.asarray(mask, bool).reshape(-1)
    n = flat.shape[0]
    flat = jnp.pad(flat, (0, -n % 8)).astype(jnp.uint8).reshape(-1, 8)
    weights = jnp.asarray([128, 64, 32, 16, 8, 4, 2, 1], jnp.uint8)
    return PackedMask((flat * weights).sum(axis=1, dtype=jnp.uint8), tuple(np.shape(mask)))


def pack_masks(masks: Any) -> Any:
    """Bit-pack a mask tree (8 mask elements per byte): every bool leaf becomes a
    :class:`PackedMask` (same bytes as ``np.packbits`` of the flattened leaf), ``None``
    stays ``None``, boxes are kept. Jit-safe; :func:`unpack_masks` inverts it exactly.

    Example:
      >>> packed = pack_masks(masks)     # 1/8 of the bytes, e.g. for checkpoints
      >>> restored = unpack_masks(packed)
    """
    return map_with_path(lambda _, m: m if isinstance(m, PackedMask) else _pack(m), masks)


def unpack_masks(packed: Any) -> Any:
    """Inverse of :func:`pack_masks`: every :class:`PackedMask` back to its bool array
    (other leaves, e.g. already unpacked masks, pass through unchanged). Jit-safe.

    Args:
      packed: a tree from :func:`pack_masks`.

    Returns:
      The bool mask tree, exactly as packed.

    Example:
      >>> masks = unpack_masks(pack_masks(masks))
    """
    return jax.tree.map(
        lambda x: x.unpack() if isinstance(x, PackedMask) else x,
        packed,
        is_leaf=lambda x: isinstance(x, PackedMask),
    )
