"""Function transforms: ``quantized`` and ``fake_quantized`` (``calibrate``: :mod:`qjax.quant.calibrate`).

Each takes any ``f(params, *args, **kwargs)`` (a Linen ``apply``, an NNX model split into
graphdef/state, a plain function) and re-evaluates its jaxpr with the matmuls and
convolutions that read a params leaf replaced (see :mod:`qjax.graph`). The policy rule
matched by that leaf's path gives the weight spec and the activation spec of the op.
Positional arguments after ``params`` are traced; keyword arguments are static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
from jax import lax

from qjax.graph.interpret import LayoutOp, WeightRef, bind_eqn, materialize, spec_for_slice
from qjax.graph.layout import apply_layout
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec
from qjax.numerics.transposed import TransposedQArray, is_quantized
from qjax.quant.int8_training import int8_dot_general
from qjax.quant.int8_training_conv import int8_conv_general_dilated
from qjax.quant.lsq_params import reject_lsq_params
from qjax.quant.ops_conv import CONV_GEOMETRY
from qjax.quant.policy import Policy, Rule, check_policy
from qjax.quant.policy_handler import (
    _named_errors,
    _named_materialize_errors,
    _PolicyHandler,
    _resolve_act_spec,
    _rule,
    _run,
)
from qjax.quant.shard_scales import fake_quant_shard
from qjax.quant.transforms import _check_scales
from qjax.rules import fold_in_path

# -- fake_quantized (QAT) -------------------------------------------------------------


def _int_forward_fake_backward(eqn, ref: WeightRef, wi: int, wspec: QuantSpec, aspec: QuantSpec, fake_path):
    """QAT op whose forward pass is the integer op (the values of ``fake_path`` up to
    float summation order) and whose backward pass is ``fake_path``'s STE gradient, as
    Qwix's QAT does: the int8 matmul is faster than the float one on most backends."""

    def forward(act, w_leaf):
        w, perm = _operand_qarray(ref, w_leaf, wspec, fold_transposes=eqn.primitive.name == "dot_general")
        if w is None:
            return fake_path(act, w_leaf)
        return _quantized_op(eqn, act, w, wi, aspec, perm=perm).astype(eqn.outvars[0].aval.dtype)

    @jax.custom_vjp
    def op(act, w_leaf):
        return forward(act, w_leaf)

    def fwd(act, w_leaf):
        # The fake-quant path's VJP is built here, so its residuals (the fake-quantized
        # operands and clip masks) are computed once, in the forward pass; its unused
        # float primal output is dead code for XLA.
        _, vjp_fn = jax.vjp(fake_path, act, w_leaf)
        return forward(act, w_leaf), vjp_fn

    def bwd(vjp_fn, g):
        return vjp_fn(g)

    op.defvjp(fwd, bwd)
    return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _grad_times(x, factor: float):
    """``x``, with its gradient multiplied by ``factor``."""
    return x


_grad_times.defvjp(lambda x, factor: (x, None), lambda factor, _, g: (g * factor,))


class _FakeQuant(_PolicyHandler):
    def __init__(self, policy: Policy, scales: dict, key, integer_forward: bool):
        super().__init__(policy)
        self.scales, self.key, self.integer_forward = scales, key, integer_forward

    def aux(self, path: str):
        # the learned LSQ scale travels with its leaf: a scan over stacked layers slices it
        return self.scales.get(path)

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
            return [self._int8_training(eqn, args, wi, rule, ref.path)]
        ai = 1 - wi
        aspec = None if rule.act is None else _resolve_act_spec(rule.act, eqn, ai)
        if aspec is not None and aspec.ste == "lsq":
            raise ValueError(f"rule {rule.pattern!r}: ste='lsq' is not supported for activations")

        def fake_path(act, w_leaf):
            """The QAT definition: fake-quantized operands through the original op."""
            operands = [None, None]
            w = self._fake_weight(ref, rule, w_leaf)
            for op in ref.ops:
                w = op.apply(w)
            operands[wi] = w
            if aspec is not None:
                act = fake_quant(act, aspec, key=fold_in_path(self.key, ref.path + ":act"))
            operands[ai] = act
            return bind_eqn(eqn, operands)[0]

        act, w_leaf = args[ai], ref.float_leaf()
        if self.integer_forward and self._integer_forward_ok(eqn, rule, aspec, ref, wi):
            return [_int_forward_fake_backward(eqn, ref, wi, rule.weight, aspec, fake_path)(act, w_leaf)]
        _check_deployable(eqn, ref, wi, rule.weight, aspec, act, w_leaf)
        return [fake_path(act, w_leaf)]

    def _fake_weight(self, ref: WeightRef, rule: Rule, w_leaf):
        """The float leaf ``w_leaf`` of ``ref`` fake-quantized by the rule's weight spec (as
        is without one)."""
        if rule.weight is None:
            return w_leaf
        spec = spec_for_slice(rule.weight, ref.depth)
        key = fold_in_path(self.key, ref.path)
        scale = ref.aux
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

    def _int8_training(self, eqn, args, wi, rule: Rule, path: str):
        name = eqn.primitive.name
        if name not in ("dot_general", "conv_general_dilated"):
            raise ValueError(
                f"leaf {path!r} (rule {rule.pattern!r}): grad= (int8 training) covers dot_general "
                f"matmuls and conv_general_dilated convolutions; {name} is not supported"
            )
        if name == "conv_general_dilated" and wi != 1:
            raise ValueError(
                f"leaf {path!r} (rule {rule.pattern!r}): grad= (int8 training) of a convolution needs the "
                "weight as the kernel (rhs) operand; here it is the input (lhs)"
            )
        specs = [None, None]
        specs[wi], specs[1 - wi] = rule.weight, rule.act
        key = fold_in_path(self.key, path + ":grad")
        if key is None and rule.grad.rounding == "stochastic":
            raise ValueError(
                f"leaf {path!r} (rule {rule.pattern!r}): the grad spec rounds stochastically: pass "
                "key= to fake_quantized (use a fresh key every step)"
            )
        if name == "conv_general_dilated":
            out = int8_conv_general_dilated(
                args[0],
                args[1],
                **_conv_geometry(eqn),
                lhs_spec=specs[0],
                rhs_spec=specs[1],
                grad_spec=rule.grad,
                key=key,
            )
        else:
            out = int8_dot_general(
                args[0],
                args[1],
                eqn.params["dimension_numbers"],
                lhs_spec=specs[0],
                rhs_spec=specs[1],
                grad_spec=rule.grad,
                key=key,
            )
        return out.astype(eqn.outvars[0].aval.dtype)


def fake_quantized(
    f: Callable, policy: Policy, *, scales: dict | None = None, key=None, integer_forward: bool = True
) -> Callable:
    """``f`` with the weights and activations of its matmuls/convs fake-quantized, for
    quantization-aware training.

    Weights go through :func:`qjax.fake_quant` in their stored layout (so per-channel axes
    are the leaf's), activations through ``fake_quant`` with the rule's ``act`` spec
    (``PER_TOKEN`` resolved per op). Gradients follow each spec's ``ste`` rule, for
    convolutions too. Rules with a ``grad`` spec train in integers instead (AQT-style):
    the forward matmul and both backward matmuls run as int8 matmuls with per-token /
    per-channel scales, the gradient quantized by ``grad`` (see
    :func:`qjax.quant.int8_training.int8_dot_general`).

    Activation scales are computed from each batch (dynamic), also for a per-tensor
    ``act`` spec that deployment serves with a static calibrated scale. Weights of a
    ``scan`` stack are scaled per layer (see the README for exporting them exactly).

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

    Returns:
      A function with ``f``'s signature.

    Example:
      >>> loss = lambda p, x, y: xent(qjax.fake_quantized(model.apply, policy)(p, x), y)
    """
    check_policy(policy)

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        # an LSQParams brings its scales; a misspelt path is an error, as for fake_quant_params
        params, learned = _check_scales(params, scales)
        return _run(f, lambda: _FakeQuant(policy, learned, key, integer_forward), params, args, kwargs)[0]

    return g


# -- quantized (integer execution) -------------------------------------------------------


# commute with transposes
_ELEMENTWISE_LAYOUT = ("convert_element_type", "copy", "copy_p", "stop_gradient", "optimization_barrier")


def _check_deployable(eqn, ref: WeightRef, wi: int, wspec: QuantSpec | None, aspec, act, w_leaf) -> None:
    """Trace (shapes only) the op ``qjax.quantized`` would run for this QAT op, so a spec
    deployment refuses (a scale along the summed axis) fails here, before training."""
    if wspec is None or is_quantized(ref.leaf) or any(ref.shard_axes):  # a shard: not the op deployed
        return
    nearest = lambda s: s if s is None else s.replace(rounding="nearest", ste="plain")

    def deployed(act, w_leaf):
        w, perm = _operand_qarray(
            ref, w_leaf, nearest(wspec), fold_transposes=eqn.primitive.name == "dot_general"
        )
        if w is None or (eqn.primitive.name == "conv_general_dilated" and wi != 1):
            return None  # deployment runs the float op on the dequantized weight
        return _quantized_op(eqn, act, w, wi, nearest(aspec), "xla", perm)

    jax.eval_shape(deployed, act, w_leaf)


def _operand_qarray(ref: WeightRef, leaf, spec: QuantSpec | None, fold_transposes: bool = False):
    """The weight as a ``QArray`` in the op's operand layout: the stored ``QArray`` (or
    ``leaf`` quantized by ``spec``), with the ref's layout ops replayed on it. ``None``
    when there is nothing to quantize or the scales cannot follow a layout op.

    Returns ``(qarray or None, perm)``. With ``fold_transposes`` the trailing transposes are
    not replayed (transposing packed int4 codes unpacks them, and any transpose copies the
    weight per call): operand axis ``i`` is then axis ``perm[i]`` of ``qarray``, for
    :func:`_quantized_op` to fold into the dot's dimension numbers; ``perm`` is ``None``
    when nothing was folded. Elementwise layout ops (dtype casts, copies) among the trailing
    transposes commute with them and are replayed (``w.astype(bf16)`` of a
    ``TransposedQArray`` still folds)."""
    ops = ref.ops
    if isinstance(leaf, TransposedQArray):  # the stored codes, read through the swap
        n = leaf.ndim
        w, ops = (
            leaf.stored,
            (LayoutOp(lax.transpose_p, {"permutation": (*range(n - 2), n - 1, n - 2)}), *ops),
        )
    elif isinstance(leaf, QArray):
        w = leaf
    elif spec is not None:
        w = quantize(leaf, spec_for_slice(spec, ref.depth))
    else:
        return None, None
    perm = None
    if fold_transposes:
        cut = len(ops)
        while cut and ops[cut - 1].primitive.name in ("transpose", *_ELEMENTWISE_LAYOUT):
            cut -= 1
        folded = [op for op in ops[cut:] if op.primitive.name == "transpose"]
        if folded:
            ops = (*ops[:cut], *(op for op in ops[cut:] if op.primitive.name != "transpose"))
            perm = list(range(len(folded[0].params["permutation"])))
            for op in folded:  # operand axis i is axis perm[i] before the transposes
                perm = [perm[a] for a in op.params["permutation"]]
            perm = None if perm == sorted(perm) else tuple(perm)
    for op in ops:
        w = apply_layout(w, op.primitive.name, op.params, op.operands, op.apply)
        if w is None:
            return None, None
    return w, perm


def _unfold_transpose(dn, wi: int, perm: tuple[int, ...], ndims: tuple[int, int]):
    """``dot_general`` dimension numbers on the weight before a transpose ``perm`` (operand
    axis ``i`` = weight axis ``perm[i]``), and the permutation that puts the result's axes
    back in the order the original dot produces.

    ``ndims``: the ranks of ``(lhs, rhs)``."""
    (lc, rc), (lb, rb) = dn
    contract, batch = (lc, lb) if wi == 0 else (rc, rb)
    contract, batch = tuple(perm[a] for a in contract), tuple(perm[a] for a in batch)
    new_dn = ((contract, rc), (batch, rb)) if wi == 0 else ((lc, contract), (lb, batch))
    # the weight's free axes come out in increasing weight-axis order; the dot wants them in
    # increasing operand-axis order
    view_free = [a for a in range(ndims[wi]) if a not in (dn[0][wi] + dn[1][wi])]
    stored_free = sorted(perm[a] for a in view_free)
    order = [stored_free.index(perm[a]) for a in view_free]
    nb = len(lb)
    n_lhs_free = ndims[0] - len(lc) - nb
    if wi == 0:
        out_perm = (
            *range(nb),
            *(nb + i for i in order),
            *range(nb + n_lhs_free, nb + n_lhs_free + ndims[1] - len(rc) - nb),
        )
    else:
        out_perm = (*range(nb + n_lhs_free), *(nb + n_lhs_free + i for i in order))
    return new_dn, out_perm


def _conv_geometry(eqn) -> dict:
    """A ``conv_general_dilated`` equation's geometry, as keyword arguments of the qjax convs."""
    return {k: eqn.params[k] for k in CONV_GEOMETRY}


def _quantized_op(eqn, act, w: QArray, wi: int, aspec: QuantSpec | None, backend: str = "auto", perm=None):
    """Run a target equation on an activation and a quantized weight (operand ``wi``);
    ``perm`` (from :func:`_operand_qarray` with ``fold_transposes``): the transpose that
    takes ``w`` to the operand, folded into a ``dot_general``'s dimension numbers."""
    from qjax.quant import ops  # the op library sits beside this module

    if perm is not None:
        ndims = [v.aval.ndim for v in eqn.invars]
        dn, out_perm = _unfold_transpose(eqn.params["dimension_numbers"], wi, perm, tuple(ndims))
        eqn = eqn.replace(params={**eqn.params, "dimension_numbers": dn})
        out = _quantized_op(eqn, act, w, wi, aspec, backend)
        return out if out_perm == tuple(range(out.ndim)) else lax.transpose(out, out_perm)

    static = {}
    if aspec is not None and w.act_scale is not None:
        static = {"lhs_scale": w.act_scale, "lhs_zero_point": w.act_zero_point}
    out_dtype = eqn.outvars[0].aval.dtype
    if eqn.primitive.name == "conv_general_dilated":
        return ops.quantized_conv_general_dilated(
            act,
            w,
            **_conv_geometry(eqn),
            lhs_spec=aspec,
            out_dtype=out_dtype,
            backend=backend,
            **static,
        )
    dn = eqn.params["dimension_numbers"]
    if wi == 1:
        return ops.quantized_dot_general(
            act, w, dn, lhs_spec=aspec, out_dtype=out_dtype, backend=backend, **static
        )
    # weight on the left: swap operands, then move the output dims back
    (lc, rc), (lb, rb) = dn
    out = ops.quantized_dot_general(
        act, w, ((rc, lc), (rb, lb)), lhs_spec=aspec, out_dtype=out_dtype, backend=backend, **static
    )
    nb = len(lb)
    n_act_free = len(eqn.invars[1].aval.shape) - len(rc) - nb
    n_w_free = out.ndim - nb - n_act_free
    perm = (*range(nb), *range(nb + n_act_free, nb + n_act_free + n_w_free), *range(nb, nb + n_act_free))
    return lax.transpose(out, perm)


def _dequantized_operand(ref: WeightRef, rule: Rule | None):
    """The float value an op reads from ``ref``: the stored weight dequantized, or a float
    leaf quantized by the rule's weight spec and dequantized, then the ref's layout ops."""
    leaf = ref.leaf
    if rule is None or rule.weight is None or isinstance(leaf, (QArray, TransposedQArray)):
        return materialize(ref)
    return materialize(dataclasses.replace(ref, leaf=quantize(leaf, spec_for_slice(rule.weight, ref.depth))))


def op_scope(path: str) -> str:
    """The ``jax.named_scope`` that ``quantized`` puts around the op reading leaf ``path``:
    profiles (HLO ``op_name`` metadata) and :func:`qjax.dispatch_report` name ops by it."""
    return f"qjax[{path}]"


class _Serve(_PolicyHandler):
    def __init__(self, policy: Policy, backend: str = "auto"):
        super().__init__(policy)
        self.backend = backend

    def acts_on(self, ref: WeightRef) -> bool:
        return super().acts_on(ref) or is_quantized(ref.leaf)  # a stored QArray is served as one

    @_named_materialize_errors
    def materialize(self, ref: WeightRef):
        """A weight read by an op that is not a matmul or conv: the stored weight
        dequantized, or a float weight quantized by its rule and dequantized."""
        return _dequantized_operand(ref, _rule(self.policy, ref.path))

    @_named_errors
    def target(self, eqn, invals, emit):
        found = self.weight(invals)
        if found is None:
            return None
        wi, ref, rule = found
        with jax.named_scope(op_scope(ref.path)):
            out = self._op(eqn, invals, wi, ref, rule)
            if out is not None:
                return out
            # float weight without a rule, a conv reading it as its input, or a layout the
            # scales cannot follow: the float op, inside the scope too, on the dequantized
            # weight (a float leaf with a weight spec quantized first, as quantize_params
            # would have: on-the-fly and pre-quantized params give the same result)
            args = [_dequantized_operand(x, rule) if x is ref else materialize(x) for x in invals]
            return bind_eqn(eqn, args)

    def _op(self, eqn, invals, wi: int, ref: WeightRef, rule: Rule | None) -> list | None:
        if eqn.primitive.name == "conv_general_dilated" and wi != 1:
            return None
        wspec = None if rule is None else rule.weight
        w, perm = _operand_qarray(ref, ref.leaf, wspec, fold_transposes=eqn.primitive.name == "dot_general")
        if w is None:
            return None
        aspec = None if rule is None or rule.act is None else _resolve_act_spec(rule.act, eqn, 1 - wi)
        return [_quantized_op(eqn, materialize(invals[1 - wi]), w, wi, aspec, self.backend, perm)]


def quantized(f: Callable, policy: Policy, *, backend: str = "auto") -> Callable:
    """``f`` with its matmuls/convs executed on quantized weights and activations.

    Weights are read from ``QArray`` leaves (``qjax.quantize_params``), from
    ``TransposedQArray`` leaves (``qjax.store_transposed``: codes stored with the last two
    axes swapped, the swap folded into the matmul) or quantized on the fly from float
    leaves by the rule's ``weight`` spec; no float copy of a quantized weight is made for
    the op. With an ``act`` spec the activation is quantized too
    (statically when the weight carries a calibrated ``act_scale``, else dynamically) and
    the op runs on integers (int8×int8→int32) or fp8; without one it is weight-only
    (W8A16/W4A16). Ops whose weight layout the scales cannot follow fall back to the
    float op on the dequantized weight; a weight spec whose scale varies along an axis the
    op sums over (other than per group) is refused, here and by :func:`fake_quantized`.

    Args:
      f: the function, called as ``f(params, *args, **kwargs)``.
      policy: the rules that say how each params leaf is quantized.
      backend: where matmuls run: ``"auto"`` (a Pallas kernel where the tuning table
        measured one faster, else XLA), ``"xla"``, ``"pallas"`` (the kernel, or a
        ``ValueError`` naming the leaf and why not) or ``"interpret-gpu"`` /
        ``"interpret-tpu"``; see ``quantized_dot_general``. Pointwise (1×1) convs run as
        dots and take it too; other convs have no kernel and run on XLA.

    Returns:
      A function with ``f``'s signature. Each op that reads a params leaf runs inside
      ``jax.named_scope(f"qjax[{path}]")``, so profiles name it by the leaf;
      :func:`qjax.dispatch_report` lists what each one runs.

    Raises:
      ValueError: a rule that does not fit its leaf or op (the message names the leaf
        and the rule), or a forced kernel that cannot run an op.

    Warns:
      UserWarning: a leaf whose rule has an ``act`` spec is read by no matmul/conv as its
        weight (e.g. ``x @ jnp.concatenate([wq, wk, wv], 1)``): its activations stay float.

    Example:
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> y = jax.jit(qjax.quantized(model.apply, policy))(qparams, x)
    """
    check_policy(policy)

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        reject_lsq_params(
            params,
            "quantized",
            "serve qjax.quantize_params(trained, policy), which exports the learned scales",
        )
        return _run(f, lambda: _Serve(policy, backend), params, args, kwargs)[0]

    return g
