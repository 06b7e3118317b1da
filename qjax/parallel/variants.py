"""Sharded training steps for quantization-aware training (:func:`qat_step`), int8 training
(:func:`int8_step`), pruning (:func:`prune_step`) and distillation
(:func:`distill_train_step`): each only builds the loss and hands it to
:func:`qjax.parallel.steps.train_step` (sharding, donation, LSQ params: see
:mod:`qjax.parallel.steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qjax.distill.train import distill_step as _distill_step
from qjax.parallel.mesh import BATCH_AXES
from qjax.parallel.steps import ShardedStep, TrainState, _mesh_of, _split, local_axes, train_step
from qjax.quant import act_delayed, act_ema
from qjax.quant.policy import Policy
from qjax.quant.qat import fake_quantized

Objective = Callable[[Any, Mapping[str, Any]], Any]


def _inputs(batch: Mapping[str, Any]) -> tuple:
    x = batch["x"]
    return x if isinstance(x, tuple) else (x,)


def _quantized_loss(
    apply_fn, policy, objective, act_stats, momentum, shard_axes=None, **fq_kwargs
) -> Callable:
    """``loss_fn(params, batch, key[, act_stats])`` of ``objective`` on the fake-quantized
    ``apply_fn``; with a ``momentum`` the running activation stats are the extra argument
    and come back as the ``"act_stats"`` metric. ``shard_axes``: the axes the loss runs per
    shard of (``local_batch_axes``); delayed-scaling histories are reduced over them (the
    step's amax over all shards), EMA ranges averaged like every metric."""
    if momentum is None:

        def loss_fn(params, batch, key):
            qat = fake_quantized(apply_fn, policy, key=key, act_stats=act_stats, **fq_kwargs)
            return objective(qat(params, *_inputs(batch)), batch)

        return loss_fn
    if act_stats is not None:
        raise ValueError(
            "act_stats_momentum: the running act_stats are the step's extra argument, "
            "step(state, batch, act_stats); do not also give act_stats="
        )
    momentum = act_ema.check_momentum(momentum)  # refused when the step is built, not at its first call

    delayed = isinstance(momentum, act_delayed.DelayedScaling)

    def ema_loss_fn(params, batch, key, stats):
        qat = fake_quantized(apply_fn, policy, key=key, act_stats_momentum=momentum, **fq_kwargs)
        out, new_stats = qat(params, stats, *_inputs(batch))
        if delayed and shard_axes:
            new_stats = act_delayed.reduced_over(new_stats, shard_axes)
        value, metrics = _split(objective(out, batch))
        return value, {**metrics, "act_stats": new_stats}

    return ema_loss_fn


def _stats_argument(state_shardings: TrainState, momentum) -> tuple[tuple, tuple]:
    """``(extra_shardings, extra_names)`` of the running stats argument: replicated, and
    none without a ``momentum``."""
    if momentum is None:
        return (), ()
    return (NamedSharding(_mesh_of(state_shardings), P()),), ("act_stats",)


def _train(loss_fn, tx, state_shardings: TrainState, batch_shardings, momentum, **kwargs) -> ShardedStep:
    """:func:`train_step` of ``loss_fn``, with the running stats (``momentum``) as its
    extra argument."""
    stats, names = _stats_argument(state_shardings, momentum)
    return train_step(
        loss_fn, tx, state_shardings, batch_shardings, extra_shardings=stats, extra_names=names, **kwargs
    )


def qat_step(
    apply_fn: Callable,
    policy: Policy,
    objective: Objective,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_shardings: Any,
    *,
    integer_forward: bool = True,
    act_stats: Mapping[str, Any] | None = None,
    act_stats_momentum: float | act_delayed.DelayedScaling | None = None,
    local_batch_axes: Sequence[str] | None = None,
    donate: bool = True,
) -> ShardedStep:
    """Quantization-aware training step: ``objective(fake_quantized(apply_fn, policy)(params,
    *batch["x"]), batch)``, sharded (see :func:`train_step`).

    Args:
      apply_fn: ``apply_fn(params, *inputs)``.
      policy: the :class:`qjax.Policy` (rules with ``grad=`` train in int8: :func:`int8_step`).
      objective: ``objective(outputs, batch) -> loss`` or ``(loss, metrics)``.
      tx, state_shardings, batch_shardings, donate, local_batch_axes: see :func:`train_step`.
      integer_forward, act_stats: see :func:`qjax.fake_quantized` (``act_stats``: static
        activation scales from :func:`qjax.calibrate`, trained as served for static W8A8).
      act_stats_momentum: running-average static scales (see :func:`qjax.fake_quantized`):
        the step becomes ``step(state, batch, act_stats) -> (state, metrics)`` with the
        updated stats (replicated) in ``metrics["act_stats"]``; with ``local_batch_axes``
        each shard updates from its own rows and the updates are averaged. A
        :class:`qjax.DelayedScaling` takes and returns ``{path: ActHistory}``; with
        ``local_batch_axes`` the pushed range is the min / max over the shards (the step's
        amax over the whole batch; the mean every metric then takes over the shards can
        move it by a float32 rounding when their count is not a power of two).

    Example:
      >>> objective = lambda logits, b: xent(logits, b["y"])
      >>> step = qat_step(model.apply, policy, objective, tx, sh, batch_shardings(mesh, batch))
      >>> ema = qat_step(model.apply, policy, objective, tx, sh, bsh, act_stats_momentum=0.99)
      >>> state, metrics = ema(state, batch, stats); stats = metrics.pop("act_stats")
    """
    loss_fn = _quantized_loss(
        apply_fn,
        policy,
        objective,
        act_stats,
        act_stats_momentum,
        local_axes(_mesh_of(state_shardings), local_batch_axes),
        integer_forward=integer_forward,
    )
    return _train(
        loss_fn,
        tx,
        state_shardings,
        batch_shardings,
        act_stats_momentum,
        donate=donate,
        local_batch_axes=local_batch_axes,
    )


def int8_step(
    apply_fn: Callable,
    policy: Policy,
    objective: Objective,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_shardings: Any,
    *,
    local_scales: bool = False,
    batch_axes: Sequence[str] = BATCH_AXES,
    local_batch_axes: Sequence[str] | None = None,
    act_stats: Mapping[str, Any] | None = None,
    act_stats_momentum: float | act_delayed.DelayedScaling | None = None,
    donate: bool = True,
) -> ShardedStep:
    """int8 training step (AQT-style: forward and both backward matmuls in int8, rules with
    ``grad=``; an ``OpRule``'s op keeps its float fake-quant forward), sharded.

    The weight-gradient matmul contracts over the batch; its per-channel scales are maxima
    over the batch, so with the batch sharded they need an all-reduce (max). With
    ``local_scales=True`` every batch shard quantizes with scales from its own rows, runs its
    integer matmuls locally and only the float gradients are averaged: no all-reduce of
    scales (the result differs from the global-scale step by the scales' locality; it
    equals averaging the single-device step's gradients over the shards).

    Args:
      apply_fn, policy, objective, tx, state_shardings, batch_shardings, act_stats,
        act_stats_momentum, donate: see :func:`qat_step`.
      local_scales: per-shard local scales (see above).
      batch_axes: the mesh axes the batch is split over (for ``local_scales``).
      local_batch_axes: the same as ``local_scales=True, batch_axes=...`` in
        :func:`qat_step`'s terms: the loss runs per shard of these axes.

    Raises:
      ValueError: no rule of ``policy`` has a ``grad`` spec; ``local_batch_axes`` together
        with ``local_scales``.
    """
    if not any(r.grad is not None for r in (*policy.rules, *policy.op_rules)):
        raise ValueError("int8_step: no rule of the policy has grad= (int8 training); use qat_step")
    if local_batch_axes is not None and local_scales:
        raise ValueError(
            "int8_step: give local_batch_axes=... or local_scales=True (with batch_axes=...), not both"
        )
    if local_batch_axes is None and local_scales:
        local_batch_axes = tuple(batch_axes)
    return qat_step(
        apply_fn,
        policy,
        objective,
        tx,
        state_shardings,
        batch_shardings,
        act_stats=act_stats,
        act_stats_momentum=act_stats_momentum,
        donate=donate,
        local_batch_axes=None if local_batch_axes is None else tuple(local_batch_axes),
    )


def prune_step(
    apply_fn: Callable,
    objective: Objective,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_shardings: Any,
    *,
    policy: Policy | None = None,
    act_stats: Mapping[str, Any] | None = None,
    act_stats_momentum: float | act_delayed.DelayedScaling | None = None,
    donate: bool = True,
) -> ShardedStep:
    """Training step with a :func:`qjax.prune.sparsify` optimizer (its masks and inner
    state sharded like the params), optionally quantization-aware (``policy``).

    Args:
      apply_fn: ``apply_fn(params, *inputs)``; the inputs are ``batch["x"]`` (a tuple for
        several).
      objective: ``objective(outputs, batch) -> loss`` or ``(loss, metrics)``.
      tx: a ``sparsify`` optimizer (any optax transformation works).
      state_shardings, batch_shardings, donate: see :func:`train_step`.
      policy: a :class:`qjax.Policy` to train quantization-aware (``fake_quantized``);
        ``None``: float.
      act_stats, act_stats_momentum: static activation scales for ``policy`` (see
        :func:`qat_step`).

    Returns:
      A :class:`ShardedStep`: ``step(state, batch) -> (state, metrics)`` (with
      ``act_stats_momentum``: ``step(state, batch, act_stats)``, see :func:`qat_step`).

    Example:
      >>> tx = qjax.prune.sparsify(optax.adam(1e-3), qjax.prune.Magnitude(0.5), qjax.prune.one_shot(2))
      >>> sh = train_state_shardings(params, tx, presets.fsdp(), mesh)
      >>> objective = lambda logits, b: xent(logits, b["y"])
      >>> step = prune_step(model.apply, objective, tx, sh, batch_shardings(mesh, batch))
    """

    if policy is None:
        if act_stats is not None or act_stats_momentum is not None:
            raise ValueError("prune_step: act_stats / act_stats_momentum need a policy")

        def loss_fn(params, batch, key):
            return objective(apply_fn(params, *_inputs(batch)), batch)

    else:
        loss_fn = _quantized_loss(apply_fn, policy, objective, act_stats, act_stats_momentum)
    return _train(loss_fn, tx, state_shardings, batch_shardings, act_stats_momentum, donate=donate)


def distill_train_step(
    student_fn: Callable,
    teacher_fn: Callable | None,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    teacher_shardings: Any,
    batch_shardings: Any,
    *,
    donate: bool = True,
    **distill_kwargs,
) -> ShardedStep:
    """Sharded teacher–student step (:func:`qjax.distill.train.distill_step`'s loss).

    The trained params are ``{"student": ..., "adapters": ...}`` (build the shardings with
    :func:`train_state_shardings` of that tree); the frozen teacher params are an extra,
    not donated argument sharded by ``teacher_shardings``.

    Args:
      student_fn, teacher_fn, loss_fn: see :func:`qjax.distill.train.distill_step`.
      tx, state_shardings, batch_shardings, donate: see :func:`train_step`.
      teacher_shardings: shardings of the teacher params (e.g. ``shardings(teacher, rules, mesh)``).
      **distill_kwargs: ``student_patterns``, ``teacher_patterns``, ``student_policy``,
        ``add_bias``, ``student_key``, ``student_act_stats``,
        ``student_act_stats_momentum`` of ``distill_step`` (with the last, the running
        stats are the step's last argument and come back in ``metrics["act_stats"]``, as
        for :func:`qat_step`), and ``stateful_loss`` (the loss state, e.g. CRD's memory
        banks, is then the step's last argument, replicated, and comes back in
        ``metrics["loss_state"]``).

    The state's step key (split every step) goes to the student: stochastic rounding of
    ``student_policy`` and, with ``student_key=True``, ``student_fn``'s own randomness
    (dropout).

    Returns:
      ``step(state, batch, teacher_params) -> (state, metrics)``
      (``step(state, batch, teacher_params, act_stats)`` with running stats,
      ``step(..., loss_state)`` last with a stateful loss).
    """
    if distill_kwargs.get("teacher_momentum") is not None:
        raise ValueError(
            "distill_train_step does not carry a momentum teacher (the teacher's params are an argument of "
            "the step): use qjax.distill.distill_step(teacher_momentum=...), or update the teacher yourself"
        )
    ds = _distill_step(student_fn, teacher_fn, loss_fn, tx, jit=False, **distill_kwargs)
    momentum = distill_kwargs.get("student_act_stats_momentum")
    stateful = distill_kwargs.get("stateful_loss", False)

    def loss(params, batch, key, teacher_params, *carried):
        act_stats = carried[0] if momentum is not None else None
        loss_state = carried[-1] if stateful else None
        return ds.loss(params, teacher_params, batch, key, act_stats, loss_state)

    stats, names = _stats_argument(state_shardings, momentum)
    if stateful:
        stats, names = (*stats, NamedSharding(_mesh_of(state_shardings), P())), (*names, "loss_state")
    return train_step(
        loss,
        tx,
        state_shardings,
        batch_shardings,
        extra_shardings=(teacher_shardings, *stats),
        extra_names=("teacher_params", *names),
        donate=donate,
    )
