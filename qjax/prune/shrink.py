"""Physical shrinking of structured-pruned models: remove whole channels, not just zero them.

:func:`shrink` finds the channel-coupling groups of ``apply_fn`` (:mod:`qjax.graph.coupling`),
decides per prunable group which channels the masks remove (a channel goes when every
member that has a mask zeroes its whole slice), and slices every member of the group:
producer kernels' out-axes, consumer kernels' in-axes, biases, norm scales and running
statistics, attention heads in units of ``head_dim``. The decision is a
:class:`ShrinkPlan`: JSON-serialisable, replayable on any params-shaped tree (a fresh
init, optimizer state, masks) with :meth:`ShrinkPlan.apply`.

Example:
  >>> small, plan = shrink(model.apply, variables, masks, x)
  >>> small_opt_state = plan.apply(opt_state)             # adam moments shrink too
  >>> masked = apply_masks(variables, plan.group_masks(variables))
  >>> # model(small) == model(masked) within float tolerance (rebuild: qjax.prune.rebuild)

A plan made with ``inexact_norms=True`` may shrink groups a norm sums over
(:attr:`GroupPlan.inexact` lists where): there the small model is the same program run at
the smaller width (norms over the kept channels), not the masked model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.graph.coupling import ChannelGroup, channel_groups
from qjax.numerics.transposed import is_quantized
from qjax.prune._paths import _flat, _suffix_index, _trainable, map_leaves, resolve_path
from qjax.prune.masks import unpack_masks

_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """What a plan does to one group.

    Attributes:
      name: the group's name (:attr:`qjax.graph.coupling.ChannelGroup.name`).
      size: channels before.
      kept: indices of the kept channels (sorted).
      members: ``(path, axis, unit)`` of every member.
      inexact: where shrinking the group is not the masked model
        (:attr:`qjax.graph.coupling.ChannelGroup.inexact`); empty when it is.
    """

    name: str
    size: int
    kept: tuple[int, ...]
    members: tuple[tuple[str, int, int], ...]
    inexact: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShrinkPlan:
    """Which positions of which leaf axes survive; replayable on any params-shaped tree.

    Attributes:
      groups: the groups that lose channels.
      leaves: ``{path: {axis: kept positions}}`` for every leaf that changes.
      shapes: ``{path: shape}`` of every params leaf before shrinking (validation, and
        matching leaves of optimizer states by path suffix).
      skipped: ``(group name, reason)`` for non-prunable groups whose masks zeroed whole
        channels (left unchanged).
    """

    groups: tuple[GroupPlan, ...]
    leaves: dict[str, dict[int, tuple[int, ...]]]
    shapes: dict[str, tuple[int, ...]]
    skipped: tuple[tuple[str, str], ...] = ()

    # -- replay -----------------------------------------------------------------------------
    @functools.cached_property
    def _suffixes(self) -> dict[str, set[str]]:
        return _suffix_index(self.shapes)

    def _resolve(self, path: str) -> str | None:
        return resolve_path(path, self.shapes, self._suffixes, self.leaves)

    def _map_planned(self, fn, tree: Any, other=lambda x: x, strict: bool = True) -> Any:
        seen: set[str] = set()

        def visit(path, x):
            q = self._resolve(path)
            if q is None or q not in self.leaves:
                return other(x)
            seen.add(q)
            if x is None:
                return None
            if is_quantized(x):
                raise TypeError(f"leaf {path!r} is quantized: shrink before quantizing")
            if tuple(np.shape(x)) != self.shapes[q]:
                raise ValueError(
                    f"leaf {path!r} has shape {tuple(np.shape(x))}, the plan expects {self.shapes[q]}"
                    + (f" (as {q!r})" if q != path else "")
                )
            return fn(q, x)

        out = map_leaves(visit, tree)
        missing = [q for q in self.leaves if q not in seen]
        if missing and (strict or not seen):
            raise KeyError(
                f"plan path(s) not found in the tree: {missing}"
                + " (pass strict=False for a tree over part of the params, e.g. an "
                "optimizer state over variables['params'] when batch statistics are planned too)"
            )
        return out

    def apply(self, tree: Any, *, strict: bool = True) -> Any:
        """Slice a params-shaped tree: params, a fresh init, masks (``None`` leaves kept),
        batch statistics, gradients, optimizer state (leaves matched by path suffix, so
        ``opt_state[0].mu`` shrinks with the params; other leaves such as ``count`` pass).

        Args:
          tree: the tree; its leaves may be boxed (NNX ``Variable``s).
          strict: every planned leaf must be in ``tree``; ``False`` allows a tree over part
            of the params (e.g. ``variables["params"]`` without ``batch_stats``), as long as
            one planned leaf is found.

        Returns:
          The tree with every planned leaf sliced, same structure and dtypes.

        Raises:
          KeyError: a planned leaf path is missing from the tree (names the paths).
          ValueError: a planned leaf has the wrong shape (names the path).
          TypeError: a planned leaf is a ``QArray``.

        Example:
          >>> small_state = plan.apply(opt_state)
          >>> small_p = plan.apply(variables["params"], strict=False)
        """

        def take(q, x):
            for axis, kept in self.leaves[q].items():
                idx = np.asarray(kept, np.intp)
                x = np.take(x, idx, axis) if isinstance(x, np.ndarray) else x[(slice(None),) * axis + (idx,)]
            return x

        return self._map_planned(take, tree, strict=strict)

    def group_masks(self, tree: Any, *, strict: bool = True) -> Any:
        """Masks that zero exactly what the plan removes: a bool array (True = kept) for
        every planned leaf, ``None`` elsewhere; ``apply_masks(params, plan.group_masks(params))``
        is the masked model the shrunk one equals (except in groups with
        :attr:`GroupPlan.inexact` notes, whose norms then run over the kept channels only).

        Args:
          tree: a params-shaped tree (its structure is mirrored).
          strict: as :meth:`apply`.

        Returns:
          The mask tree.

        Raises:
          KeyError, ValueError: as :meth:`apply`.

        Example:
          >>> masked = apply_masks(params, plan.group_masks(params))
        """

        def mask(q, x):
            m = np.ones(self.shapes[q], bool)
            for axis, kept in self.leaves[q].items():
                keep = np.zeros(self.shapes[q][axis], bool)
                keep[list(kept)] = True
                m &= keep.reshape((-1,) + (1,) * (len(self.shapes[q]) - axis - 1))
            return jnp.asarray(m)

        return self._map_planned(mask, tree, other=lambda x: None, strict=strict)

    def new_shapes(self) -> dict[str, tuple[int, ...]]:
        """The planned leaves' new shapes.

        Returns:
          ``{path: shape after shrinking}`` for every leaf the plan changes.

        Example:
          >>> plan.new_shapes()["params/Dense_0/kernel"]
          (64, 40)
        """
        out = {}
        for q, axes in self.leaves.items():
            shape = list(self.shapes[q])
            for axis, kept in axes.items():
                shape[axis] = len(kept)
            out[q] = tuple(shape)
        return out

    def summary(self) -> dict[str, Any]:
        """Counts for reports.

        Returns:
          ``{"groups", "leaves", "elements_before", "elements_after", "skipped", "inexact"}``:
          groups shrunk, leaves changed, params elements before/after, non-prunable groups
          whose masks zeroed whole channels, shrunk groups that are not the masked model
          (``inexact_norms``).

        Example:
          >>> plan.summary()["elements_after"] / plan.summary()["elements_before"]
          0.31
        """
        new = self.new_shapes()
        before = sum(math.prod(s) for s in self.shapes.values())
        after = sum(math.prod(new.get(p, s)) for p, s in self.shapes.items())
        return {"groups": len(self.groups), "leaves": len(self.leaves), "elements_before": before,
                "elements_after": after, "skipped": len(self.skipped),
                "inexact": sum(1 for g in self.groups if g.inexact)}  # fmt: skip

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data.

        Returns:
          A JSON-compatible dict (:meth:`from_dict` inverts it).

        Example:
          >>> ShrinkPlan.from_dict(plan.to_dict()) == plan
          True
        """
        return {
            "version": _VERSION,
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "kept": list(g.kept),
                    "members": [list(m) for m in g.members],
                    **({"inexact": list(g.inexact)} if g.inexact else {}),
                }
                for g in self.groups
            ],
            "leaves": {p: {str(a): list(k) for a, k in axes.items()} for p, axes in self.leaves.items()},
            "shapes": {p: list(s) for p, s in self.shapes.items()},
            "skipped": [list(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShrinkPlan:
        """Rebuild a plan from :meth:`to_dict`'s output.

        Args:
          d: the dict.

        Returns:
          The :class:`ShrinkPlan`.

        Raises:
          ValueError: an unknown version.

        Example:
          >>> plan = ShrinkPlan.from_dict(json.load(open("plan.json")))
        """
        if d.get("version") != _VERSION:
            raise ValueError(f"unsupported shrink plan version {d.get('version')!r} (expected {_VERSION})")
        groups = tuple(
            GroupPlan(
                g["name"],
                int(g["size"]),
                tuple(g["kept"]),
                tuple((p, int(a), int(u)) for p, a, u in g["members"]),
                tuple(g.get("inexact", ())),
            )
            for g in d["groups"]
        )
        leaves = {p: {int(a): tuple(k) for a, k in axes.items()} for p, axes in d["leaves"].items()}
        shapes = {p: tuple(s) for p, s in d["shapes"].items()}
        return cls(groups, leaves, shapes, tuple(tuple(s) for s in d.get("skipped", ())))

    def to_json(self) -> str:
        """The plan as a JSON string (:meth:`from_json` inverts it).

        Example:
          >>> Path("plan.json").write_text(plan.to_json())
        """
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ShrinkPlan:
        """Rebuild a plan from :meth:`to_json`'s output.

        Raises:
          ValueError: an unknown version; ``json.JSONDecodeError``: not JSON.

        Example:
          >>> plan = ShrinkPlan.from_json(Path("plan.json").read_text())
          >>> small = plan.apply(fresh_params)
        """
        return cls.from_dict(json.loads(text))


def _kept_count(alive: int, size: int, multiple: int) -> int:
    target = max(alive, 1)
    if multiple > 1:
        target = -(-target // multiple) * multiple
    return min(target, size)


def _channel_slices(x: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """``(channels, everything else)``: each channel's positions along ``axis``, flattened."""
    moved = np.moveaxis(x, axis, 0)[positions]  # (channels, unit, ...)
    return moved.reshape(positions.shape[0], -1)


def _mask_leaves(masks: dict[str, Any], params: dict[str, Any], what: str = "mask") -> dict[str, Any]:
    """Masks (or scores: ``what``) keyed by params path; a tree over part of ``params``
    (``variables["params"]``) is matched by path suffix, as :meth:`ShrinkPlan.apply` matches trees."""
    if all(p in params for p in masks):
        return masks
    suffixes = _suffix_index(params)
    out = {}
    for path, m in masks.items():
        q = resolve_path(path, params, suffixes, params)
        if q is None:
            raise ValueError(
                f"{what} path {path!r} is not a params path: give {what}s mirroring the params "
                f"(for Linen variables, {{'params': {what}s}} or {what}s over the whole variables)"
            )
        out[q] = m
    return out


def _add_back(alive: np.ndarray, target: int, norms: np.ndarray) -> np.ndarray:
    """``alive`` with the dead channels of largest ``norms`` revived up to ``target`` kept."""
    dead = np.flatnonzero(~alive)
    back = dead[np.argsort(-norms[dead], kind="stable")][: target - int(alive.sum())]
    out = alive.copy()
    out[back] = True
    return out


def _weight_norms(g: ChannelGroup, p_leaves: dict[str, Any], trainable: set[str]) -> np.ndarray:
    """Squared L2 norm of every channel over the group's trainable members (running
    statistics such as BatchNorm's mean/var do not count; all members if none is trainable)."""
    members = [m for m in g.members if m.path in trainable] or list(g.members)
    norms = np.zeros(g.size)
    for m in members:
        x = np.asarray(p_leaves[m.path], np.float64)
        norms += (_channel_slices(x, m.axis, m.positions) ** 2).sum(axis=1)
    return norms


def plan_from_kept(
    decided: list[tuple[ChannelGroup, np.ndarray]], shapes: dict[str, tuple[int, ...]], skipped=()
) -> ShrinkPlan:
    """The plan that keeps, in each group, the channels its bool vector marks alive.

    Args:
      decided: ``[(group, alive)]`` with ``alive`` a ``(group.size,)`` bool array.
      shapes: ``{path: shape}`` of every params leaf.
      skipped: ``(group name, reason)`` pairs to record.

    Returns:
      The :class:`ShrinkPlan` (groups that keep every channel are left out).

    Example:
      >>> plan = plan_from_kept([(g, np.arange(g.size) % 2 == 0)], {p: x.shape for p, x in flat.items()})
    """
    removed: dict[tuple[str, int], set[int]] = {}
    plans = []
    for g, alive in decided:
        if alive.all():
            continue
        plans.append(GroupPlan(g.name, g.size, tuple(np.flatnonzero(alive).tolist()),
                               tuple((m.path, m.axis, m.unit) for m in g.members), g.inexact))  # fmt: skip
        for m in g.members:
            removed.setdefault((m.path, m.axis), set()).update(m.positions[~alive].ravel().tolist())
    leaves: dict[str, dict[int, tuple[int, ...]]] = {}
    for (path, axis), gone in sorted(removed.items()):
        kept = tuple(i for i in range(shapes[path][axis]) if i not in gone)
        leaves.setdefault(path, {})[axis] = kept
    return ShrinkPlan(tuple(plans), leaves, dict(shapes), tuple(skipped))


def make_plan(
    groups: list[ChannelGroup], params: Any, masks: Any, *, multiple: int = 1, vote: str = "all"
) -> ShrinkPlan:
    """Decide, per prunable group, which channels the masks remove.

    With ``vote="all"`` a channel is removed when every member that has a mask (a
    non-``None`` mask leaf) zeroes the channel's whole slice; with ``vote="any"`` one such
    member is enough (per-layer output-channel masks, e.g. ``Channel(axis=-1)`` on every
    kernel: the consumer's mask keeps its in-rows, yet the producer's zeroed column
    decides). Members without a mask do not vote; a group with no masked member is
    untouched. Each group keeps at least one channel and a
    multiple of ``multiple`` (pruned channels with the largest L2 norm over the group's
    trainable members are added back: NNX ``Param``s / Linen's ``params`` collection, not
    running statistics; never more than the group had: when the next multiple exceeds the
    group size, the group keeps all its channels).

    Per-layer masks decided independently over-prune coupled groups under ``vote="any"``
    (the union of every member's pruned channels goes); to prune an exact fraction of each
    group, rank whole groups: :func:`qjax.prune.groups.group_scores` and
    :func:`qjax.prune.groups.masks_from_group_scores`.

    Args:
      groups: from :func:`qjax.graph.coupling.channel_groups`.
      params: the params the groups were found on.
      masks: a mask tree mirroring ``params`` (bool arrays, ``None`` for skipped leaves), or
        a packed one (:func:`qjax.prune.pack_masks`); a tree over part of them (masks over
        ``variables["params"]``) is matched by path suffix.
      multiple: kept channel counts are multiples of this (e.g. 8 for tensor cores).
      vote: ``"all"`` or ``"any"`` (above).

    Returns:
      The :class:`ShrinkPlan`.

    Raises:
      ValueError: ``multiple < 1`` or an unknown ``vote``; a mask path that is not a params
        path, or a mask of the wrong shape (names the path).

    Example:
      >>> plan = make_plan(channel_groups(f, params, x), params, masks, multiple=8)
    """
    check_multiple(multiple)
    if vote not in ("all", "any"):
        raise ValueError(f"vote must be 'all' or 'any', got {vote!r}")
    p_leaves = {p: x for p, x in _flat(params).items() if x is not None}
    m_leaves = _mask_leaves(_flat(unpack_masks(masks)), p_leaves)
    for path, m in m_leaves.items():
        if m is not None and tuple(np.shape(m)) != tuple(np.shape(p_leaves[path])):
            raise ValueError(
                f"mask of {path!r} has shape {tuple(np.shape(m))}, the leaf {tuple(np.shape(p_leaves[path]))}"
            )
    trainable = _trainable(params)
    decided, skipped = [], []
    for g in groups:
        voters = [m for m in g.members if m_leaves.get(m.path) is not None]
        if not voters:
            continue
        votes = [
            _channel_slices(np.asarray(m_leaves[m.path], bool), m.axis, m.positions).any(axis=1)
            for m in voters
        ]
        alive = np.any(votes, axis=0) if vote == "all" else np.all(votes, axis=0)
        if not g.prunable:
            if not alive.all():
                skipped.append((g.name, g.reason))
            continue
        target = _kept_count(int(alive.sum()), g.size, multiple)
        if target > alive.sum():
            alive = _add_back(alive, target, _weight_norms(g, p_leaves, trainable))
        decided.append((g, alive))
    shapes = {p: tuple(np.shape(x)) for p, x in p_leaves.items()}
    return plan_from_kept(decided, shapes, skipped)


def check_multiple(multiple: Any) -> int:
    """Raise ``ValueError`` unless ``multiple`` is an int >= 1 (names the argument)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int | np.integer) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    return int(multiple)


def shrink(
    apply_fn,
    params: Any,
    masks: Any,
    *example_args,
    multiple: int = 1,
    vote: str = "all",
    inexact_norms: bool = False,
) -> tuple[Any, ShrinkPlan]:
    """Physically remove the channels that structured masks zero.

    Args:
      apply_fn: ``apply_fn(params, *example_args)`` (``model.apply`` with variables,
        ``qjax.graph.nnx_apply(graphdef)`` with an NNX state, or a plain function). Use
        inference mode for batch norms (e.g. ``functools.partial(model.apply, train=False)``).
      params: the params (Linen variables incl. ``batch_stats``, NNX state, a dict...).
      masks: a mask tree mirroring ``params`` (bool arrays, ``None`` for unmasked leaves), or
        a packed one.
      *example_args: example inputs (only shapes and dtypes matter).
      multiple: kept channel counts per group are multiples of this.
      vote: ``"all"``: a channel goes when every masked member zeroes its slice (the
        default); ``"any"``: when one does (per-layer output-channel masks). See
        :func:`make_plan`.
      inexact_norms: also shrink groups a LayerNorm / RMSNorm reduces over (a
        transformer's hidden dimension): see
        :func:`qjax.graph.coupling.channel_groups`. The small model then differs from the
        masked one (its norms average over the kept channels); fine-tune it.

    Returns:
      ``(small_params, plan)``: ``small_params = plan.apply(params)`` (unmasked values of
      the kept channels: apply ``plan.apply(masks)`` to keep finer sparsity), and the
      :class:`ShrinkPlan`.

    Raises:
      ValueError: see :func:`make_plan`.

    Example:
      >>> small, plan = shrink(model.apply, variables, masks, x)
      >>> y = qjax.prune.rebuild.linen_apply(model, plan=plan)(small, x)
    """
    groups = channel_groups(apply_fn, params, *example_args, inexact_norms=inexact_norms)
    plan = make_plan(groups, params, masks, multiple=multiple, vote=vote)
    return plan.apply(params), plan
