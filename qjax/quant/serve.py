"""Function transform ``quantized``: integer execution of a function's matmuls and convolutions
(``fake_quantized``: :mod:`qjax.quant.qat`; ``calibrate``: :mod:`qjax.quant.calibrate`).

It takes any ``f(params, *args, **kwargs)`` (a Linen ``apply``, an NNX model split into
graphdef/state, a plain function) and re-evaluates its jaxpr with the matmuls and
convolutions that read a params leaf replaced (see :mod:`qjax.graph`). The policy rule
matched by that leaf's path gives the weight spec and the activation spec of the op.
Positional arguments after ``params`` are traced; keyword arguments are static.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax import lax

from qjax.graph.interpret import LayoutOp, WeightRef, bind_eqn, materialize, spec_for_slice
from qjax.graph.layout import apply_layout
from qjax.graph.sharding import like_output
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec
from qjax.numerics.transposed import TransposedQArray, is_quantized
from qjax.quant import op_stats as op_stats_lib
from qjax.quant import ops_ragged
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
    ragged_weight,
)
from qjax.quant.shard_scales import fake_quant_shard, quantize_shard

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
        w = _quantized_leaf(ref, leaf, spec_for_slice(spec, ref.depth))
        if w is None:
            return None, None  # a shard whose scale groups straddle shards: the float op
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
    takes ``w`` to the operand, folded into a ``dot_general``'s dimension numbers. On an
    Explicit-axes mesh the op runs with the axes Auto and its result takes the equation's
    output sharding (:func:`qjax.graph.sharding.like_output`)."""
    run = lambda act, w: _op_on_codes(eqn, act, w, wi, aspec, backend, perm)
    return like_output(eqn.outvars[0].aval, run)(act, w)


def _op_on_codes(eqn, act, w: QArray, wi: int, aspec: QuantSpec | None, backend: str, perm):
    from qjax.quant import ops  # the op library sits beside this module

    if perm is not None:
        ndims = [v.aval.ndim for v in eqn.invars]
        dn, out_perm = _unfold_transpose(eqn.params["dimension_numbers"], wi, perm, tuple(ndims))
        eqn = eqn.replace(params={**eqn.params, "dimension_numbers": dn})
        out = _op_on_codes(eqn, act, w, wi, aspec, backend, None)
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


def _quantized_leaf(ref: WeightRef, leaf, spec: QuantSpec) -> QArray | None:
    """A float leaf quantized by ``spec``; a shard inside a ``shard_map`` body with the
    whole weight's scales (``None`` when its scale groups straddle the shards)."""
    if any(ref.shard_axes) and spec.rounding == "nearest":
        return quantize_shard(leaf, spec, ref.shard_axes)
    return quantize(leaf, spec)


def _dequantized_operand(ref: WeightRef, rule: Rule | None):
    """The float value an op reads from ``ref``: the stored weight dequantized, or a float
    leaf quantized by the rule's weight spec and dequantized, then the ref's layout ops."""
    leaf = ref.leaf
    if rule is None or rule.weight is None or isinstance(leaf, (QArray, TransposedQArray)):
        return materialize(ref)
    spec = spec_for_slice(rule.weight, ref.depth)
    q = _quantized_leaf(ref, leaf, spec)
    if q is None:  # a shard of a weight whose scale groups straddle the shards
        return materialize(dataclasses.replace(ref, leaf=fake_quant_shard(leaf, spec, None, ref.shard_axes)))
    return materialize(dataclasses.replace(ref, leaf=q))


def op_scope(path: str) -> str:
    """The ``jax.named_scope`` that ``quantized`` puts around the op reading leaf ``path``:
    profiles (HLO ``op_name`` metadata) and :func:`qjax.dispatch_report` name ops by it."""
    return f"qjax[{path}]"


class _Serve(_PolicyHandler):
    def __init__(self, policy: Policy, backend: str = "auto", op_stats: dict | None = None):
        super().__init__(policy)
        self.backend = backend
        self.op_stats = op_stats_lib.Lookup(op_stats or {})

    def finish(self) -> None:
        super().finish()
        self.op_stats.check_all_used()

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

    @_named_errors
    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot`` (mixture-of-experts) reading an expert weight ``(G, K, N)``:
        the codes in the ragged dot, the activation quantized by the rule's ``act`` spec
        (:func:`qjax.quant.ops_ragged.quantized_ragged_dot`); a weight whose scales vary
        along K runs dequantized, as other ops do."""
        ref = ragged_weight(eqn, invals)
        if ref is None:
            return None
        rule = _rule(self.policy, ref.path)
        w, _ = _operand_qarray(ref, ref.leaf, None if rule is None else rule.weight)
        if w is None or ops_ragged.check_weight(w) is not None:
            return None
        self._targeted.add(ref.path)
        aspec = None if rule is None else rule.act
        static = {}
        if aspec is not None and w.act_scale is not None:
            static = {"lhs_scale": w.act_scale, "lhs_zero_point": w.act_zero_point}
        out_aval = eqn.outvars[0].aval
        run = lambda x, w, sizes, static: ops_ragged.quantized_ragged_dot(
            x, w, sizes, lhs_spec=aspec, out_dtype=out_aval.dtype, **static
        )
        with jax.named_scope(op_scope(ref.path)):
            y = like_output(out_aval, run)(invals[0], w, invals[2], static)
        return [y]

    def quantize_activation_op(self, eqn, invals, lhs_spec, rhs_spec, scope: str, emit):
        """A matmul between two activations matched by an ``OpRule``: both operands
        quantized, with their calibrated scales where ``op_stats`` has them (else
        dynamically), on XLA (int8 x int8 -> int32 for integer formats)."""
        from qjax.quant import ops  # the op library sits beside this module

        (ls, lz), (rs, rz) = (
            self.op_stats.scale(scope, side, spec) or (None, None)
            for side, spec in zip(op_stats_lib.SIDES, (lhs_spec, rhs_spec), strict=True)
        )
        out_aval = eqn.outvars[0].aval
        run = lambda lhs, rhs, ls, lz, rs, rz: ops.quantized_dot_general(
            lhs,
            rhs,
            eqn.params["dimension_numbers"],
            lhs_spec=lhs_spec,
            rhs_spec=rhs_spec,
            lhs_scale=ls,
            lhs_zero_point=lz,
            rhs_scale=rs,
            rhs_zero_point=rz,
            out_dtype=out_aval.dtype,
            backend="xla",
        )
        with jax.named_scope(op_scope(scope)):
            y = like_output(out_aval, run)(*invals, ls, lz, rs, rz)
        return [y]

    def _op(self, eqn, invals, wi: int, ref: WeightRef, rule: Rule | None) -> list | None:
        if eqn.primitive.name == "conv_general_dilated" and wi != 1:
            return None
        wspec = None if rule is None else rule.weight
        w, perm = _operand_qarray(ref, ref.leaf, wspec, fold_transposes=eqn.primitive.name == "dot_general")
        if w is None:
            straddles = wspec is not None and not is_quantized(ref.leaf) and any(ref.shard_axes)
            if straddles and rule.act is not None and _quantized_leaf(ref, ref.leaf, wspec) is None:
                raise ValueError(
                    "inside this shard_map the weight's scale groups straddle the shards, so no integer op "
                    "of a shard holds the whole weight's scales and its act spec cannot be served: use "
                    "groups the shards hold whole (a group size dividing the shard)"
                )
            return None
        aspec = None if rule is None or rule.act is None else _resolve_act_spec(rule.act, eqn, 1 - wi)
        return [_quantized_op(eqn, materialize(invals[1 - wi]), w, wi, aspec, self.backend, perm)]


def quantized(
    f: Callable, policy: Policy, *, backend: str = "auto", op_stats: dict | None = None
) -> Callable:
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
    op sums over is refused, here and by :func:`fake_quantized`, except per group along the
    contracted axis of a matmul or of a pointwise (1×1, unpadded, ungrouped) convolution,
    which runs as a matmul: int4 grouped along the input channels of a 3×3 conv is refused.
    A ``lax.ragged_dot`` (mixture of experts) reading an expert weight ``(G, K, N)`` whose
    scales are constant along K runs as :func:`qjax.quant.quantized_ragged_dot` (int8 x
    int8 -> int32 with an ``act`` spec), on XLA. A matmul between two activations
    (attention, a KV cache) that one of the policy's :class:`qjax.OpRule` matches by name
    scope runs with its operands quantized dynamically (int8 x int8 -> int32 for integer
    formats), on XLA.

    Args:
      f: the function, called as ``f(params, *args, **kwargs)``.
      policy: the rules that say how each params leaf (and matmul between activations) is
        quantized.
      backend: where matmuls run: ``"auto"`` (a Pallas kernel where the tuning table
        measured one faster, else XLA), ``"xla"``, ``"pallas"`` (the kernel, or a
        ``ValueError`` naming the leaf and why not) or ``"interpret-gpu"`` /
        ``"interpret-tpu"``; see ``quantized_dot_general``. Pointwise (1×1) convs run as
        dots and take it too; other convs have no kernel and run on XLA.
      op_stats: a :func:`qjax.calibrate` result: its ``"op:..."`` entries give the operands
        of ``OpRule`` matmuls with per-tensor specs static scales (:mod:`qjax.quant.op_stats`);
        its leaf entries are ignored (they are stored with the weights by
        ``quantize_params(..., act_stats=...)``).

    Returns:
      A function with ``f``'s signature. Each op that reads a params leaf runs inside
      ``jax.named_scope(f"qjax[{path}]")``, so profiles name it by the leaf;
      :func:`qjax.dispatch_report` lists what each one runs.

    Raises:
      ValueError: a rule that does not fit its leaf or op (the message names the leaf
        and the rule), a forced kernel that cannot run an op, or an ``OpRule`` that
        matches no matmul between two activations (the message lists their name stacks),
        or an ``op_stats`` entry that no such op uses or whose spec is not per tensor.

    Warns:
      UserWarning: a leaf whose rule has an ``act`` spec is read by no matmul/conv as its
        weight (e.g. ``x @ jnp.concatenate([wq, wk, wv], 1)``): its activations stay float.

    Example:
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> y = jax.jit(qjax.quantized(model.apply, policy))(qparams, x)
    """
    check_policy(policy)
    if op_stats is not None and not isinstance(op_stats, dict):
        raise TypeError(f"op_stats must be the dict qjax.calibrate returns, got {type(op_stats).__name__}")
    ops_only = op_stats_lib.split(op_stats)[1]
    op_stats_lib.Lookup(ops_only)  # its entries' types, checked here rather than at the first call

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        reject_lsq_params(
            params,
            "quantized",
            "serve qjax.quantize_params(trained, policy), which exports the learned scales",
        )
        return _run(f, lambda: _Serve(policy, backend, ops_only), params, args, kwargs)[0]

    return g
