"""Function transform ``fake_quantized``: quantization-aware training (the integer ops it
checks against and runs in the forward pass: :mod:`qjax.quant.serve`).

It takes the same functions and policies as ``quantized`` (see :mod:`qjax.quant.serve`)
and re-evaluates the jaxpr the same way, with fake-quantized ops in place of integer ones.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.graph.interpret import WeightRef, bind_eqn, materialize, spec_for_slice
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.spec import QuantSpec
from qjax.numerics.transposed import is_quantized
from qjax.quant import act_delayed, act_ema, ops_ragged, qat_int8
from qjax.quant import op_stats as op_stats_lib
from qjax.quant.calibrate import ActStats
from qjax.quant.policy import Policy, Rule, check_policy
from qjax.quant.policy_handler import (
    _named_errors,
    _named_materialize_errors,
    _PolicyHandler,
    _resolve_act_spec,
    _rule,
    _run,
    ragged_weight,
)
from qjax.quant.serve import _check_deployable, _operand_qarray, _quantized_op
from qjax.quant.shard_scales import fake_quant_shard
from qjax.quant.transforms import _check_scales, static_act_scales
from qjax.rules import fold_in_path


def _served_forward(eqn, ref: WeightRef, wi: int, wspec: QuantSpec, aspec: QuantSpec, fake_path):
    """The op ``qjax.quantized`` serves, as a function of the activation, the float weight
    leaf and the static activation scale ``(scale, zero_point)`` (``None``: dynamic), as
    ``quantize_params(..., act_stats=...)`` stores it with the weight (``fake_path`` where
    the scales cannot follow the weight's layout)."""

    def forward(act, w_leaf, static):
        w, perm = _operand_qarray(ref, w_leaf, wspec, fold_transposes=eqn.primitive.name == "dot_general")
        if w is None:
            return fake_path(act, w_leaf, static)
        if static is not None:
            w = w.with_act_scale(*static)
        return _quantized_op(eqn, act, w, wi, aspec, perm=perm).astype(eqn.outvars[0].aval.dtype)

    return forward


def _int_forward_fake_backward(eqn, ref: WeightRef, wi: int, wspec: QuantSpec, aspec: QuantSpec, fake_path):
    """QAT op whose forward pass is the integer op (the values of ``fake_path`` up to
    float summation order) and whose backward pass is ``fake_path``'s STE gradient, as
    Qwix's QAT does: the int8 matmul is faster than the float one on most backends."""
    forward = _served_forward(eqn, ref, wi, wspec, aspec, fake_path)

    @jax.custom_vjp
    def op(act, w_leaf, static):
        return forward(act, w_leaf, static)

    def fwd(act, w_leaf, static):
        # The fake-quant path's VJP is built here, so its residuals (the fake-quantized
        # operands and clip masks) are computed once, in the forward pass; its unused
        # float primal output is dead code for XLA.
        _, vjp_fn = jax.vjp(fake_path, act, w_leaf, static)
        return forward(act, w_leaf, static), vjp_fn

    def bwd(vjp_fn, g):
        return vjp_fn(g)

    op.defvjp(fwd, bwd)
    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _grad_times(x, factor: float):
    """``x``, with its gradient multiplied by ``factor``."""
    return x


_grad_times.defvjp(lambda x, factor: (x, None), lambda factor, _, g: (g * factor,))


class _Aux(NamedTuple):
    """What travels with a leaf (a ``scan`` over stacked layers slices it): its learned LSQ
    scale (first: ``WeightRef.aux_shared`` counts its sharing), the static activation
    scale ``(scale, zero_point)`` of the ops reading it, and with a running average the
    range ``(lo, hi)`` it is updated from."""

    lsq: jax.Array | None
    act: tuple | None
    act_range: tuple | None = None


class _FakeQuant(_PolicyHandler):
    # running averages (act_stats_momentum): an op inside a shard_map updates its range from
    # the shard's activation, each shard a read; reads average (act_ema.merged_stats)
    per_shard_emits = True

    def __init__(
        self,
        policy: Policy,
        scales: dict,
        key,
        integer_forward: bool,
        static: dict,
        ranges: dict | None = None,
        momentum: float | act_delayed.DelayedScaling | None = None,
        op_stats: dict | None = None,
    ):
        super().__init__(policy)
        self.scales, self.key, self.integer_forward, self.static = scales, key, integer_forward, static
        self.ranges, self.momentum = ranges or {}, momentum
        self.op_stats = op_stats_lib.Lookup(op_stats or {}, momentum)
        self._op_occurrences: dict[str, int] = {}  # name stack -> matched ops seen in this trace
        self.without_entry: set[str] = set()  # running stats: per-tensor specs left dynamic

    def aux(self, path: str):
        return _Aux(self.scales.get(path), self.static.get(path), self.ranges.get(path))

    def loop_reduction(self, key: str) -> str | None:
        # only running ranges are emitted: a while_loop's reads average (EMA), or give the
        # step's min / max (delayed scaling pushes the range of all of them)
        return "min_max" if isinstance(self.momentum, act_delayed.DelayedScaling) else "mean"

    def static_scale(self, ref: WeightRef, spec: QuantSpec, act, emit, valid=None) -> tuple | None:
        """The static activation scale ``(scale, zero_point)`` of an op reading ``ref``:
        the fixed one of ``act_stats=``, or the running range moved toward this batch's
        ``act`` (its ``valid`` values; emitted as the op's new range); ``None`` (dynamic)
        without stats."""
        if not isinstance(ref.aux, _Aux):
            return None
        if ref.aux.act_range is None:
            if self.momentum is not None and op_stats_lib.is_static(spec):
                self.without_entry.add(ref.path)
            return ref.aux.act
        return act_ema.moved_scale(ref.path, ref.aux.act_range, spec, act, self.momentum, emit, valid)

    def finish(self) -> None:
        super().finish()
        self.op_stats.check_all_used()
        missing = sorted(self.without_entry | self.op_stats.without_entry)
        if missing and (self.ranges or self.op_stats.stats):  # empty stats warned already
            warnings.warn(
                f"fake_quantized(act_stats_momentum=...): the running stats have no entry for {missing}, "
                "whose per-tensor act specs could take static scales: they keep dynamic scales (add "
                "their entries, e.g. from qjax.calibrate, to the starting stats)",
                stacklevel=4,
            )
        unused = sorted((set(self.static) | set(self.ranges)) - self._targeted)
        if unused:
            raise ValueError(
                f"fake_quantized: act_stats given for leaves {unused} that no matmul/conv reads as its "
                "weight: there is no activation to scale statically"
            )

    @_named_errors
    def target(self, eqn, invals, emit):
        found = self.weight(invals)
        if found is None:
            return None
        wi, ref, rule = found
        if rule is None:
            return None
        args = [materialize(x) for x in invals]
        if rule.grad is not None:
            qat_int8.check_int8_training(eqn, wi, rule, ref, self.scales)
        ai = 1 - wi
        aspec = None if rule.act is None else _resolve_act_spec(rule.act, eqn, ai)
        if aspec is not None and aspec.ste == "lsq":
            raise ValueError(f"rule {rule.pattern!r}: ste='lsq' is not supported for activations")
        static = None if aspec is None else self.static_scale(ref, aspec, args[ai], emit)

        def fake_operands(act, w_leaf, static):
            """The operands as QAT sees them, fake-quantized, in operand order."""
            operands = [None, None]
            w = self._fake_weight(ref, rule, w_leaf)
            for op in ref.ops:
                w = op.apply(w)
            operands[wi] = w
            if aspec is not None:
                scale, zero_point = (None, None) if static is None else static
                key = fold_in_path(self.key, ref.path + ":act")
                act = fake_quant(act, aspec, scale=scale, zero_point=zero_point, key=key)
            operands[ai] = act
            return operands

        def fake_path(act, w_leaf, static):
            """The QAT definition: fake-quantized operands through the original op."""
            return bind_eqn(eqn, fake_operands(act, w_leaf, static))[0]

        act, w_leaf = args[ai], ref.float_leaf()
        integer = self.integer_forward and self._integer_forward_ok(eqn, rule, aspec, ref, wi)
        if not integer:
            _check_deployable(eqn, ref, wi, rule.weight, aspec, act, w_leaf)
        if rule.grad is not None:
            forward = _served_forward(eqn, ref, wi, rule.weight, aspec, fake_path) if integer else fake_path
            if (
                aspec is not None
            ):  # the clipped STE of the range (static or dynamic), before the integer backward
                args[ai] = qat_int8.with_act_ste(args[ai], aspec, static)
            key = fold_in_path(self.key, ref.path + ":grad")

            def float_vjp(act, w_leaf, static, g):
                """The straight-through cotangents of the fake-quantized op: the
                activation's through its fake quantization (clip mask included), the weight
                view's times its elementwise STE mask (from the leaf's fake quantization,
                laid out as the view)."""
                operands, pull_operands = jax.vjp(lambda a: fake_operands(a, w_leaf, static), act)

                def op(a, w):
                    return bind_eqn(eqn, [a, w] if wi == 1 else [w, a])[0]

                out, pull = jax.vjp(op, operands[ai], operands[wi])
                d_act_hat, d_w_view = pull(g.astype(out.dtype))
                zeros = [None, None]
                zeros[ai], zeros[wi] = d_act_hat, jnp.zeros_like(operands[wi])
                (d_act,) = pull_operands(zeros)
                _, pull_mask = jax.vjp(lambda wl: self._fake_weight(ref, rule, wl), w_leaf)
                (mask,) = pull_mask(jnp.ones_like(w_leaf))
                for layout in ref.ops:
                    mask = layout.apply(mask)
                return d_act, d_w_view * mask.astype(d_w_view.dtype)

            return [
                qat_int8.int8_training(
                    eqn, forward, args, (w_leaf, static), wi, rule, ref.path, key, float_vjp
                )
            ]
        if integer:
            op = _int_forward_fake_backward(eqn, ref, wi, rule.weight, aspec, fake_path)
            return [op(act, w_leaf, static)]
        return [fake_path(act, w_leaf, static)]

    @_named_errors
    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot`` reading an expert weight: the weight fake-quantized by its
        rule, the activation by the rule's ``act`` spec (per row for ``PER_TOKEN``), as
        ``quantized`` serves it: a weight whose scales cannot follow the op's layout or vary
        along K is served with a float activation, so it gets none here either. A ``grad``
        spec (int8 training) trains it with this forward and the fake-quant STE backward."""
        ref = ragged_weight(eqn, invals)
        rule = None if ref is None else _rule(self.policy, ref.path)
        if rule is None:
            return None
        aspec = rule.act
        if aspec is not None:
            if aspec.ste == "lsq":
                raise ValueError(f"rule {rule.pattern!r}: ste='lsq' is not supported for activations")
            served = jax.eval_shape(lambda leaf: _operand_qarray(ref, leaf, rule.weight)[0], ref.leaf)
            if served is None or ops_ragged.check_weight(served) is not None:
                aspec = None
        act = invals[0]
        if aspec is not None:
            act = ops_ragged.grouped_rows(act, invals[2])  # padding rows set no scale
            aspec = ops_ragged.row_spec(aspec)
            static = self.static_scale(ref, aspec, act, emit, ops_ragged.valid_rows(act, invals[2]))
            scale, zero_point = (None, None) if static is None else static
            key = fold_in_path(self.key, ref.path + ":act")
            act = fake_quant(act, aspec, scale=scale, zero_point=zero_point, key=key)
        self._targeted.add(ref.path)
        return bind_eqn(eqn, [act, self.materialize(ref), invals[2]])

    def quantize_activation_op(self, eqn, invals, lhs_spec, rhs_spec, scope: str, emit):
        """A matmul between two activations matched by an ``OpRule``: each operand with a
        spec fake-quantized (the calibrated scale of ``act_stats``' ``"op:..."`` entry, else
        dynamic; straight-through gradients), then the op. With the rule's ``grad`` (int8
        training) that is the forward pass and both backward matmuls are integer matmuls;
        a static operand's gradient gets its range's clip mask first."""
        specs, statics = (lhs_spec, rhs_spec), []
        for x, spec, side in zip(invals, specs, op_stats_lib.SIDES, strict=True):
            statics.append(None if spec is None else self.op_stats.scale(scope, side, spec, x, emit))
        # the ops sharing a name stack (two einsums in one named_scope) draw their own
        # stochastic rounding: the n-th such op folds n into its keys
        seen = self._op_occurrences.get(scope, 0)
        self._op_occurrences[scope] = seen + 1
        where = scope if seen == 0 else f"{scope}#{seen}"

        def forward(lhs, rhs, statics):
            operands = []
            for x, spec, side, static in zip((lhs, rhs), specs, op_stats_lib.SIDES, statics, strict=True):
                if spec is not None:
                    scale, zero_point = static or (None, None)
                    key = fold_in_path(self.key, f"{where}:{side}")
                    x = fake_quant(x, spec, scale=scale, zero_point=zero_point, key=key)
                operands.append(x)
            return bind_eqn(eqn, operands)[0]

        grad = self.policy.op_match(scope).value.grad
        if grad is None:
            return [forward(*invals, statics)]
        named = f"matmul at name scope {scope!r} (op rule {self.policy.op_match(scope).pattern!r})"
        key = fold_in_path(self.key, f"{where}:grad")
        return [qat_int8.op_int8_training(eqn, forward, invals, specs, statics, grad, key, named)]

    def _fake_weight(self, ref: WeightRef, rule: Rule, w_leaf):
        """The float leaf ``w_leaf`` of ``ref`` fake-quantized by the rule's weight spec (as
        is without one)."""
        if rule.weight is None:
            return w_leaf
        spec = spec_for_slice(rule.weight, ref.depth)
        key = fold_in_path(self.key, ref.path)
        scale = ref.aux.lsq if isinstance(ref.aux, _Aux) else None
        if scale is not None and ref.aux_shared > 1:
            # one learned scale shared by every layer of a scan: LSQ scales its gradient by
            # 1/sqrt(elements per scale), and those are the slice's times the number of
            # slices sharing it
            scale = _grad_times(scale, 1.0 / math.sqrt(ref.aux_shared))
        if scale is None and spec.ste == "lsq":
            raise ValueError(
                "ste='lsq' learns the scale: pass scales={path: scale} to fake_quantized (initialise "
                "them with qjax.lsq_scales(params, policy)), or params as qjax.lsq_params(params, policy)"
            )
        if scale is None and any(ref.shard_axes):  # a shard, scaled as the whole weight
            return fake_quant_shard(w_leaf, spec, key, ref.shard_axes)
        return fake_quant(w_leaf, spec, scale=scale, key=key)

    @_named_materialize_errors
    def materialize(self, ref: WeightRef):
        """A weight read by an op that is not a matmul or conv (an embedding lookup, an
        elementwise op): fake-quantized by its rule, as :func:`fake_quant_params` and the
        deployed model read it."""
        rule = _rule(self.policy, ref.path)
        if rule is None or is_quantized(ref.leaf):
            return materialize(ref)
        w = self._fake_weight(ref, rule, ref.float_leaf())
        for op in ref.ops:
            w = op.apply(w)
        return w

    def _integer_forward_ok(self, eqn, rule: Rule, aspec, ref: WeightRef, wi: int) -> bool:
        """Whether the forward pass can run as the integer op: both operands integer,
        deterministic rounding, no learned scales, static layout ops."""
        specs = (rule.weight, aspec)
        if any(s is None or s.format.is_float or s.rounding != "nearest" or s.ste == "lsq" for s in specs):
            return False
        if ref.path in self.scales or any(op.operands for op in ref.ops) or any(ref.shard_axes):
            return False
        return eqn.primitive.name == "dot_general" or wi == 1


def fake_quantized(
    f: Callable,
    policy: Policy,
    *,
    scales: dict | None = None,
    key=None,
    integer_forward: bool = True,
    act_stats: dict | None = None,
    act_stats_momentum: float | act_delayed.DelayedScaling | None = None,
) -> Callable:
    """``f`` with the weights and activations of its matmuls/convs fake-quantized, for
    quantization-aware training.

    Weights go through :func:`qjax.fake_quant` in their stored layout (so per-channel axes
    are the leaf's), activations through ``fake_quant`` with the rule's ``act`` spec
    (``PER_TOKEN`` resolved per op). Gradients follow each spec's ``ste`` rule, for
    convolutions too. Rules with a ``grad`` spec train in integers instead (AQT-style):
    the forward pass is the same as without ``grad`` (the weight and activation quantized
    as their specs say, as ``quantized`` serves them), and both backward matmuls run as
    integer matmuls: the saved weight and activation re-quantized in their formats with
    one scale per row of each matmul, the gradient quantized by ``grad``, per tensor
    (``channel_axes=()``) or per row (``qjax.PER_TOKEN``); other ``grad`` granularities,
    LSQ weight specs and learned scales raise a ``ValueError`` naming the leaf (see
    :func:`qjax.quant.int8_training.int8_dot_general`).

    Activation scales are computed from each batch (dynamic), as ``quantized`` serves a
    weight stored without a calibrated activation scale. For static W8A8 pass the
    calibration deployment uses, ``act_stats=qjax.calibrate(f, policy, params, batches)``:
    the ops reading those leaves then quantize their activation with exactly the scale
    and zero point ``quantize_params(..., act_stats=act_stats)`` stores and ``quantized``
    serves (per layer in a ``scan`` stack), in the integer forward too, and its gradient is
    the spec's STE (``"clipped"``: zero outside the calibrated range). With ``grad=``
    (int8 training) the activation gradient gets that clip mask; the backward matmuls
    still re-quantize the saved activation per row. Weights of a ``scan`` stack are scaled
    per layer (see the README for exporting them exactly).

    With ``act_stats_momentum=m`` the static ranges are running averages that follow the
    activations as the weights train (:mod:`qjax.quant.act_ema`): the function takes the
    current stats as its second argument and returns the updated ones,
    ``g(params, act_stats, *args) -> (outputs, new_act_stats)``. Each op moves its range
    toward the one its calibrator gives the batch (``lo <- m lo + (1 - m) lo_batch``, the
    same for ``hi``; no gradient flows into it) and quantizes with the updated range; a
    weight read several times averages its reads' ranges (as do the shards of a
    ``shard_map`` body and the iterations of a ``while_loop``), an op that did not run (an
    untaken ``cond`` branch) or saw NaN keeps its range. Start from
    ``qjax.calibrate`` stats (one batch is enough); the final stats go to
    ``quantize_params(..., act_stats=...)``, so the deployed scales are the trained ones.

    A user's ``jax.custom_vjp`` / ``custom_jvp`` keeps its derivative rule unless a matmul
    or conv inside it reads a weight some rule matches: that body is then evaluated inline,
    so the user's rule (e.g. a hand-written straight-through estimator) is replaced by
    the transform's, the fake-quant STE of the matched weight. A leaf whose rule has an
    ``act`` or ``grad`` spec but that no matmul/conv reads as its weight (a weight
    concatenated or padded at call time) triggers a ``UserWarning`` naming it.

    A weight reaches its rule through layout ops only (transpose, reshape, slice, ...): an
    op that computes with it first (a pruning mask ``w * m``, a LoRA merge ``w + a @ b``,
    weight normalisation) gets the weight fake-quantized *at the leaf*, with scales of the
    leaf's values. So apply pruning masks to the params before calling the transformed
    function, ``fake_quantized(f, policy)(apply_masks_ste(params, masks), x)``, when the
    deployed model quantizes the masked weight.

    A ``lax.ragged_dot`` (mixture of experts) reading an expert weight ``(G, K, N)`` is
    fake-quantized as ``quantized`` serves it (weight by its rule, activation by ``act``).
    A matmul between two activations (attention, a KV cache) that one of the policy's
    :class:`qjax.OpRule` matches by name scope gets both operands fake-quantized with
    dynamic scales (their specs' ``ste`` gradients), as ``quantized`` serves it, or with
    the rule's ``grad`` spec both its backward matmuls run as integer matmuls (int8
    training of attention); an ``OpRule`` that matches no such op raises a ``ValueError``
    listing their name stacks.

    Args:
      f: ``f(params, *args, **kwargs)``.
      policy: the :class:`qjax.Policy`.
      scales: learned LSQ weight scales ``{path: scale}`` (see :func:`qjax.lsq_scales`);
        or pass ``params`` as a :class:`qjax.LSQParams` (:func:`qjax.lsq_params`), which
        carries them (what the ready-made training steps train).
      key: PRNG key for stochastic rounding.
      integer_forward: run the forward pass of ops whose weight and activation are both
        integer-quantized (round-to-nearest, no learned scales) as the integer op, with
        the fake-quant STE backward (faster; equal to the fake-quant forward up to float
        summation order). ``False``: the float fake-quant forward everywhere.
      act_stats: ``{path: ActStats}`` from :func:`qjax.calibrate`: static activation
        scales for the ops reading each leaf, as :func:`qjax.quantize_params` takes them
        (its per-tensor ``act`` spec turns the range into a scale and zero point). Leaves
        without an entry keep dynamic activation scales, as served. Its ``"op:..."``
        entries give ``OpRule`` operands static scales, as ``quantized(op_stats=...)``.
      act_stats_momentum: ``None`` (default): fixed static scales (``act_stats``). A number
        in ``[0, 1)``: running-average ranges, passed at each call (see above; then
        ``act_stats`` must be ``None``). Flax ``BatchNorm``'s convention: 0.99 keeps 99% of
        the old range per step; 0 takes each batch's range. A :class:`qjax.DelayedScaling`:
        delayed scaling (the fp8 training recipe), the running state a
        ``{path: ActHistory}`` of each op's last ranges; each op quantizes with the range
        of its history (earlier steps only) and pushes this batch's range
        (:mod:`qjax.quant.act_delayed`); reads of one entry push their min / max.

    Returns:
      A function with ``f``'s signature; with ``act_stats_momentum``,
      ``g(params, act_stats, *args, **kwargs) -> (outputs, new_act_stats)``.

    Raises:
      ValueError: a rule that does not fit its leaf or op (the message names the leaf and
        the rule); an ``act_stats`` path that is not a leaf, whose rule has no weight spec or
        no per-tensor ``act`` spec (as :func:`qjax.quantize_params`), or that no matmul/conv
        reads as its weight; an ``act_stats_momentum`` outside ``[0, 1)`` or given with
        ``act_stats``.

    Example:
      >>> loss = lambda p, x, y: xent(qjax.fake_quantized(model.apply, policy)(p, x), y)
      >>> stats = qjax.calibrate(model.apply, policy, params, batches)   # static W8A8
      >>> qat = qjax.fake_quantized(model.apply, policy, act_stats=stats)
      >>> ema = qjax.fake_quantized(model.apply, policy, act_stats_momentum=0.99)
      >>> logits, stats = ema(params, stats, x)   # in the train step (has_aux=True)
      >>> delayed = qjax.fake_quantized(model.apply, policy, act_stats_momentum=qjax.DelayedScaling(16))
    """
    check_policy(policy)
    if act_stats_momentum is None:

        @functools.wraps(f)
        def g(params, *args, **kwargs):
            # an LSQParams brings its scales; a misspelt path is an error, as for fake_quant_params
            params, learned = _check_scales(params, scales)
            static = static_act_scales(params, policy, act_stats)
            ops = op_stats_lib.split(act_stats)[1]
            handler = lambda: _FakeQuant(policy, learned, key, integer_forward, static, op_stats=ops)
            return _run(f, handler, params, args, kwargs)[0]

        return g

    momentum = act_ema.check_momentum(act_stats_momentum)
    if act_stats is not None:
        raise ValueError(
            "fake_quantized: with act_stats_momentum the stats are running averages passed at each call, "
            "g(params, act_stats, *args) -> (outputs, new_act_stats); do not also give act_stats= here"
        )

    delayed = isinstance(momentum, act_delayed.DelayedScaling)

    @functools.wraps(f)
    def g_ema(params, act_stats, *args, **kwargs):
        if delayed:
            momentum.check(act_stats)
            current = momentum.ranges(act_stats)
        elif isinstance(act_stats, dict) and all(isinstance(v, ActStats) for v in act_stats.values()):
            current = act_stats
        else:
            inner = [type(v).__name__ for v in act_stats.values()] if isinstance(act_stats, dict) else []
            raise TypeError(
                "fake_quantized(act_stats_momentum=...) takes the running {path: ActStats} as its second "
                f"argument (start from qjax.calibrate); got {type(act_stats).__name__}"
                + (f" of {sorted(set(inner))}" if inner else "")
                + (
                    " (ActHistory: pass act_stats_momentum=qjax.DelayedScaling(...))"
                    if "ActHistory" in inner
                    else ""
                )
            )
        if not act_stats:
            warnings.warn(
                "fake_quantized(act_stats_momentum=...): the running stats are empty, so every op keeps "
                "dynamic activation scales; start from qjax.calibrate with per-tensor act specs (ops "
                "without an entry stay dynamic)",
                stacklevel=2,
            )
        params, learned = _check_scales(params, scales)
        static_act_scales(params, policy, current)  # the same checks as fixed stats
        # delayed scaling: the walk sees each history's range (what the scale comes from), a
        # value of the leaf's own shape, so scan stacks and shard_map specs slice it as a range
        leaves, ops = op_stats_lib.split(current)
        ranges = {path: (s.lo, s.hi) for path, s in leaves.items()}
        handler = lambda: _FakeQuant(policy, learned, key, integer_forward, {}, ranges, momentum, ops)
        out, emitted = _run(f, handler, params, args, kwargs)
        return out, act_ema.merged_stats(act_stats, emitted, momentum)

    return g_ema
