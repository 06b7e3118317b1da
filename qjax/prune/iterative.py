"""Iterative pruning: prune a little, fine-tune, evaluate, repeat.

:func:`iterative_prune` raises the sparsity round by round (``step_size`` per round, or
``steps`` equal increments) towards ``target``. Each round scores the current (fine-tuned)
params with the pruner, prunes to the round's sparsity, fine-tunes with the masks, and
evaluates. It stops at the target, or as soon as the metric falls more than ``max_drop``
below the dense baseline; then the last acceptable round's params and masks are returned
(the dense params with dense masks if even the first round fails).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qjax.prune.masks import apply_masks
from qjax.prune.sparsify import dense_masks

__all__ = ["IterativeResult", "Round", "iterative_prune"]


@dataclasses.dataclass(frozen=True)
class Round:
    """One round of :func:`iterative_prune`.

    Attributes:
      round: 0 for the dense baseline, then 1, 2, ...
      sparsity: the requested sparsity of the round.
      actual: the measured fraction of zeros among targeted elements of the masks.
      metric: ``evaluate_fn`` of the fine-tuned params.
      drop: ``baseline - metric`` (``metric - baseline`` when lower is better), relative
        to ``|baseline|`` if ``relative``.
      accepted: whether the drop stayed within ``max_drop``.
    """

    round: int
    sparsity: float
    actual: float
    metric: float
    drop: float
    accepted: bool


@dataclasses.dataclass(frozen=True)
class IterativeResult:
    """What :func:`iterative_prune` returns.

    Attributes:
      params: the last acceptable params (pruned weights exactly zero).
      masks: their masks.
      history: every round, the baseline first (``Round(0, 0.0, ...)``), the rejected
        round (if any) last.
      baseline: the dense metric.
      sparsity: the requested sparsity of the returned state.
      reached_target: whether the returned state is at ``target``.
    """

    params: Any
    masks: Any
    history: tuple[Round, ...]
    baseline: float
    sparsity: float
    reached_target: bool


def _sparsity_steps(target: float, step_size: float | None, steps: int | None) -> list[float]:
    if (step_size is None) == (steps is None):
        raise ValueError("iterative_prune: pass exactly one of `step_size` and `steps`")
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"iterative_prune: `steps` must be a positive int, got {steps!r}")
        return [target * (i + 1) / steps for i in range(steps)]
    if not (isinstance(step_size, int | float) and 0 < step_size <= 1):
        raise ValueError(f"iterative_prune: `step_size` must be in (0, 1], got {step_size!r}")
    n = max(1, math.ceil(target / step_size - 1e-9))
    return [min(target, step_size * (i + 1)) for i in range(n)]


def _measured(masks: Any) -> float:
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    total = sum(int(m.size) for m in leaves)
    zeros = sum(int(m.size - jnp.count_nonzero(m)) for m in leaves)
    return zeros / total if total else 0.0


def iterative_prune(
    params: Any,
    pruner: Any,
    finetune_fn: Callable[[Any, Any], Any],
    evaluate_fn: Callable[[Any], Any],
    *,
    target: float,
    max_drop: float,
    step_size: float | None = None,
    steps: int | None = None,
    higher_is_better: bool = True,
    relative: bool = False,
    grads_fn: Callable[[Any], Any] | None = None,
    key: Any = None,
) -> IterativeResult:
    """Prune towards ``target`` in rounds, fine-tuning after each, while the metric holds.

    Round ``i`` (sparsities ``step_size, 2·step_size, ..., target`` or ``target·i/steps``):
    masks ``= pruner.masks(params, s_i, grads=grads_fn(params), key=...)`` from the current
    params (pruned weights are zero, so magnitude-like scores keep them pruned), prune,
    ``params = apply_masks(finetune_fn(pruned, masks), masks)`` (masks re-applied, so a
    fine-tune that moves pruned weights cannot un-prune them), ``metric = evaluate_fn(params)``.
    If ``drop > max_drop`` the loop stops and the previous round's state is returned.

    Args:
      params: dense params.
      pruner: a :class:`qjax.prune.pruners.Pruner` (``Magnitude``, ``Saliency``, ...).
      finetune_fn: ``(params, masks) -> params`` (train with the masks applied, e.g. with
        ``sparsify(tx, pruner, one_shot(0))``... or any loop that keeps pruned weights zero).
      evaluate_fn: ``params -> float`` (accuracy, or a loss with ``higher_is_better=False``).
      target: final sparsity in ``[0, 1]``.
      max_drop: largest acceptable drop of the metric below the dense baseline (same units
        as the metric, or a fraction of ``|baseline|`` with ``relative=True``).
      step_size: sparsity added per round; or
      steps: the number of rounds (equal increments).
      higher_is_better: ``False`` for metrics such as a loss.
      relative: measure the drop relative to ``|baseline|``.
      grads_fn: ``params -> grads``, for pruners with ``needs_grads`` (Saliency, Movement).
      key: PRNG key for random pruners (folded with the round number).

    Returns:
      An :class:`IterativeResult` (params, masks, history, baseline, sparsity,
      reached_target).

    Raises:
      ValueError: ``target`` outside ``[0, 1]``; ``max_drop < 0``; not exactly one of
        ``step_size``/``steps``; ``needs_grads`` pruner without ``grads_fn``.

    Example:
      >>> res = iterative_prune(params, Magnitude(), finetune, accuracy, target=0.9,
      ...                       step_size=0.1, max_drop=0.01)  # doctest: +SKIP
      >>> res.sparsity, [r.metric for r in res.history]  # doctest: +SKIP
    """
    if not (isinstance(target, int | float) and 0.0 <= target <= 1.0):
        raise ValueError(f"iterative_prune: `target` must be in [0, 1], got {target!r}")
    if not (isinstance(max_drop, int | float) and max_drop >= 0):
        raise ValueError(f"iterative_prune: `max_drop` must be a number >= 0, got {max_drop!r}")
    schedule = _sparsity_steps(float(target), step_size, steps)
    if getattr(pruner, "needs_grads", False) and grads_fn is None:
        raise ValueError(
            f"iterative_prune: {type(pruner).__name__} needs gradients: pass grads_fn=params -> grads"
        )
    key = jax.random.PRNGKey(0) if key is None else key

    def masks_at(p, s, i):
        grads = grads_fn(p) if grads_fn is not None else None
        return pruner.masks(p, s, grads=grads, key=jax.random.fold_in(key, i))

    baseline = float(evaluate_fn(params))
    dense = dense_masks(pruner, params)
    history = [Round(0, 0.0, 0.0, baseline, 0.0, True)]
    best = (params, dense, 0.0)
    current = params
    for i, s in enumerate(schedule, start=1):
        masks = masks_at(current, s, i)
        tuned = apply_masks(finetune_fn(apply_masks(current, masks), masks), masks)
        metric = float(evaluate_fn(tuned))
        drop = (baseline - metric) if higher_is_better else (metric - baseline)
        if relative:
            drop = drop / abs(baseline) if baseline else (math.inf if drop > 0 else 0.0)
        ok = drop <= max_drop
        history.append(Round(i, float(s), _measured(masks), metric, float(drop), ok))
        if not ok:
            break
        best = (tuned, masks, float(s))
        current = tuned
    p, m, s = best
    return IterativeResult(p, m, tuple(history), baseline, s, math.isclose(s, target) or (target == 0.0))
