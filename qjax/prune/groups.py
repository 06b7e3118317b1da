"""Group-level channel importance: rank whole coupled channel groups, not single leaves.

A channel of a coupled group (:func:`qjax.graph.coupling.channel_groups`) lives in every
member: the producer kernel's out-column, the consumers' in-rows, biases, norm scales,
running statistics, every layer of a residual stream. Per-leaf ``Channel`` masks rank each
member on its own, and ``shrink(vote="any")`` removes the union of their choices (50% per
layer removed 75% of a residual stream). Here each channel gets one score from all of its
members (Torch-Pruning's group importance), and the masks prune exactly the requested
fraction of each group (``scope="group"``) or of all groups' channels together
(``scope="global"``). The masks are the group-masked model (every member masked), so
``shrink(apply_fn, params, masks, *args)`` removes exactly those channels and equals
``apply_masks(params, masks)`` (except groups admitted by ``inexact_norms=True``, whose
norms run over the kept channels after shrinking).

Example:
  >>> groups = channel_groups(f, variables, x)                  # f: inference mode
  >>> scores = group_scores(groups, Magnitude().scores(variables), normalize="mean")
  >>> masks = masks_from_group_scores(scores, 0.5, groups, variables, multiple=8)
  >>> small, plan = shrink(f, variables, masks, x)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qjax.graph.coupling import ChannelGroup
from qjax.prune._paths import _flat
from qjax.prune.masks import as_rules
from qjax.prune.shrink import _channel_slices, _kept_count, _mask_leaves, check_multiple, plan_from_kept
from qjax.prune.sparsity import check_sparsity, target_count

__all__ = ["GROUP_SCOPES", "NORMALIZERS", "REDUCTIONS", "group_scores", "masks_from_group_scores"]

REDUCTIONS = ("sum", "mean", "max")
NORMALIZERS = (None, "sum", "mean", "max")
GROUP_SCOPES = ("group", "global")


def _member_scores(g: ChannelGroup, score_of: dict[str, Any]) -> list[np.ndarray]:
    """Per scored member, the sum of its element scores over each channel's slice."""
    out = []
    for m in g.members:
        sc = score_of.get(m.path)
        if sc is not None:
            out.append(_channel_slices(np.asarray(sc, np.float64), m.axis, m.positions).sum(axis=1))
    return out


def _normalized(v: np.ndarray, how: str | None) -> np.ndarray:
    if how is None:
        return v
    d = {"sum": np.sum, "mean": np.mean, "max": np.max}[how](v)
    return v / d if np.isfinite(d) and d != 0 else v


def group_scores(
    groups: list[ChannelGroup], scores: Any, *, reduction: str = "sum", normalize: str | None = None
) -> dict[str, np.ndarray]:
    """One importance per channel of every prunable group, combined over its members.

    A member's channel importance is the sum of its element scores over the channel's
    slice (all ``unit`` positions of a head, every other axis of the leaf): with
    ``Magnitude().scores(params)`` (``|w|``) the L1 norm, with squared weights the squared
    L2 norm (Torch-Pruning's default). Each member's vector may be divided by its own
    ``"sum"`` / ``"mean"`` / ``"max"`` (``normalize``; a zero or non-finite divisor leaves
    it as is), then the members are combined by ``reduction``. Members whose score leaf is
    ``None`` (biases, running statistics under the pruners' default targets) do not count.

    Args:
      groups: from :func:`qjax.graph.coupling.channel_groups`.
      scores: a params-shaped tree of element scores (e.g. ``Magnitude().scores(params)``,
        ``Saliency().scores(params, grads=g)``; ``None`` leaves are skipped); a tree over
        ``variables["params"]`` is matched by path suffix.
      reduction: ``"sum"``, ``"mean"`` or ``"max"`` over the members.
      normalize: ``None``, ``"sum"``, ``"mean"`` or ``"max"`` (per member, before combining).

    Returns:
      ``{group name: (size,) float64 scores}`` for the prunable groups with at least one
      scored member, in group order. NaN scores stay NaN (pruned first).

    Raises:
      ValueError: an unknown ``reduction`` or ``normalize`` (names the argument); a score
        path that is not a member path of the groups.

    Example:
      >>> gs = group_scores(channel_groups(f, params, x), Magnitude().scores(params), reduction="mean")
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {list(NORMALIZERS)}, got {normalize!r}")
    paths = {m.path: None for g in groups for m in g.members}
    flat = {p: s for p, s in _flat(scores).items() if s is not None and np.ndim(s) > 0}
    score_of = _mask_leaves(flat, paths, "score") if flat else {}
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[reduction]
    out = {}
    for g in groups:
        per_member = _member_scores(g, score_of) if g.prunable else []
        if per_member:
            out[g.name] = reduce(np.stack([_normalized(v, normalize) for v in per_member]), axis=0)
    return out


def _prune_order(scores: np.ndarray) -> np.ndarray:
    """Indices from first to last pruned: NaN first, then ascending score, ties by index
    (the order of :func:`qjax.prune.sparsity.select_prune`)."""
    return np.lexsort((np.arange(scores.size), np.nan_to_num(scores, nan=-np.inf), ~np.isnan(scores)))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool vector keeping the ``k`` channels pruned last."""
    keep = np.zeros(scores.size, bool)
    keep[_prune_order(scores)[scores.size - k :]] = True
    return keep


def _global_kept(pool: dict[str, np.ndarray], sparsity: float) -> dict[str, int]:
    """Kept channels per group when the lowest ``sparsity`` of all pooled channels go,
    each group's best channel protected."""
    names = list(pool)
    allsc = np.concatenate([pool[n] for n in names])
    owner = np.repeat(np.arange(len(names)), [pool[n].size for n in names])
    best = np.concatenate([_top(pool[n], 1) for n in names])
    order = [i for i in _prune_order(allsc) if not best[i]]
    gone = np.bincount(owner[order[: target_count(sparsity, allsc.size)]], minlength=len(names))
    return {n: pool[n].size - int(gone[i]) for i, n in enumerate(names)}


def _rule_sparsities(rules: Any, names: list[str], sparsity: float) -> dict[str, float | None]:
    """``{group name: own sparsity, or None to skip}`` for groups a rule matches."""
    rs = as_rules(rules)
    unused = rs.unused(names)
    if unused:
        raise ValueError(f"group rule pattern(s) {unused} match no group name")
    out: dict[str, float | None] = {}
    for n in names:
        m = rs.match(n)
        if m is None:
            continue
        if m.value is not None and (isinstance(m.value, bool) or not isinstance(m.value, float | int)):
            raise ValueError(
                f"rule {m.pattern!r} matching group {n!r} has value {m.value!r}; expected None (skip) "
                "or a float sparsity"
            )
        out[n] = None if m.value is None else check_sparsity(m.value, f"sparsity of rule {m.pattern!r}")
    return out


def masks_from_group_scores(
    scores: dict[str, Any],
    sparsity: float,
    groups: list[ChannelGroup],
    params: Any,
    *,
    scope: str = "group",
    multiple: int = 1,
    rules: Any = (),
) -> Any:
    """Masks pruning the lowest-scoring channels of each scored group, every member masked.

    ``scope="group"`` prunes ``floor(sparsity * size + 0.5)`` channels of each group;
    ``"global"`` ranks the channels of all scored groups together and prunes
    ``floor(sparsity * N + 0.5)`` of their ``N`` channels (normalise the scores,
    :func:`group_scores` ``normalize=``, when groups differ in scale). Each group keeps at
    least one channel (in global scope its best one is protected), then rounds its kept
    count up to a multiple of ``multiple`` (never past its size). Order: NaN first, then
    ascending score, ties by lower index (across groups, the earlier group first), as
    :func:`qjax.prune.masks_from_scores`. ``rules`` ``[(pattern, value)]`` match group names
    (``re.fullmatch``, first match wins): ``None`` leaves the group alone, a float is its own
    sparsity (decided within the group, outside the global ranking).

    Args:
      scores: ``{group name: (size,) scores}`` from :func:`group_scores`.
      sparsity: the fraction of channels to prune, in [0, 1] (a Python number).
      groups: the groups the scores were computed on.
      params: the params tree; the masks mirror it.
      scope: ``"group"`` or ``"global"``.
      multiple: kept channel counts are multiples of this (e.g. 8 for tensor cores).
      rules: per-group overrides (above).

    Returns:
      A mask tree (bool, True = kept) with a mask on every member of every group that loses
      channels and ``None`` elsewhere: ``shrink(f, params, masks, *args)`` removes exactly
      these channels, and the shrunk model equals ``apply_masks(params, masks)``.

    Raises:
      ValueError: ``sparsity`` outside [0, 1], an unknown ``scope``, ``multiple < 1``, a
        score name that is no group, a score of the wrong length, a rule that matches no
        group or has a bad value (each names the argument, group or pattern).
      TypeError: ``sparsity`` is not a number.

    Example:
      >>> masks = masks_from_group_scores(gs, 0.5, groups, variables, scope="global",
      ...                                 rules=[(r"params/Dense_0/kernel:1", 0.25)])
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(sparsity, float):
        raise TypeError(f"sparsity must be a Python float (masks are decided on the host), got {sparsity!r}")
    if scope not in GROUP_SCOPES:
        raise ValueError(f"scope must be one of {list(GROUP_SCOPES)}, got {scope!r}")
    multiple = check_multiple(multiple)
    by_name = {g.name: g for g in groups}
    for n, sc in scores.items():
        if n not in by_name:
            raise ValueError(f"scores name group {n!r}, which is not among the groups")
        if np.shape(sc) != (by_name[n].size,):
            raise ValueError(f"score of group {n!r} has shape {np.shape(sc)}, expected ({by_name[n].size},)")
    own = _rule_sparsities(rules, list(by_name), sparsity)
    sc = {n: np.asarray(s, np.float64) for n, s in scores.items() if own.get(n, 0.0) is not None}
    kept = {n: s.size - target_count(own.get(n, sparsity), s.size) for n, s in sc.items()}
    if scope == "global":
        kept.update(_global_kept({n: s for n, s in sc.items() if n not in own}, sparsity))
    decided = [(by_name[n], _top(s, _kept_count(kept[n], s.size, multiple))) for n, s in sc.items()]
    shapes = {p: tuple(np.shape(x)) for p, x in _flat(params).items() if x is not None}
    return plan_from_kept(decided, shapes).group_masks(params)
