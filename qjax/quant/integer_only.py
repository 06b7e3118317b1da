"""Integer-only inference (HAWQ-V3, Yao et al. 2021): every op from the input's
quantization to the output's dequantization runs on integers.

``qjax.quantized`` runs integer matmuls but rescales their int32 results in float. Here
the function is evaluated on *integer values with a static scale*: an int32 array ``q``
standing for ``q · S``, with ``S`` a concrete per-element scale (per output channel after a
matmul). Because ``S`` is known when the program is traced (the params are concrete), every
rescaling becomes an integer multiply and shift by a dyadic number
(:mod:`qjax.quant.dyadic`):

* a matmul / convolution reading a quantized weight (integer codes, one scale per
  output channel or per tensor, zero points allowed) takes its activation as codes of the weight's calibrated
  static activation scale (``QArray.act_scale``: ``quantize_params(..., act_stats=...)``):
  the function's float input is quantized once (the program's only float op on the way
  in), an integer value is *requantized*: ``clip(round(q · b / 2^c))`` with
  ``b / 2^c ≈ S / s_act``; with zero points both operands enter centred (codes minus
  zero point). The product runs int8 × int8 → int32 (int16 operands for
  ``uint8`` activations), and its scale is ``s_act · s_w``;
* a static operand added to an integer value (a bias, a folded batch norm's shift) is
  rounded onto the value's scale as int32 (HAWQ's int32 bias); a static positive factor
  (a batch norm's ``γ / σ``, an average's ``1 / n``) only changes the scale;
* two integer values meet (a residual ``add``, ``max``) at one scale: the larger of
  theirs, or a power-of-two fraction of it where they differ (30-bit dyadic ratios);
* ReLU (``max`` with 0), max / sum pooling, reductions, and layout ops act on the
  integers directly (the scale follows; where it would vary along a reduced or merged
  axis, the value is first rescaled to one scale along it);
* transformers (I-BERT's scope): every value computed element-wise from one integer value
  and scalar constants (a GELU in either form, SiLU, tanh, a softmax's ``exp``, a norm's
  ``rsqrt(var + eps)``) is evaluated at once on integers by fitted fixed-point pieces
  (:mod:`qjax.quant.integer_chains`, :mod:`qjax.quant.integer_functions`); two integer
  values multiply exactly (64-bit product, one shift); a softmax's ``e / sum(e)`` is a
  fixed-point quotient; matmuls of two activations (``QKᵀ``, ``PV``) run int8 × int8 when
  an ``OpRule`` with static scales (``op_stats``) matches them; a mask selects or adds a
  saturated fill;
* the output is dequantized once (``q · S`` in float32).

Static bounds compound through products (a LayerNorm's output is bounded by ``1 / √eps``
times its input's bound): with ``calibration=`` the float program's ranges are measured
and values clipped to them before functions and products (:mod:`qjax.quant.integer_ranges`,
as I-BERT's and TFLite's calibrated activation ranges); without it, a value whose bound
compounds a product's, or a function that would keep too few bits, is refused.

Ops the scheme cannot run on integers (a ``cumsum``, a division by an unrelated value, a
matmul of an unquantized weight, control flow, a log of a value reaching 0) raise, naming
the primitive and the module; ops on the float input before its first quantized matmul
(an embedding lookup, a normalisation) run as written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qjax.graph.interpret import bind_eqn
from qjax.graph.layout import unpacked
from qjax.graph.trace import trace
from qjax.numerics.qarray import QArray
from qjax.numerics.spec import PER_TOKEN
from qjax.numerics.transposed import TransposedQArray
from qjax.quant import integer_chains as chains
from qjax.quant import integer_ranges as ranges_lib
from qjax.quant import op_stats as op_stats_lib
from qjax.quant.dyadic import requantize
from qjax.quant.integer_values import NOOP, SUPPORTED, IntValue, compress, on_integers
from qjax.quant.policy import Policy, check_policy

_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_INLINE |= {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_INLINE |= {"custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}
_WEIGHT_VIEWS = ("transpose", "rev")  # followed on a quantized weight (codes and scale alike)


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A quantized params leaf as an op reads it: ``q`` (stored codes) with ``views``, the
    ``("transpose", perm)`` / ``("rev", dims)`` ops between the leaf and the op."""

    path: str
    q: QArray
    views: tuple = ()


@dataclasses.dataclass(frozen=True)
class _FromWeight:
    """A static value computed from a quantized weight by an op integer-only inference does
    not follow on weights (kept to name it if a matmul reads it)."""

    value: Any
    path: str
    via: str


def _view(x, views, xp):
    for kind, arg in views:
        if kind == "transpose":
            x = xp.transpose(x, arg)
        elif np.shape(x) and any(np.shape(x)[d] > 1 for d in arg):
            x = xp.flip(x, axis=tuple(d for d in arg if np.shape(x)[d] > 1))
    return x


def _static(x):
    if isinstance(x, _Weight):
        return _view(x.q.dequantize(), x.views, jnp)
    return x.value if isinstance(x, _FromWeight) else x


def _is_static(x) -> bool:
    return not isinstance(x, (IntValue, chains.Chain, _Weight, jax.core.Tracer))


def _is_int(x) -> bool:
    return isinstance(x, (IntValue, chains.Chain))


def _sub_jaxprs(eqn) -> bool:
    """Whether ``eqn`` is a higher-order primitive (control flow: its body is a jaxpr)."""
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                return True
    return False


class _Program:
    def __init__(self, policy: Policy, op_stats: dict, ranges: list | None = None, margin: float = 2.0):
        self.policy = policy
        self.op_stats = op_stats_lib.Lookup(op_stats)
        self.ranges, self.margin = ranges, margin
        self._position = 0  # the equation's index in the walk (the key of its calibrated range)
        self._evaluated: dict[int, tuple] = {}  # id(chain) -> (chain, its IntValue)
        self._input_ranges: dict[int, tuple] = {}  # id(input) -> (input, calibrated |range|)
        self._inputs: dict[int, tuple] = {}  # id(input) -> (input, its IntValue)

    def input_value(self, x, where: str) -> IntValue:
        """The float input ``x`` as 16-bit codes over the range calibrated where a matmul
        read it (a residual ``x + attention(x)``): the input's second quantization, finer
        than the matmul's, clipping where the matmul's does."""
        if id(x) in self._inputs:
            return self._inputs[id(x)][1]
        if id(x) not in self._input_ranges:
            raise ValueError(
                f"integer_only: an op at {where} meets the float input before any quantized matmul "
                "reads it, so it has no calibrated range to be quantized with (quantize it by a matmul "
                "first, or pass it through a quantized layer)"
            )
        reach = self._input_ranges[id(x)][1]
        s16 = reach / (2**15 - 1)
        codes = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / np.float32(s16)), -(2**15 - 1), 2**15 - 1)
        value = IntValue(codes.astype(jnp.int32), np.full((1,) * jnp.ndim(x), s16), 2.0**15 - 1)
        self._inputs[id(x)] = (x, value)
        return value

    def value(self, x, where: str):
        """``x`` with an unevaluated chain evaluated (once per chain: a softmax's ``exp``
        is read by its sum and its division, which must see the same codes)."""
        if not isinstance(x, chains.Chain):
            return x
        if id(x) not in self._evaluated:
            what = " → ".join(x.ops)
            root = ranges_lib.clip_to_range(x.root, self.margin, where, what)
            self._evaluated[id(x)] = (
                x,
                chains.evaluate(dataclasses.replace(x, root=root), where, self.margin),
            )
        return self._evaluated[id(x)][1]

    # -- the walk ------------------------------------------------------------------------

    def evaluate(self, jaxpr, consts, args, scope: str = "") -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            where = "/".join(s for s in (scope, str(eqn.source_info.name_stack)) if s) or "top level"
            position = self._position
            self._position += 1
            outs = self._eqn(eqn, invals, where)
            if self.ranges is not None:
                if position >= len(self.ranges):
                    raise ValueError(
                        "integer_only: the calibration batches' program differs from this call's"
                    )
                passed = lambda o, ins=invals: any(o is x for x in ins)  # an input returned as it is
                outs = [
                    dataclasses.replace(o, real_bound=r)
                    if isinstance(o, (IntValue, chains.Chain)) and r >= 0 and not passed(o)
                    else o
                    for o, r in zip(outs, self.ranges[position])
                ]
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, invals, where: str) -> list:
        name = eqn.primitive.name
        if name in _INLINE:
            sub = eqn.params[_INLINE[name]]
            inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
            return self.evaluate(inner, consts, invals, where)
        if _sub_jaxprs(eqn) and any(isinstance(x, (_Weight, _FromWeight)) or _is_int(x) for x in invals):
            raise ValueError(
                f"integer_only: {name!r} at {where} runs a body that reads quantized weights or integer "
                "values: control flow (scan, nn.scan, cond, while, map) is not followed; unroll it"
            )
        if all(_is_static(x) or isinstance(x, _Weight) for x in invals):
            return self._static_eqn(eqn, invals)
        weights = [i for i, x in enumerate(invals[:2]) if isinstance(x, _Weight)]
        if name in ("dot_general", "conv_general_dilated"):
            invals = [self.value(x, where) for x in invals]
            if len(weights) == 1:
                return [self._matmul(eqn, invals, weights[0], where)]
            if name == "dot_general" and not weights and not any(isinstance(x, _FromWeight) for x in invals):
                return [self._activation_matmul(eqn, invals, where)]
            via = [x for x in invals[:2] if isinstance(x, _FromWeight)]
            why = (
                f"reads weight {via[0].path!r} through {via[0].via!r} (only transposes and reversals "
                "of a quantized weight are followed)"
                if via
                else "reads no quantized weight (every matmul needs a QArray weight with a static act "
                "scale: quantize_params with a rule for it and act_stats)"
            )
            raise ValueError(f"integer_only: the {name} at {where} {why}")
        if not any(_is_int(x) for x in invals):  # the float input, before quantization
            return bind_eqn(eqn, [_static(x) for x in invals])
        for i, x in enumerate(invals):  # the float input meeting an integer value (not as a mask)
            if isinstance(x, jax.core.Tracer) and not (name == "select_n" and i == 0):
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise ValueError(
                        f"integer_only: {name!r} at {where} mixes an integer value with an integer input"
                    )
                invals[i] = self.input_value(x, where)
        invals = [x if _is_int(x) or isinstance(x, jax.core.Tracer) else _static(x) for x in invals]
        if chains.wants_chain(eqn, invals):
            chain = chains.extend(eqn, invals)
            if chain is not None:
                return [chain]
        raw = invals
        invals = [self.value(x, where) for x in invals]
        fail = lambda why: ValueError(
            f"integer_only: {name!r} at {where} {why} (integer-only inference covers {SUPPORTED})"
        )
        ints = [x for x in invals if isinstance(x, IntValue)]
        if name == "mul" and len(ints) == 2:  # a product: its operands at their measured ranges
            invals = [ranges_lib.clip_to_range(x, self.margin, where, "a product") for x in invals]
        outs = on_integers(eqn, [_static(x) for x in invals], fail)
        bounded = name == "div" and len(ints) == 2  # a normalisation's quotients are in [0, 1]
        if any(x.loose for x in ints) and not bounded:
            outs = [dataclasses.replace(o, loose=True) if isinstance(o, IntValue) else o for o in outs]
        if name in chains.LINEAR or name in ("mul", "div"):  # eager, and still part of its chain
            chain = chains.extend(eqn, raw)
            fresh = isinstance(outs[0], IntValue) and outs[0] is not raw[0] and outs[0].chain is None
            if chain is not None and fresh:
                outs = [dataclasses.replace(outs[0], chain=(chain.root, chain.fn, chain.ops))]
        return outs

    @staticmethod
    def _static_eqn(eqn, invals) -> list:
        """An op on params and constants: computed now; a transpose / reversal of a quantized
        weight is followed (codes and scale alike), any other op on one dequantizes it."""
        name = eqn.primitive.name
        if len(invals) == 1 and isinstance(invals[0], _Weight):
            w = invals[0]
            if name in NOOP:
                return [w]
            if name in _WEIGHT_VIEWS:
                arg = tuple(eqn.params["permutation" if name == "transpose" else "dimensions"])
                return [dataclasses.replace(w, views=(*w.views, (name, arg)))]
        with jax.ensure_compile_time_eval():
            outs = bind_eqn(eqn, [_static(x) for x in invals])
        sources = [x for x in invals if isinstance(x, (_Weight, _FromWeight))]
        if sources:
            return [_FromWeight(o, sources[0].path, name) for o in outs]
        return outs

    # -- matmuls ---------------------------------------------------------------------------

    def _matmul(self, eqn, invals, wi: int, where: str) -> IntValue:
        w: _Weight = invals[wi]
        aspec = self.policy.act_spec(w.path)
        q = w.q
        fail = lambda why: ValueError(f"integer_only: leaf {w.path!r} (at {where}): {why}")
        if aspec is None or aspec.channel_axes is PER_TOKEN or aspec.format.is_float:
            raise fail("needs a rule with an integer act spec with one static scale (channel_axes=())")
        if q.act_scale is None or np.size(q.act_scale) != 1:
            raise fail(
                "has no static activation scale: quantize_params(params, policy, "
                "act_stats=qjax.calibrate(...))"
            )
        if q.format.is_float or q.group_axis is not None:
            raise fail(
                "needs integer weight codes with one scale per output channel or per tensor (no groups)"
            )
        # zero points: both operands enter centred (codes minus zero point), so padded
        # positions of a conv (0) stand for real 0 and no correction terms are needed
        with jax.ensure_compile_time_eval():  # the params are concrete: so are their codes
            w_codes = np.asarray(
                _view(unpacked(q).values if q.packed_axis is not None else q.values, w.views, jnp), np.int64
            )
        if q.zero_point is not None:
            w_codes = w_codes - _view(np.round(np.asarray(q.zero_point, np.float64)), w.views, np).astype(
                np.int64
            )
        w_scale = _view(np.asarray(q.scale, np.float64), w.views, np)
        contracted = self._contracted(eqn, wi)
        if any(w_scale.shape[d] != 1 for d in contracted):
            raise fail("its scale varies along the contracted axes")
        s_act = float(np.asarray(q.act_scale, np.float64).reshape(()))
        z_act = (
            0
            if q.act_zero_point is None
            else int(np.round(np.asarray(q.act_zero_point, np.float64)).reshape(()))
        )
        lo_a, hi_a = aspec.format.qmin - z_act, aspec.format.qmax - z_act  # centred activation codes
        act = self._activation_codes(invals[1 - wi], s_act, lo_a, hi_a)
        # |acc| <= max|activation code| * max over outputs of the sum of |weight codes| it reads
        a_max = max(-lo_a, hi_a)
        bound = a_max * float(np.abs(w_codes).sum(axis=contracted).max(initial=0))
        if bound > 2.0**31 - 1:
            raise fail(
                f"its int32 accumulator can overflow: activation codes up to {a_max} times weight codes "
                f"summing to {bound / a_max:.0f} over the contraction; use narrower formats (8 bits) or "
                "a shorter contraction"
            )
        lo, hi = min(lo_a, int(w_codes.min(initial=0))), max(hi_a, int(w_codes.max(initial=0)))
        # the narrowest type holding both operands' (centred) codes: int8, int16, else int32
        wide = (
            jnp.int8 if -128 <= lo and hi <= 127 else jnp.int16 if -32768 <= lo and hi <= 32767 else jnp.int32
        )
        operands = [None, None]
        operands[wi], operands[1 - wi] = jnp.asarray(w_codes, wide), act.astype(wide)
        params = {**eqn.params, "preferred_element_type": jnp.dtype(jnp.int32)}
        acc = bind_eqn(eqn.replace(params=params), operands)[0]
        return IntValue(acc, compress(s_act * self._out_scale(eqn, wi, w_scale, acc.ndim)), bound)

    def _activation_matmul(self, eqn, invals, where: str) -> IntValue:
        """A matmul of two activations (attention's ``QKᵀ`` and ``PV``) that an ``OpRule``
        matches: both operands as codes of their calibrated static scales (``op_stats``),
        int8 × int8 → int32, scale ``s_lhs · s_rhs``."""
        m = self.policy.op_match(where)
        if m is None:
            raise ValueError(
                f"integer_only: the dot_general at {where} reads no quantized weight, and no OpRule matches "
                "its name stack (a matmul of two activations needs an OpRule with static integer specs and "
                "op_stats=qjax.calibrate(...))"
            )
        operands, a_max, scale = [], 1.0, 1.0
        for side, spec, x in zip(op_stats_lib.SIDES, (m.value.lhs, m.value.rhs), invals[:2], strict=True):
            fail = lambda why, side=side: ValueError(
                f"integer_only: {side} of the matmul at {where} (op rule {m.index} {m.pattern!r}): {why}"
            )
            if spec is None or spec.format.is_float or not op_stats_lib.is_static(spec):
                raise fail("needs an integer spec with one static scale (channel_axes=())")
            try:
                with jax.ensure_compile_time_eval():  # the stats are concrete: so is the scale
                    found = self.op_stats.scale(where, side, spec)
            except ValueError as e:
                raise fail(str(e)) from None
            if found is None:
                raise fail(
                    f"has no static scale: give integer_only(..., op_stats=qjax.calibrate(...)) (key "
                    f"{op_stats_lib.op_key(where, side)!r})"
                )
            s_op = float(np.asarray(found[0], np.float64).reshape(()))
            z_op = 0 if found[1] is None else int(np.round(np.asarray(found[1], np.float64)).reshape(()))
            lo, hi = spec.format.qmin - z_op, spec.format.qmax - z_op
            operands.append((self._activation_codes(x, s_op, lo, hi), lo, hi))
            a_max *= max(-lo, hi)
            scale *= s_op
        (lc, _), _ = eqn.params["dimension_numbers"]
        bound = a_max * float(
            np.prod(
                [
                    invals[0].data.shape[d] if isinstance(invals[0], IntValue) else np.shape(invals[0])[d]
                    for d in lc
                ]
            )
        )
        if bound > 2.0**31 - 1:
            raise ValueError(f"integer_only: the int32 accumulator of the matmul at {where} can overflow")
        lo = min(o[1] for o in operands)
        hi = max(o[2] for o in operands)
        wide = (
            jnp.int8 if -128 <= lo and hi <= 127 else jnp.int16 if -32768 <= lo and hi <= 32767 else jnp.int32
        )
        params = {**eqn.params, "preferred_element_type": jnp.dtype(jnp.int32)}
        acc = bind_eqn(eqn.replace(params=params), [o[0].astype(wide) for o in operands])[0]
        return IntValue(acc, np.full((1,) * acc.ndim, scale), bound)

    @staticmethod
    def _contracted(eqn, wi: int) -> tuple[int, ...]:
        if eqn.primitive.name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            return tuple(rc if wi == 1 else lc)
        dn = eqn.params["dimension_numbers"]
        return tuple(d for d in dn.rhs_spec if d != dn.rhs_spec[0])  # input features and window

    @staticmethod
    def _out_scale(eqn, wi: int, w_scale: np.ndarray, out_ndim: int) -> np.ndarray:
        """The weight's scale (size 1 on contracted axes) laid out along the output."""
        if eqn.primitive.name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            shape = [1] * out_ndim
            shape[dn.out_spec[1]] = w_scale.shape[dn.rhs_spec[0]]
            return w_scale.reshape(shape)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        mine_c, mine_b = (rc, rb) if wi == 1 else (lc, lb)
        free = [d for d in range(w_scale.ndim) if d not in mine_c and d not in mine_b]
        s = np.transpose(w_scale, (*mine_b, *free, *mine_c)).reshape(
            [w_scale.shape[d] for d in (*mine_b, *free)]
        )
        n_act_free = out_ndim - len(mine_b) - len(free)
        nb = len(mine_b)
        if wi == 1:  # output: batch, lhs (activation) free, rhs (weight) free
            return s.reshape(s.shape[:nb] + (1,) * n_act_free + s.shape[nb:])
        return s.reshape(s.shape + (1,) * n_act_free)

    def _activation_codes(self, x, s_act: float, qmin: int, qmax: int) -> jax.Array:
        if isinstance(x, IntValue):  # (chains are evaluated before a matmul reads them)
            return requantize(x.data, x.scale / s_act, qmin, qmax)
        if isinstance(x, jax.core.Tracer):  # its range, for an op that meets it unquantized
            reach = s_act * max(-qmin, qmax)
            self._input_ranges[id(x)] = (x, max(reach, self._input_ranges.get(id(x), (x, 0.0))[1]))
        x = _static(x)  # the float input's one quantization
        return jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / np.float32(s_act)), qmin, qmax).astype(
            jnp.int32
        )


def _output(x, program: _Program):
    x = program.value(x, "the output")
    if isinstance(x, IntValue):
        return x.data.astype(jnp.float32) * jnp.asarray(x.scale, jnp.float32)
    return _static(x)


def _leaf(path: str, leaf):
    if isinstance(leaf, QArray):
        return _Weight(path, leaf)
    if isinstance(leaf, TransposedQArray):  # stored with its last two axes swapped
        perm = (*range(leaf.ndim - 2), leaf.ndim - 1, leaf.ndim - 2)
        return _Weight(path, leaf.stored, (("transpose", perm),))
    return leaf


def integer_only(
    f: Callable,
    policy: Policy,
    qparams: Any,
    *,
    op_stats: dict | None = None,
    calibration: Iterable | None = None,
    margin: float = 2.0,
    **kwargs,
) -> Callable:
    """``f`` run integer-only on quantized params (HAWQ-V3): int8 × int8 → int32 matmuls,
    int32 biases, dyadic (integer multiply-and-shift) requantization between layers, ReLU
    and pooling on integers; float only to quantize the input and dequantize the output.

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, a plain
        function): matmuls, convolutions, bias adds, batch norms in inference mode
        (folded or not), ReLU, residual adds, max / average pooling, reductions, layout
        ops, element-wise functions (GELU, SiLU, tanh, ...), softmax (also masked),
        LayerNorm / RMSNorm, and attention's activation matmuls.
      policy: the policy ``qparams`` were quantized with; each weight's rule needs an
        integer ``act`` spec with one static scale (``channel_axes=()``; a zero point is
        allowed: TFLite-style ``QuantSpec(qjax.uint8, symmetric=False)``). Matmuls of two
        activations need an ``OpRule`` with integer per-tensor specs.
      qparams: ``qjax.quantize_params(params, policy, act_stats=qjax.calibrate(...))``:
        integer weights with one scale per output channel or per tensor (int4
        packed too), each holding its input's static scale. Concrete arrays (the dyadic
        multipliers are computed from them when the program is traced).
      op_stats: the ``qjax.calibrate`` result whose ``"op:..."`` entries give the
        ``OpRule`` operands their static scales (other entries are ignored).
      calibration: batches of ``f``'s arguments (tuples, as ``qjax.calibrate`` takes):
        the float program is run on them and every intermediate value's range recorded;
        the integer program clips to ``margin`` times those ranges before functions and
        products. Needed where bounds compound (a second LayerNorm after a first, a small
        epsilon); recommended for transformers.
      margin: the headroom over the measured ranges (``≥ 1``).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``g(*args)``, jitted: ``f``'s outputs (integer results dequantized to float32; an
      ``argmax`` stays integer).

    Raises:
      ValueError (when ``g`` is traced): an op with no integer form (named, with its
      module), a matmul without a quantized weight / ``OpRule`` or static scale, grouped
      or float weight formats, an int32 accumulator that could overflow, control flow, a
      function not finite or without enough bits on its input's range, a bound that
      compounds a product's without ``calibration``; (when called) an unused ``op_stats``
      entry, a bad ``margin``, empty ``calibration``.

    Example:
      >>> a8 = qjax.QuantSpec(qjax.int8)  # one static scale per tensor
      >>> policy = qjax.Policy([qjax.Rule(".*kernel", weight=w8, act=a8)])
      >>> stats = qjax.calibrate(model.apply, policy, variables, calib)
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> logits = qjax.integer_only(model.apply, policy, qparams)(x)
      >>> # a transformer: attention's matmuls by OpRule, ranges measured on calib
      >>> policy = qjax.Policy([qjax.Rule(".*kernel", weight=w8, act=a8),
      ...                       qjax.OpRule(".*attn/.*", lhs=a8, rhs=a8)])
      >>> stats = qjax.calibrate(model.apply, policy, variables, calib)
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> hidden = qjax.integer_only(model.apply, policy, qparams, op_stats=stats,
      ...                            calibration=calib)(x)
    """
    check_policy(policy)
    if op_stats is not None and not isinstance(op_stats, dict):
        raise TypeError(f"op_stats must be the dict qjax.calibrate returns, got {type(op_stats).__name__}")
    ops_only = op_stats_lib.split(op_stats)[1]
    op_stats_lib.Lookup(ops_only)  # the entries' types, checked now rather than when traced
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise ValueError(f"integer_only: margin must be a number >= 1, got {margin!r}")
    ranges = (
        None
        if calibration is None
        else ranges_lib.calibrated_ranges(f, qparams, calibration, _INLINE, kwargs)
    )

    def run(*args):
        program = _Program(policy, ops_only, ranges, float(margin))
        traced = trace(f, qparams, *args, **kwargs)
        leaves = [_leaf(path, leaf) for path, leaf in zip(traced.param_paths, traced.param_leaves)]
        closed = traced.jaxpr
        outs = program.evaluate(closed.jaxpr, closed.consts, [*leaves, *jax.tree.leaves(args)])
        outs = [_output(o, program) for o in outs]
        program.op_stats.check_all_used()
        return jax.tree.unflatten(traced.out_tree, outs)

    return jax.jit(run)


__all__ = ["integer_only"]
