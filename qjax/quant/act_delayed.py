"""Delayed (amax-history) static activation scales for quantization-aware training.

``qjax.fake_quantized(f, policy, act_stats_momentum=qjax.DelayedScaling(history=16))``
trains with static per-tensor activation scales taken from a window of *earlier* steps'
ranges, the recipe of fp8 training (Transformer Engine's and Flax's ``fp8_ops`` delayed
scaling). Each op reading a leaf with an entry:

* quantizes its activation with the scale of ``(min lo, max hi)`` over the entry's
  history, which holds the ranges of the last ``history`` steps but not this one (so the
  quantization never waits for this batch's reduction, and an outlier batch saturates
  instead of stretching its own scale);
* pushes the range its calibrator gives the batch into the history (dropping the oldest).

The state is an ordinary pytree ``{path: ActHistory}``: start it from calibrated stats with
:meth:`DelayedScaling.init`, pass it to every step, and give :meth:`DelayedScaling.ranges`
of the final one to ``qjax.quantize_params(..., act_stats=...)``: the scales the next step
would have used (Transformer Engine's convention), which include the last batch's range.
For the scales the last step itself trained with, give the ranges of the state passed *into*
that step.

Reads of one entry in a call (a weight read twice, the iterations of a loop, the shards of a
``shard_map`` body) push one range: the minimum of their ``lo`` and maximum of their ``hi``,
the step's amax over all of them. A read that did not run (an untaken ``cond`` branch) or
saw NaN / Inf pushes the newest range again: no bad value enters the scale, and every
history moves by one step per call (so the histories of a step's shards stay aligned).
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
from flax import struct

from qjax.quant import op_stats
from qjax.quant.calibrate import ActStats, _combine_in_batch, batch_range


@struct.dataclass
class ActHistory:
    """The ranges of one op over the last steps, oldest first, along a trailing history axis:
    ``lo`` / ``hi`` of shape ``(..., history)`` (the leading axes are an ``nn.scan`` stack's
    layers, as for :class:`qjax.quant.calibrate.ActStats`)."""

    lo: jax.Array
    hi: jax.Array


@dataclasses.dataclass(frozen=True)
class DelayedScaling:
    """Delayed scaling: static activation scales from the last ``history`` steps' ranges.

    Pass it as ``act_stats_momentum=`` to :func:`qjax.fake_quantized`, ``qjax.parallel.
    qat_step`` / ``int8_step`` / ``prune_step`` or ``distill_step``'s
    ``student_act_stats_momentum``, in place of an EMA momentum.

    Attributes:
      history: how many steps' ranges the scale is taken from (``>= 1``; 1: the previous
        step's range alone). Transformer Engine's default is 1024, Flax's 1024; short
        windows follow a training run's growing activations sooner.

    Raises:
      ValueError: ``history`` not an integer ``>= 1``.

    Example:
      >>> delayed = qjax.DelayedScaling(history=16)
      >>> hist = delayed.init(qjax.calibrate(model.apply, policy, params, batches[:1]))
      >>> qat = qjax.fake_quantized(model.apply, policy, act_stats_momentum=delayed)
      >>> logits, hist = qat(params, hist, x)          # in the train step (has_aux=True)
      >>> q = qjax.quantize_params(params, policy, act_stats=delayed.ranges(hist))
    """

    history: int = 16

    def __post_init__(self):
        h = self.history
        try:
            n = None if isinstance(h, bool) else operator.index(h)
        except TypeError:
            n = None
        if n is None or n < 1:
            raise ValueError(f"DelayedScaling(history={h!r}): history must be an integer >= 1")
        object.__setattr__(self, "history", int(n))  # a numpy integer as a plain int

    def init(self, act_stats: dict) -> dict[str, ActHistory]:
        """Starting histories: each calibrated range repeated ``history`` times.

        Args:
          act_stats: ``{path: ActStats}`` from :func:`qjax.calibrate` (leaf and ``"op:..."``
            entries).

        Returns:
          ``{path: ActHistory}``, so the first steps quantize with the calibrated scales.

        Raises:
          TypeError: ``act_stats`` is not a ``{path: ActStats}`` dict (the message names an
            offending entry).
        """
        _check_dict(act_stats, ActStats, "DelayedScaling.init takes {path: ActStats} from qjax.calibrate")
        out = {}
        for path, s in act_stats.items():
            lo, hi = (jnp.asarray(v, jnp.float32) for v in (s.lo, s.hi))
            reps = lambda v: jnp.broadcast_to(v[..., None], (*v.shape, self.history))
            out[path] = ActHistory(reps(lo), reps(hi))
        return out

    def ranges(self, histories: dict) -> dict[str, ActStats]:
        """The range each entry's next scale comes from, ``(min lo, max hi)`` over its
        history: the ``act_stats`` to give :func:`qjax.quantize_params` or ``quantized``.

        Raises:
          TypeError / ValueError: as :meth:`check`.
        """
        self.check(histories, "DelayedScaling.ranges")
        return {p: ActStats(jnp.min(h.lo, axis=-1), jnp.max(h.hi, axis=-1)) for p, h in histories.items()}

    def check(self, histories, caller: str | None = None) -> None:
        """Refuse a state that is not this configuration's histories.

        Raises:
          TypeError: not a ``{path: ActHistory}`` dict (calibrated ``ActStats`` given as
            they are: start from :meth:`init`).
          ValueError: an entry whose history axis is not ``history`` long, or whose ``lo``
            and ``hi`` shapes differ (the message names the entry).
        """
        who = caller or f"act_stats_momentum=DelayedScaling(history={self.history})"
        _check_dict(
            histories,
            ActHistory,
            f"{who} takes the running {{path: ActHistory}} (start from "
            "DelayedScaling.init(qjax.calibrate(...)))",
        )
        for path, h in histories.items():
            shapes = jnp.shape(h.lo), jnp.shape(h.hi)
            if shapes[0] != shapes[1] or not shapes[0] or shapes[0][-1] != self.history:
                raise ValueError(
                    f"act_stats[{path!r}]: lo / hi of shapes {shapes[0]} / {shapes[1]} are not a "
                    f"history of {self.history} steps (trailing axis); start from "
                    f"DelayedScaling(history={self.history}).init(stats)"
                )


def _check_dict(value, cls, what: str) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{what}; got {type(value).__name__}")
    bad = next((k for k, v in value.items() if not isinstance(v, cls)), None)
    if bad is not None:
        raise TypeError(f"{what}; entry {bad!r} is of type {type(value[bad]).__name__}")


def delayed_scale(key: str, current: tuple, spec, act, emit, valid=None) -> tuple:
    """The static ``(scale, zero_point)`` of ``current``, the ``(lo, hi)`` range of an
    entry's history (:meth:`DelayedScaling.ranges`: earlier steps only); the batch range of
    ``act`` (its ``valid`` values) is emitted under ``key``, to be pushed by
    :func:`pushed_histories`. The walk is given the range, not the history: a value of the
    leaf's own shape, which ``scan`` stacks and ``shard_map`` specs slice as such."""
    from qjax.quant.transforms import _static_act_scale  # imports the policy modules

    emit(key, batch_range(spec, act, valid))
    lo, hi = (jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for v in current)
    return _static_act_scale(ActStats(lo, hi), spec)


def pushed_histories(histories: dict, emitted: dict) -> dict[str, ActHistory]:
    """The new ``{path: ActHistory}``: each entry's history shifted by one step, with the
    range its reads pushed (min of ``lo``, max of ``hi`` over the reads; pooled over an
    ``nn.scan`` stack's layers for an ``OpRule`` op entry) last. An entry no read reached,
    or whose pushed range is not finite, pushes its newest range again."""
    out = {}
    for path, h in histories.items():
        old_lo, old_hi = (jnp.asarray(v, jnp.float32) for v in (h.lo, h.hi))
        values = emitted.get(path)
        if values:
            lo, hi = _combine_in_batch(values, mean=False)
            lo, hi = op_stats.pool_layers(lo, hi, old_lo.ndim - 1)
            lo, hi = (jnp.asarray(v, jnp.float32).reshape(old_lo.shape[:-1]) for v in (lo, hi))
            bad = ~(jnp.isfinite(lo) & jnp.isfinite(hi))
        else:
            lo, hi, bad = old_lo[..., -1], old_hi[..., -1], True

        def push(old, new, bad=bad):
            new = jnp.where(bad, old[..., -1], new)
            return jax.lax.stop_gradient(jnp.concatenate([old[..., 1:], new[..., None]], axis=-1))

        out[path] = ActHistory(push(old_lo, lo), push(old_hi, hi))
    return out


def reduced_over(histories: dict, axes: tuple[str, ...]) -> dict[str, ActHistory]:
    """``histories`` of one step's shards (inside a ``shard_map`` over ``axes``) made the
    global step's: the minimum of ``lo`` and maximum of ``hi`` over the shards (their older
    entries agree; the newest becomes the step's amax over the whole batch)."""
    return {p: ActHistory(jax.lax.pmin(h.lo, axes), jax.lax.pmax(h.hi, axes)) for p, h in histories.items()}
