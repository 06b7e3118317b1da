"""Running-average static activation ranges for quantization-aware training.

``qjax.fake_quantized(f, policy, act_stats_momentum=m)`` trains with static (per-tensor)
activation scales like ``act_stats=`` does, but the ranges follow the activations as the
weights train: each op reading a leaf with an entry in the stats moves its range toward
the range its calibrator gives the batch,

    ``lo <- m * lo + (1 - m) * lo_batch``,  ``hi <- m * hi + (1 - m) * hi_batch``

(Flax ``BatchNorm``'s ``momentum`` convention), quantizes its activation with the scale
and zero point of the updated range (as PyTorch's moving-average observers and TF's
``MovingAvgQuantize`` do), and the function returns the updated stats beside its outputs.
The stats are an ordinary pytree of ``ActStats``: keep them in the training state, pass
them to every step, and give the final ones to ``qjax.quantize_params(..., act_stats=...)``.

``act_stats_momentum`` may instead be a :class:`qjax.DelayedScaling`: the scales then come
from a history of earlier steps' ranges (:mod:`qjax.quant.act_delayed`); the functions here
dispatch on it, so every training step that takes a momentum takes delayed scaling too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.quant import act_delayed, op_stats
from qjax.quant.calibrate import ActStats, _combine_in_batch, batch_range
from qjax.quant.transforms import _static_act_scale


def check_momentum(momentum) -> float | act_delayed.DelayedScaling:
    """``momentum`` as a float in ``[0, 1)``, or a :class:`qjax.DelayedScaling` as it is.

    Raises:
      ValueError: not a real number in ``[0, 1)`` (``1`` would never update: pass the stats
        as ``act_stats=`` to keep them fixed) nor a ``DelayedScaling``.
    """
    if isinstance(momentum, act_delayed.DelayedScaling):
        return momentum
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        raise ValueError(
            f"act_stats_momentum={momentum!r} must be a number in [0, 1) or a qjax.DelayedScaling"
        ) from None
    if not 0.0 <= m < 1.0:
        raise ValueError(
            f"act_stats_momentum={momentum!r} must be in [0, 1) (the weight of the old range; 1 never "
            "updates: pass the stats as act_stats= for fixed static scales)"
        )
    return m


def updated_range(old: tuple, batch: tuple, momentum: float) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` moved from ``old`` toward ``batch`` by ``momentum`` (no gradient). A
    non-finite batch range (NaN or Inf activations: an overflowing bf16 step) leaves the old
    range: one bad batch must not turn every later scale into NaN."""

    def ema(o, b):
        o = jnp.asarray(o, jnp.float32)
        new = momentum * o + (1.0 - momentum) * b
        return jax.lax.stop_gradient(jnp.where(jnp.isfinite(b), new, o))

    return ema(old[0], batch[0]), ema(old[1], batch[1])


def moved_scale(key: str, old: tuple, spec, act, momentum, emit, valid=None) -> tuple:
    """The static ``(scale, zero_point)`` of the range ``old`` moved toward the batch range
    of ``act`` (its ``valid`` values) by ``momentum``; the moved range is emitted under
    ``key`` (what :func:`merged_stats` combines into the returned stats). With a
    ``DelayedScaling``, ``old`` is a history: :func:`qjax.quant.act_delayed.delayed_scale`."""
    if isinstance(momentum, act_delayed.DelayedScaling):
        return act_delayed.delayed_scale(key, old, spec, act, emit, valid)
    new = updated_range(old, batch_range(spec, act, valid), momentum)
    emit(key, new)
    return _static_act_scale(ActStats(*new), spec)


def merged_stats(act_stats: dict, emitted: dict, momentum=None) -> dict:
    """The new ``{path: ActStats}``: each op's updated range (the mean over the reads of a
    weight read several times in one call, or per shard inside a ``shard_map``); a range
    no read updated (an untaken ``cond`` branch: NaN) keeps its old value. ``count`` (the
    calibration's batches) is kept, so the pytree's structure does not change. With a
    ``DelayedScaling`` ``momentum``, the pushed histories
    (:func:`qjax.quant.act_delayed.pushed_histories`)."""
    if isinstance(momentum, act_delayed.DelayedScaling):
        return act_delayed.pushed_histories(act_stats, emitted)
    out = {}
    for path, stats in act_stats.items():
        values = emitted.get(path)
        if not values:
            out[path] = stats
            continue
        lo, hi = _combine_in_batch(values, mean=True)
        old_lo, old_hi = (jnp.asarray(v, jnp.float32) for v in (stats.lo, stats.hi))
        lo, hi = op_stats.pool_layers(lo, hi, old_lo.ndim)  # an OpRule op in a scan stack
        lo = jnp.where(jnp.isfinite(lo), lo, old_lo).reshape(old_lo.shape)
        hi = jnp.where(jnp.isfinite(hi), hi, old_hi).reshape(old_hi.shape)
        out[path] = ActStats(lo, hi, stats.count)
    return out
