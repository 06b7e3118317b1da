"""Teacher–student training: one jitted step that runs a frozen teacher and a trained
student (optionally fake-quantized), captures the features the loss needs, and updates
the student and its adapters with optax.

The teacher is frozen twice over: its params are a separate argument of the step (they
are never in the optimizer state and never returned) and both its params and its outputs
pass through ``jax.lax.stop_gradient``, so no gradient is computed for them. The trained
pytree is ``{"student": student_params, "adapters": adapters}``: adapters (e.g. FitNets
regressors, :func:`qjax.distill.init_adapter`) train with the student and are dropped
after distillation.

When ``batch["teacher"]`` holds cached teacher outputs (logits or a
:class:`qjax.distill.TopKTeacher` from :func:`cache_teacher`), the teacher forward pass is
skipped (teacher features cannot come from the cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax.distill.capture import Features, capture
from qjax.distill.soft_targets import kd_loss
from qjax.distill.topk import TopKTeacher, topk_teacher
from qjax.quant import act_delayed, act_ema
from qjax.quant.calibrate import ActStats
from qjax.quant.lsq_params import LSQParams
from qjax.quant.policy import Policy
from qjax.quant.qat import fake_quantized
from qjax.quant.transforms import lsq_scales


class Outputs(NamedTuple):
    """What a model produced in a step: its output (logits; for a cached teacher, the
    cached logits or :class:`TopKTeacher`) and the captured ``{path: {"input", "output"}}``."""

    logits: Any
    features: Features


class DistillState(NamedTuple):
    """Trained params ``{"student", "adapters"}``, optimizer state, step count, (with
    ``student_act_stats_momentum``) the student's running activation stats, (with
    ``stateful_loss``) the loss's own state, e.g. CRD's memory banks, and (with
    ``teacher_momentum``) the teacher's params, a moving average of the student's."""

    params: dict[str, Any]
    opt_state: Any
    step: jax.Array
    act_stats: Any = None
    loss_state: Any = None
    teacher: Any = None


class DistillStep(NamedTuple):
    """The functions :func:`distill_step` builds.

    Attributes:
      init: ``init(student_params, adapters=None, act_stats=None, loss_state=None) ->
        DistillState``.
      loss: ``loss(params, teacher_params, batch, key=None, act_stats=None,
        loss_state=None) -> (loss, metrics)`` (not jitted), ``params`` being ``{"student",
        "adapters"}``; with running stats, ``metrics["act_stats"]`` holds the updated ones,
        with a stateful loss ``metrics["loss_state"]`` the loss's new state.
      step: ``step(state, teacher_params, batch, key=None) -> (state, metrics)`` (jitted
        unless ``jit=False``); ``key``: this step's PRNG key (see :func:`distill_step`).
    """

    init: Callable[..., DistillState]
    loss: Callable[..., tuple[jax.Array, dict]]
    step: Callable[..., tuple[DistillState, dict]]


LossFn = Callable[[Outputs, Outputs, Mapping[str, Any], Any], Any]


def _args(batch: Mapping[str, Any]) -> tuple:
    x = batch["x"]
    return x if isinstance(x, tuple) else (x,)


def _forward(
    fn: Callable,
    patterns: Sequence[str] | None,
    add_bias: bool,
    policy: Policy | None,
    act_stats=None,
    momentum: float | act_delayed.DelayedScaling | None = None,
):
    """``(key, params, stats, *args) -> ((output, features), new_stats)``; capture inside,
    fake-quant outside (with ``key`` for stochastic rounding, ``act_stats`` for static
    activation scales, or the running ``stats`` moved by ``momentum``; ``new_stats`` is
    ``stats`` without a momentum)."""
    if patterns:
        f = capture(fn, patterns, add_bias=add_bias)
    else:
        f = lambda p, *a: (fn(p, *a), {})
    if policy is None:
        return lambda key, p, stats, *a: (f(p, *a), stats)
    if momentum is None:
        return lambda key, p, stats, *a: (
            fake_quantized(f, policy, key=key, act_stats=act_stats)(p, *a),
            stats,
        )
    return lambda key, p, stats, *a: fake_quantized(f, policy, key=key, act_stats_momentum=momentum)(
        p, stats, *a
    )


def _student_keys(key: Any, student_key: bool) -> tuple[Any, tuple]:
    """This step's key for the student's stochastic rounding, and the extra argument
    ``(key,)`` for ``student_fn`` when it takes one (two independent keys then)."""
    if not student_key:
        return key, ()
    if key is None:
        raise ValueError("distill_step(student_key=True): the student needs a PRNG key: pass key=")
    k_round, k_fn = jax.random.split(key)
    return k_round, (k_fn,)


def distill_step(
    student_fn: Callable,
    teacher_fn: Callable | None,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    student_patterns: Sequence[str] | None = None,
    teacher_patterns: Sequence[str] | None = None,
    student_policy: Policy | None = None,
    add_bias: bool = False,
    student_key: bool = False,
    student_act_stats: dict | None = None,
    student_act_stats_momentum: float | act_delayed.DelayedScaling | None = None,
    stateful_loss: bool = False,
    teacher_momentum: float | None = None,
    jit: bool = True,
) -> DistillStep:
    """Build the init / loss / step functions of teacher–student training.

    Args:
      student_fn: ``student_fn(params, *inputs)`` (Linen ``apply``,
        ``qjax.nnx_apply(graphdef)``, plain function).
      teacher_fn: the same for the teacher; ``None``: only cached outputs
        (``batch["teacher"]``) or no teacher at all (``teacher.logits`` is ``None``).
      loss_fn: ``loss_fn(student, teacher, batch, adapters)`` with ``student`` and
        ``teacher`` :class:`Outputs`; returns a scalar or ``(scalar, metrics_dict)``.
      tx: the optax optimizer of the student and adapters.
      student_patterns / teacher_patterns: param-path patterns of the layers to capture
        (:func:`qjax.distill.capture`).
      student_policy: fake-quantize the student with this :class:`qjax.Policy`
        (``qjax.fake_quantized``) while distilling: quantization-aware distillation in
        the same step and the same jit. With ``ste="lsq"`` weight specs, ``init`` makes the
        student a :class:`qjax.LSQParams` (params and learned scales, trained together;
        export with ``qjax.quantize_params(state.params["student"], policy)``).
      add_bias: captured outputs include the layer's bias.
      student_key: call ``student_fn(params, *inputs, key)`` with a PRNG key of its own
        each step, e.g. for dropout: ``lambda v, x, k: model.apply(v, x, rngs={"dropout": k})``
        (the teacher runs deterministically).
      student_act_stats: ``{path: ActStats}`` (:func:`qjax.calibrate` of the student):
        static activation scales for ``student_policy``, as served for static W8A8
        (``fake_quantized(..., act_stats=...)``).
      student_act_stats_momentum: running-average static activation ranges instead
        (``fake_quantized(..., act_stats_momentum=...)``): give the starting stats to
        ``init(..., act_stats=qjax.calibrate(...))``; the state carries them
        (``state.act_stats``) and each step moves them (``student_act_stats`` must then be
        ``None``). A :class:`qjax.DelayedScaling` instead: delayed scaling, the starting
        state ``DelayedScaling.init(qjax.calibrate(...))`` (``init`` makes it from calibrated
        stats given as they are).
      stateful_loss: ``loss_fn`` keeps a state of its own across steps (CRD's memory banks,
        :func:`qjax.distill.crd_loss`): it is called ``loss_fn(student, teacher, batch,
        adapters, loss_state, key)`` and returns ``(scalar, metrics, new_loss_state)``. Give
        the starting state to ``init(..., loss_state=...)``; the state carries it
        (``state.loss_state``, no gradient). ``key`` is this step's key folded with a
        constant (independent of the student's), ``None`` when the step has none.
      teacher_momentum: a momentum (mean) teacher, as in Mean Teacher and self-distillation:
        the teacher's params are ``m · teacher + (1 − m) · student`` after every step, kept
        in ``state.teacher`` (started from the student, or ``init(..., teacher=...)``; in
        float32 at least, so a bf16 student's small updates are not rounded away);
        ``teacher_fn`` must take the student's params (the same architecture, float: an
        LSQ student is refused), and ``step`` takes ``teacher_params=None``.
      jit: jit the step.

    ``batch`` is a mapping with ``"x"`` (the model input, or a tuple of inputs), the
    labels the loss reads (e.g. ``"y"``), and optionally ``"teacher"`` (cached outputs).
    The ``key`` given to ``loss`` / ``step`` (a typed or raw PRNG key; pass a fresh one
    every step, e.g. ``jax.random.fold_in(key, step)``) drives the student policy's
    stochastic rounding and, with ``student_key``, the student function's randomness
    (split in two); :func:`qjax.parallel.distill_train_step` passes its step key.

    Student BatchNorm statistics are not updated (the student is applied without mutable
    collections): run its norms with ``use_running_average=True`` and keep the statistics
    out of the trained params, e.g. ``student_fn = lambda p, x: model.apply({"params": p,
    "batch_stats": stats}, x)`` (otherwise the optimizer would train them as parameters).

    Example:
      >>> ds = distill_step(student.apply, teacher.apply, kd_objective(4.0, 0.9), optax.adam(1e-3))
      >>> state = ds.init(student_vars)
      >>> state, metrics = ds.step(state, teacher_vars, {"x": x, "y": y})
    """
    momentum = student_act_stats_momentum
    if momentum is not None:
        if student_policy is None or student_act_stats is not None:
            raise ValueError(
                "student_act_stats_momentum needs a student_policy, and its starting stats go to "
                "init(..., act_stats=...), not to student_act_stats="
            )
        momentum = act_ema.check_momentum(momentum)
    if teacher_momentum is not None and (teacher_fn is None or not 0 <= teacher_momentum < 1):
        raise ValueError(
            f"teacher_momentum={teacher_momentum!r}: needs a teacher_fn and 0 <= teacher_momentum < 1"
        )
    student = _forward(student_fn, student_patterns, add_bias, student_policy, student_act_stats, momentum)
    teacher = None if teacher_fn is None else _forward(teacher_fn, teacher_patterns, add_bias, None)

    def teacher_outputs(teacher_params, batch) -> Outputs:
        if "teacher" in batch:
            if teacher_patterns:
                raise ValueError("cached teacher outputs carry no features: drop teacher_patterns")
            return jax.lax.stop_gradient(Outputs(batch["teacher"], {}))
        if teacher is None:
            return Outputs(None, {})  # student-only training (e.g. a baseline with the same step)
        if teacher_params is None:
            raise ValueError("no teacher params: pass them, or cached outputs as batch['teacher']")
        (out, feats), _ = teacher(None, jax.lax.stop_gradient(teacher_params), None, *_args(batch))
        return jax.lax.stop_gradient(Outputs(out, feats))

    def loss(params, teacher_params, batch, key=None, act_stats=None, loss_state=None):
        if momentum is not None and act_stats is None:
            raise ValueError(
                "distill_step(student_act_stats_momentum=...): pass the running stats, "
                "loss(..., act_stats=stats) (step() takes them from the state: init(..., act_stats=...))"
            )
        k_round, extra = _student_keys(key, student_key)
        (s_out, s_feats), new_stats = student(k_round, params["student"], act_stats, *_args(batch), *extra)
        t = teacher_outputs(teacher_params, batch)
        student_out = Outputs(s_out, s_feats)
        if stateful_loss:
            value, metrics, new_loss_state = _stateful(
                loss_fn, student_out, t, batch, params, loss_state, key
            )
        else:
            result = loss_fn(student_out, t, batch, params["adapters"])
            value, metrics = result if isinstance(result, tuple) else (result, {})
        stats = {} if momentum is None else {"act_stats": new_stats}
        carried = {"loss_state": new_loss_state} if stateful_loss else {}
        return value, {"loss": value, **metrics, **stats, **carried}

    def init(student_params, adapters=None, act_stats=None, loss_state=None, teacher=None) -> DistillState:
        if (loss_state is None) == stateful_loss:
            raise ValueError(
                "init(loss_state=...) takes the starting state of a stateful_loss (and only then): "
                f"stateful_loss={stateful_loss}, loss_state {'missing' if loss_state is None else 'given'}"
            )
        if (act_stats is None) != (momentum is None):
            raise ValueError(
                "init(act_stats=...) takes the starting stats of student_act_stats_momentum (and only then): "
                f"momentum {momentum}, act_stats {'given' if act_stats is not None else 'missing'}"
            )
        if (
            isinstance(momentum, act_delayed.DelayedScaling)
            and isinstance(act_stats, dict)
            and all(isinstance(v, ActStats) for v in act_stats.values())
        ):
            act_stats = momentum.init(act_stats)  # calibrated ranges: the starting histories
        scales = {} if student_policy is None else lsq_scales(student_params, student_policy)
        if scales and not isinstance(student_params, LSQParams):  # ste="lsq": train the scales too
            student_params = LSQParams(student_params, scales)
        params = {"student": student_params, "adapters": {} if adapters is None else adapters}
        if teacher_momentum is None and teacher is not None:
            raise ValueError(
                "init(teacher=...) starts a momentum teacher: give distill_step(teacher_momentum=...)"
            )
        if teacher_momentum is not None:
            if isinstance(student_params, LSQParams):
                raise ValueError(
                    "teacher_momentum: the student has learned (LSQ) scales; the teacher takes float params"
                )
            # at least float32: a bf16 average with m = 0.999 would round most updates away
            wide = lambda a: jnp.asarray(a).astype(jnp.promote_types(jnp.asarray(a).dtype, jnp.float32))
            teacher = jax.tree.map(wide, student_params if teacher is None else teacher)
            if jax.tree.structure(teacher) != jax.tree.structure(student_params):
                raise ValueError(
                    "init(teacher=...): the momentum teacher's params must have the student's structure"
                )
        return DistillState(params, tx.init(params), jnp.zeros((), jnp.int32), act_stats, loss_state, teacher)

    def step(state: DistillState, teacher_params, batch, key=None):
        if teacher_momentum is not None:
            if teacher_params is not None:
                raise ValueError(
                    "distill_step(teacher_momentum=...): the teacher is state.teacher; pass None"
                )
            teacher_params = state.teacher
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
            state.params, teacher_params, batch, key, state.act_stats, state.loss_state
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        act_stats = metrics.pop("act_stats", state.act_stats)
        loss_state = metrics.pop("loss_state", state.loss_state)
        teacher = state.teacher
        if teacher_momentum is not None:  # after the update, as Mean Teacher
            teacher = jax.tree.map(
                lambda t, s: teacher_momentum * t + (1 - teacher_momentum) * s.astype(t.dtype),
                teacher,
                jax.lax.stop_gradient(params["student"]),
            )
        return DistillState(params, opt_state, state.step + 1, act_stats, loss_state, teacher), metrics

    return DistillStep(init, loss, jax.jit(step) if jit else step)


_LOSS_KEY = 0x4C055  # folded into the step key for a stateful loss's own randomness


def _stateful(loss_fn, student: Outputs, teacher: Outputs, batch, params, loss_state, key):
    """``(value, metrics, new_loss_state)`` of a stateful ``loss_fn``; checked."""
    if loss_state is None:
        raise ValueError(
            "distill_step(stateful_loss=True): pass the loss state, loss(..., loss_state=state) "
            "(step() takes it from the state: init(..., loss_state=...))"
        )
    loss_key = None if key is None else jax.random.fold_in(key, _LOSS_KEY)
    result = loss_fn(student, teacher, batch, params["adapters"], loss_state, loss_key)
    if not isinstance(result, tuple) or len(result) != 3:
        raise ValueError(
            "distill_step(stateful_loss=True): loss_fn must return (loss, metrics, new_loss_state), "
            f"got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        )
    value, metrics, new_state = result
    if new_state is None:
        raise ValueError("distill_step(stateful_loss=True): loss_fn returned None as the new loss state")
    return value, metrics, jax.lax.stop_gradient(new_state)


def kd_objective(temperature: float = 4.0, alpha: float = 0.9, *, label_key: str = "y", **kwargs) -> LossFn:
    """A ``loss_fn`` for :func:`distill_step`: :func:`qjax.distill.kd_loss` of the
    student and teacher logits and ``batch[label_key]`` (extra keyword arguments go to
    ``kd_loss``)."""

    def loss_fn(student: Outputs, teacher: Outputs, batch, adapters):
        del adapters
        return kd_loss(student.logits, teacher.logits, batch[label_key], temperature, alpha, **kwargs)

    return loss_fn


def cache_teacher(
    teacher_fn: Callable,
    teacher_params: Any,
    inputs: Any,
    *,
    k: int,
    temperature: float,
    standardize: bool = False,
    batch_size: int = 512,
) -> TopKTeacher:
    """Run the teacher once over ``inputs`` (an array, or a tuple of arrays, with
    examples on the leading axis) and keep its top-``k`` tempered log-probabilities
    (:func:`qjax.distill.topk_teacher`). Index the result with example indices
    (``cache[idx]``) and pass it as ``batch["teacher"]``."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    n = len(args[0])

    @jax.jit
    def one(params, *xs):
        return topk_teacher(teacher_fn(params, *xs), k, temperature, standardize=standardize)

    parts = [one(teacher_params, *(a[i : i + batch_size] for a in args)) for i in range(0, n, batch_size)]
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate([np.asarray(x) for x in xs])), *parts)
