"""``calibrate``: static activation ranges of the ops a policy quantizes, streamed over
calibration batches (see :mod:`qjax.quant.serve` for how ops are found)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.interpret import materialize
from qjax.numerics import histogram as hist
from qjax.numerics.spec import PER_TOKEN
from qjax.quant import op_stats, ops_ragged
from qjax.quant.lsq_params import reject_lsq_params
from qjax.quant.policy import Policy, check_policy
from qjax.quant.policy_handler import _named_errors, _PolicyHandler, _rule, _run, ragged_weight

_POOLED = ("percentile", "mse")  # calibrations that need the distribution of the values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActStats:
    """Calibrated activation range of one op (per stacked layer inside a ``scan``).

    ``lo``/``hi`` are the calibrator's range combined over batches (min/max for absmax and
    minmax; for percentile and MSE the mean of the per-batch ranges, or with
    ``calibrate(..., histogram_bins=...)`` the range of all batches' values pooled);
    ``count`` batches.
    """

    lo: jax.Array
    hi: jax.Array
    count: int = dataclasses.field(metadata=dict(static=True), default=1)


class _Calibrate(_PolicyHandler):
    # per-tensor ranges of what each op quantizes: inside a shard_map, of the values the
    # shard's op quantizes, combined over shards like over batches (histograms: summed)
    per_shard_emits = True

    def __init__(self, policy: Policy, bins: int | None = None, ranges: dict | None = None):
        super().__init__(policy)
        self.bins, self.ranges = bins, ranges or {}

    def pooled(self, path: str) -> bool:
        """Whether the op at ``path`` emits histograms (percentile / MSE with ``bins``; not
        the operands of matmuls between two activations)."""
        if op_stats.is_op_key(path):
            return False
        rule = _rule(self.policy, path)
        return bool(self.bins) and rule is not None and rule.act.calibration.name in _POOLED

    def aux(self, path: str):
        # the pooled histogram's range so far rides with the weight, so a scan over a
        # stacked weight hands each layer its own
        return self.ranges.get(path, jnp.float32(0.0)) if self.pooled(path) else None

    def loop_reduction(self, key: str) -> str | None:
        # inside a while_loop: the range over the iterations (the mean of the per-iteration
        # ranges for percentile / MSE), as over batches; histograms are not reduced there
        if self.pooled(key):
            return None
        return "mean" if _spec_of(self.policy, key).calibration.name in _POOLED else "min_max"

    def quantize_activation_op(self, eqn, invals, lhs_spec, rhs_spec, scope: str, emit):
        """A matmul between two activations that an ``OpRule`` matches: the range of each
        operand whose spec is per tensor (the static scale ``quantized(op_stats=...)``
        serves it with); the op runs as it is."""
        rule = self.policy.op_match(scope).value  # its specs as written: PER_TOKEN is never static
        for x, spec, side in zip(invals, (lhs_spec, rhs_spec), op_stats.SIDES, strict=True):
            if op_stats.is_static(getattr(rule, side)):
                emit(op_stats.op_key(scope, side), batch_range(spec, x))
        return None

    @_named_errors
    def target(self, eqn, invals, emit):
        found = self.weight(invals)
        if found is None:
            return None
        wi, ref, rule = found
        self._collect(ref, rule, invals[1 - wi], emit)
        return None

    @_named_errors
    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot`` reading an expert weight: the range of its activation, as
        for a matmul (``quantized`` serves it with that static scale)."""
        ref = ragged_weight(eqn, invals)
        if ref is not None:
            self._targeted.add(ref.path)
            act = ops_ragged.grouped_rows(materialize(invals[0]), invals[2])  # padding rows do not count
            valid = ops_ragged.valid_rows(act, invals[2])
            self._collect(ref, _rule(self.policy, ref.path), act, emit, valid)
        return None

    def _collect(self, ref, rule, act, emit, valid=None) -> None:
        """Emit the per-tensor range (or histogram) of the activation ``act`` an op reading
        ``ref`` quantizes by ``rule``'s static ``act`` spec (of its ``valid`` values only)."""
        if rule is None or rule.act is None or rule.act.channel_axes is PER_TOKEN:
            return  # float activations, or dynamic per-token scales: nothing to calibrate
        spec = rule.act
        if spec.channel_axes or spec.group_size is not None:
            raise ValueError(
                f"leaf {ref.path!r} (rule {rule.pattern!r}): static activation scales are per-tensor "
                "(channel_axes=()); use qjax.PER_TOKEN for dynamic per-token scales"
            )
        if self.pooled(ref.path):
            emit(ref.path, hist.histogram(materialize(act).astype(jnp.float32), ref.aux, self.bins, valid))
            return
        emit(ref.path, batch_range(spec, act, valid))


def batch_range(spec, act, valid=None) -> tuple[jax.Array, jax.Array]:
    """The per-tensor range ``(lo, hi)`` (float32 scalars) that ``spec``'s calibrator gives
    one batch's activation ``act``: what :func:`calibrate` records per batch, and what
    ``fake_quantized(..., act_stats_momentum=...)`` moves its running range toward.

    ``valid``: an optional boolean mask broadcastable to ``act`` of the values that count,
    the others being zeros (a ragged dot's padding rows): zeros change no max-based range
    nor an MSE clip search (0 is exact), so only a percentile is told."""
    act = materialize(act).astype(jnp.float32)
    axes, cal = tuple(range(act.ndim)), spec.calibration
    extra = {"valid": valid} if valid is not None and cal.name == "percentile" else {}
    lo, hi = cal(act, axes, spec.format, spec.symmetric, **extra)
    return lo.reshape(()), hi.reshape(())


def _combine_in_batch(values: list, mean: bool):
    """Merge the ranges an op emitted in one batch (one per read of its weight)."""
    if len(values) == 1:
        return values[0]
    los = jnp.stack([v[0] for v in values])
    his = jnp.stack([v[1] for v in values])
    return (jnp.nanmean(los, 0), jnp.nanmean(his, 0)) if mean else (jnp.nanmin(los, 0), jnp.nanmax(his, 0))


def _merge(prev: ActStats | None, lo, hi, mean: bool) -> ActStats:
    """Fold one batch's range into the running statistics. NaN marks an op that did not
    run in that batch (a ``cond`` branch not taken) and leaves the statistics as they were."""
    if prev is None:
        return ActStats(lo, hi, 1)
    if not mean:  # fmin/fmax ignore NaN
        return ActStats(jnp.fmin(prev.lo, lo), jnp.fmax(prev.hi, hi), prev.count + 1)
    c = prev.count

    def avg(p, b):
        p_missing = jnp.isnan(p)
        updated = jnp.where(p_missing, b, (p * c + b) / (c + 1))
        return jnp.where(jnp.isnan(b), p, updated)

    return ActStats(avg(prev.lo, lo), avg(prev.hi, hi), c + 1)


class _Histograms:
    """The pooled histograms of one op: one :class:`~qjax.numerics.histogram.Pooled` per
    layer of a stacked (``scan``) weight, in the leading axes' shape."""

    def __init__(self, bins: int):
        self.bins, self.lead, self.layers, self.batches = bins, None, [], 0

    def add(self, values: list) -> None:
        self.batches += 1
        for h in (jax.device_get(v) for v in values):  # one histogram per read
            lead = np.shape(h["r"])
            if self.lead is None:
                self.lead = lead
                self.layers = [hist.Pooled.empty(self.bins) for _ in range(int(np.prod(lead)))]
            flat = {
                k: np.reshape(v, (len(self.layers), -1) if k in ("pos", "neg") else (-1,))
                for k, v in h.items()
            }
            for i, pooled in enumerate(self.layers):
                pooled.add({k: v[i] for k, v in flat.items()})

    def ranges(self) -> jax.Array:
        """Each layer's histogram range so far (the next batch's ``r_prev``)."""
        return jnp.asarray(np.reshape([p.r for p in self.layers], self.lead), jnp.float32)

    def stats(self, spec) -> ActStats:
        cal = spec.calibration
        if cal.name == "percentile":
            pairs = [hist.percentile_range(p, cal.p, spec.symmetric) for p in self.layers]
        else:
            pairs = [
                hist.mse_range(p, spec.format, spec.symmetric, cal.num_candidates, cal.min_ratio, cal.norm)
                for p in self.layers
            ]
        lo, hi = (
            jnp.asarray(np.reshape([pair[j] for pair in pairs], self.lead), jnp.float32) for j in (0, 1)
        )
        return ActStats(lo, hi, self.batches)


def calibrate(
    f: Callable,
    policy: Policy,
    params: Any,
    batches: Iterable,
    *,
    histogram_bins: int | None = None,
    **kwargs,
) -> dict[str, ActStats]:
    """Collect static activation ranges for every op whose rule has a per-tensor ``act``
    spec, streaming over ``batches`` (no activations are kept).

    Args:
      f: ``f(params, *args, **kwargs)``.
      policy: the :class:`qjax.Policy`; each rule's ``act.calibration`` is used.
      params: float params.
      batches: an iterable of positional-argument tuples (a bare array means ``(array,)``).
      histogram_bins: for percentile and MSE calibration, pool the values of all batches
        into one histogram of this many bins per sign (each batch reduced on device, the
        histograms summed on the host) and take the range of the pool, as TensorRT's
        histogram calibrators do: a percentile within one bin (``< 2 max|x| / bins``) of
        the empirical percentile of all values; MSE searched on the bin centres. ``None``
        (default): the mean of the per-batch ranges. E.g. ``qjax.numerics.histogram.DEFAULT_BINS``.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``{path: ActStats}``; pass it to ``qjax.quantize_params(..., act_stats=...)``. Ops in
      an ``nn.scan`` stack get per-layer ranges (leading axis). Matmuls between two
      activations that an ``OpRule`` quantizes with a per-tensor operand spec add
      ``"op:<name stack>:lhs"`` / ``":rhs"`` entries (pooled over a scan's layers; for
      percentile / MSE always the mean of the per-batch ranges: ``histogram_bins`` covers
      the weight ops only), which ``qjax.quantized(..., op_stats=...)`` serves and
      ``quantize_params`` skips. Ops inside a
      ``jax.shard_map`` body are measured per shard, each shard a read of the op (min /
      max exact over the tensor; percentile / MSE averaged over shards as over batches,
      or pooled exactly with ``histogram_bins``); ops inside a ``lax.while_loop`` body over
      its iterations, combined the same way into one read (not with ``histogram_bins``).

    Raises:
      ValueError: no batches, a rule asks for static non-per-tensor activation scales, a
        ``histogram_bins`` that is not a positive power of two, or an op with
        ``histogram_bins`` inside a ``while_loop`` body.

    Warns:
      UserWarning: a leaf whose rule has an ``act`` spec is read by no matmul/conv as its
        weight (a weight concatenated or padded at call time): nothing is calibrated for it.

    Example:
      >>> stats = qjax.calibrate(model.apply, policy, variables, batches, histogram_bins=2048)
    """
    reject_lsq_params(params, "calibrate", "pass its params, trained.params")
    return Calibrator(f, policy, histogram_bins=histogram_bins, **kwargs)(params, batches)


class Calibrator:
    """:func:`calibrate` with its compiled program kept: calling it again (after every QAT
    epoch, on another checkpoint) with batches of the same shapes neither traces nor
    compiles again (``calibrate`` does both on every call: about 0.2 s for a 20-layer MLP on
    this project's 2-core CPU, and most of a call for small calibration sets).

    As with ``jax.jit``, ``f`` is traced at the first call: values it closes over are read
    then (build a new ``Calibrator`` after changing them); ``params`` and the batches are
    arguments, read at every call.

    Args:
      f, policy, histogram_bins, kwargs: as :func:`calibrate`.

    Raises:
      ValueError: as :func:`calibrate` (policy and ``histogram_bins`` checked here).

    Example:
      >>> cal = qjax.Calibrator(model.apply, policy)
      >>> for epoch in range(10):
      ...     state = train(state)
      ...     stats = cal(state.params, calib_batches)
    """

    def __init__(self, f: Callable, policy: Policy, *, histogram_bins: int | None = None, **kwargs):
        check_policy(policy)
        if histogram_bins is not None and (
            not isinstance(histogram_bins, int) or histogram_bins < 2 or histogram_bins & (histogram_bins - 1)
        ):
            raise ValueError(f"histogram_bins={histogram_bins!r} must be a power of two >= 2 (or None)")
        self.policy, self.histogram_bins = policy, histogram_bins

        def one(params, args, ranges):
            return _run(f, lambda: _Calibrate(policy, histogram_bins, ranges), params, args, kwargs)[1]

        self._one, self._step = one, jax.jit(one)

    def __call__(self, params: Any, batches: Iterable) -> dict[str, ActStats]:
        """``{path: ActStats}`` of ``params`` over ``batches`` (see :func:`calibrate`).

        Raises:
          ValueError: no batches; as :func:`calibrate`.
        """
        reject_lsq_params(params, "Calibrator", "pass its params, trained.params")
        policy, histogram_bins, one, step = self.policy, self.histogram_bins, self._one, self._step
        stats: dict[str, ActStats] = {}
        pools: dict[str, _Histograms] = {}
        start: dict | None = None  # every histogram's range before the first batch: 0, per layer
        n = 0
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            if start is None:  # one abstract pass finds them, so the step compiles once
                shapes = jax.eval_shape(one, params, args, {}) if histogram_bins else {}
                start = {
                    p: jnp.zeros(v[0]["r"].shape, jnp.float32)
                    for p, v in shapes.items()
                    if isinstance(v[0], dict)
                }
            ranges = {**start, **{path: pool.ranges() for path, pool in pools.items()}}
            for path, value in step(params, args, ranges).items():
                if isinstance(value[0], dict):  # histograms
                    try:
                        pools.setdefault(path, _Histograms(histogram_bins)).add(value)
                    except ValueError as e:
                        raise ValueError(f"activation of the op reading {path!r}: {e}") from e
                    continue
                mean = _spec_of(policy, path).calibration.name in _POOLED
                lo, hi = _combine_in_batch(value, mean)
                stats[path] = _merge(stats.get(path), lo, hi, mean)
            n += 1
        if n == 0:
            raise ValueError("calibrate needs at least one batch")
        for path, pool in pools.items():
            stats[path] = pool.stats(_rule(policy, path).act)
        for path, s in stats.items():  # an op in a scan stack: one name stack, every layer's range
            if op_stats.is_op_key(path):
                stats[path] = ActStats(*op_stats.pool_layers(s.lo, s.hi), s.count)
        return stats


def _spec_of(policy: Policy, key: str):
    """The activation spec of a stats key: the leaf's rule's ``act``, or the ``OpRule``
    operand spec of an ``"op:..."`` key."""
    if op_stats.is_op_key(key):
        scope, side = op_stats.scope_side(key)
        rule = policy.op_match(scope).value
        return rule.lhs if side == "lhs" else rule.rhs
    return _rule(policy, key).act
