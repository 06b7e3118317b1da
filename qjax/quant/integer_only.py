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
* a ``scan`` (an ``nn.scan`` layer stack, ``lax.map``, a ``fori_loop`` with static bounds)
  is unrolled, each iteration on its layer's codes and scales
  (:mod:`qjax.quant.integer_scan`);
* the output is dequantized once (``q · S`` in float32).

Static bounds compound through products (a LayerNorm's output is bounded by ``1 / √eps``
times its input's bound): with ``calibration=`` the float program's ranges are measured
and values clipped to them before functions and products (:mod:`qjax.quant.integer_ranges`,
as I-BERT's and TFLite's calibrated activation ranges); without it, a value whose bound
compounds a product's, or a function that would keep too few bits, is refused.

Ops the scheme cannot run on integers (a ``cumsum``, a division by an unrelated value, a
matmul of an unquantized weight, a ``cond`` or ``while_loop``, a log of a value reaching 0) raise, naming
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
from qjax.graph.trace import trace
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray
from qjax.quant import integer_chains as chains
from qjax.quant import integer_ranges as ranges_lib
from qjax.quant import integer_scan
from qjax.quant import op_stats as op_stats_lib
from qjax.quant.integer_matmuls import FromWeight, IntegerMatmuls, Weight, static_value
from qjax.quant.integer_values import MASK_MAGNITUDE, NOOP, SUPPORTED, IntValue, on_integers
from qjax.quant.policy import Policy, check_policy

_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_INLINE |= {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_INLINE |= {"custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}
_WEIGHT_VIEWS = ("transpose", "rev")  # followed on a quantized weight (codes and scale alike)


def _is_static(x) -> bool:
    return not isinstance(x, (IntValue, chains.Chain, Weight, jax.core.Tracer))


def _is_int(x) -> bool:
    return isinstance(x, (IntValue, chains.Chain))


# ops whose repeats (the same op on the same operands) return the first result: a mask
# broadcast and compared again, a select written twice (softmax(where=) masks x once for
# its max and once for exp), so that both uses see one value
_REPEATABLE = frozenset(
    {"select_n", "broadcast_in_dim", "convert_element_type", "reshape", "squeeze", "expand_dims"}
    | {"transpose", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "stop_gradient"}
)
_SMALL = 4096  # static operands compared by value up to this size (else by identity)


def _repeat_key(eqn, invals):
    """A key equal for the same :data:`_REPEATABLE` op on the same operands (traced and
    integer values by identity, small static arrays by value), else ``None``."""
    if eqn.primitive.name not in _REPEATABLE or not invals:
        return None
    parts = []
    for x in invals:
        if isinstance(x, (Weight, FromWeight)):
            return None
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            return None  # a typed PRNG key: no NumPy value to compare
        if isinstance(x, (IntValue, chains.Chain, jax.core.Tracer)) or np.size(x) > _SMALL:
            parts.append(("id", id(x)))  # kept alive by the memo entry: the id stays its own
        else:
            a = np.asarray(x)
            parts.append(("value", str(a.dtype), a.shape, a.tobytes()))  # dtype.str is "<V1" for fp8
    params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
    return eqn.primitive.name, params, tuple(parts)


def _sub_jaxprs(eqn) -> bool:
    """Whether ``eqn`` is a higher-order primitive (control flow: its body is a jaxpr)."""
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                return True
    return False


class _Program(IntegerMatmuls, integer_scan.ScannedValues):
    def __init__(
        self, policy: Policy, op_stats: dict, ranges: ranges_lib.Ranges | None = None, margin: float = 2.0
    ):
        self.policy = policy
        self.op_stats = op_stats_lib.Lookup(op_stats)
        self.ranges, self.margin = ranges, margin
        self.position = 0  # the equation's index in the walk (the key of its calibrated range)
        self._evaluated: dict[int, tuple] = {}  # id(chain) -> (chain, its IntValue)
        self._input_ranges: dict[int, tuple] = {}  # id(input) -> (input, calibrated |range|)
        self._inputs: dict[int, tuple] = {}  # id(input) -> (input, its IntValue)
        self._measured: dict[int, tuple] = {}  # id(float input value) -> (value, measured |range|)
        self._repeated: dict = {}  # _repeat_key -> (operands, outputs): an op seen before

    def input_value(self, x, where: str) -> IntValue:
        """The float input ``x`` as 16-bit codes over the range calibrated where a matmul
        read it (a residual ``x + attention(x)``; the input's second quantization, finer
        than the matmul's, clipping where the matmul's does), else over ``margin`` times
        its range measured by ``calibration``."""
        if id(x) in self._inputs:
            return self._inputs[id(x)][1]
        if id(x) in self._input_ranges:
            reach = self._input_ranges[id(x)][1]
        elif id(x) in self._measured:
            reach = self._measured[id(x)][1]
            if not np.isfinite(reach) or reach >= MASK_MAGNITUDE:
                raise ValueError(
                    f"integer_only: an op at {where} meets a float input value measured up to {reach:g} "
                    "(a mask or bias of -1e9 / -inf passed as an argument?): 16-bit codes over that range "
                    "would leave the value it meets no precision; pass a boolean mask and write "
                    "jnp.where(mask, x, -jnp.inf), or make the bias a constant"
                )
            reach = self.margin * reach
        else:
            raise ValueError(
                f"integer_only: an op at {where} meets a float input value that no quantized matmul reads "
                "directly and that has no measured nonzero range (a pre-norm block's residual): give "
                "integer_only(..., calibration=...) with batches where it is nonzero"
            )
        s16 = reach / (2**15 - 1)
        codes = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / np.float32(s16)), -(2**15 - 1), 2**15 - 1)
        value = IntValue(codes.astype(jnp.int32), np.full((1,) * jnp.ndim(x), s16), 2.0**15 - 1)
        self._inputs[id(x)] = (x, value)
        return value

    def measure_inputs(self, flat, ranges) -> None:
        """The arguments' measured ranges (``calibration``), for :meth:`input_value`."""
        if len(flat) != len(ranges):
            raise ValueError(
                f"integer_only: the calibration batches hold {len(ranges)} arrays, this call {len(flat)}"
            )
        for x, r in zip(flat, ranges):
            if isinstance(x, jax.core.Tracer) and r > 0:  # 0: never nonzero on the batches
                self._measured[id(x)] = (x, r)

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
            position = self.position
            self.position += 1
            key = _repeat_key(eqn, invals)
            if key is not None and key in self._repeated:  # the same op on the same operands
                outs = self._repeated[key][1]
                if self.ranges is not None:
                    self._check_position(position + 1, eqn, where)
            else:
                outs = self._evaluate_eqn(eqn, invals, where, position)
                if key is not None:  # kept with its operands (their ids stay theirs)
                    self._repeated[key] = (invals, outs)
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _evaluate_eqn(self, eqn, invals, where: str, position: int) -> list:
        """``eqn`` on integers, its outputs given their calibrated ranges (``position``)."""
        outs = self._eqn(eqn, invals, where)
        if self.ranges is not None:
            position += 1  # entry 0: the arguments
            self._check_position(position, eqn, where)
            for o, r in zip(outs, self.ranges.values[position]):
                if isinstance(o, jax.core.Tracer) and r > 0:  # a float op on the input
                    self._measured[id(o)] = (o, r)
            # not an input returned as it is, nor a value measured at an inner position (a
            # jit's result): a copy would not be the object a repeated op returns
            passed = lambda o, ins=invals: any(o is x for x in ins) or o.real_bound is not None
            outs = [
                dataclasses.replace(o, real_bound=r)
                if isinstance(o, (IntValue, chains.Chain)) and r >= 0 and not passed(o)
                else o
                for o, r in zip(outs, self.ranges.values[position])
            ]
        return outs

    def _check_position(self, position: int, eqn, where: str) -> None:
        names = self.ranges.names
        if position >= len(names) or names[position] != eqn.primitive.name:
            raise ValueError(
                f"integer_only: the calibration batches' program differs from this call's at {where} "
                "(other argument dtypes, weak types or structure?)"
            )

    def _eqn(self, eqn, invals, where: str) -> list:
        name = eqn.primitive.name
        if name in _INLINE:
            sub = eqn.params[_INLINE[name]]
            inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
            return self.evaluate(inner, consts, invals, where)
        if name == "scan":  # unrolled: each iteration's values have their own static scales
            length = eqn.params["length"]
            return integer_scan.unrolled(
                eqn,
                invals,
                lambda body, consts, args: self.evaluate(body, consts, args, where),
                lambda x, i: self._iteration_slice(x, i, length, where),
                lambda values: self._stacked(values, where),
                lambda aval: np.zeros(aval.shape, aval.dtype),
            )
        if _sub_jaxprs(eqn) and any(isinstance(x, (Weight, FromWeight)) or _is_int(x) for x in invals):
            raise ValueError(
                f"integer_only: {name!r} at {where} runs a body that reads quantized weights or integer "
                "values: cond and while_loop are not followed (a scan, nn.scan, lax.map or a fori_loop "
                "with static bounds is unrolled); write it as one of those, or unroll it"
            )
        if all(_is_static(x) or isinstance(x, Weight) for x in invals):
            return self._static_eqn(eqn, invals)
        weights = [i for i, x in enumerate(invals[:2]) if isinstance(x, Weight)]
        if name in ("dot_general", "conv_general_dilated"):
            invals = [self.value(x, where) for x in invals]
            if len(weights) == 1:
                return [self._matmul(eqn, invals, weights[0], where)]
            if name == "dot_general" and not weights and not any(isinstance(x, FromWeight) for x in invals):
                return [self._activation_matmul(eqn, invals, where)]
            via = [x for x in invals[:2] if isinstance(x, FromWeight)]
            why = (
                f"reads weight {via[0].path!r} through {via[0].via!r} (only transposes and reversals "
                "of a quantized weight are followed)"
                if via
                else "reads no quantized weight (every matmul needs a QArray weight with a static act "
                "scale: quantize_params with a rule for it and act_stats)"
            )
            raise ValueError(f"integer_only: the {name} at {where} {why}")
        if not any(_is_int(x) for x in invals):  # the float input, before quantization
            return bind_eqn(eqn, [static_value(x) for x in invals])
        for i, x in enumerate(invals):  # the float input meeting an integer value (not as a mask)
            if isinstance(x, jax.core.Tracer) and not (name == "select_n" and i == 0):
                if not jnp.issubdtype(x.dtype, jnp.floating):
                    raise ValueError(
                        f"integer_only: {name!r} at {where} mixes an integer value with an integer input"
                    )
                invals[i] = self.input_value(x, where)
        invals = [x if _is_int(x) or isinstance(x, jax.core.Tracer) else static_value(x) for x in invals]
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
        outs = on_integers(eqn, [static_value(x) for x in invals], fail)
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
        layer = integer_scan.one_layer(eqn, invals)
        if layer is not None:
            return [layer]
        if len(invals) == 1 and isinstance(invals[0], Weight):
            w = invals[0]
            if name in NOOP:
                return [w]
            if name in _WEIGHT_VIEWS:
                arg = tuple(eqn.params["permutation" if name == "transpose" else "dimensions"])
                return [dataclasses.replace(w, views=(*w.views, (name, arg)))]
        with jax.ensure_compile_time_eval():
            outs = bind_eqn(eqn, [static_value(x) for x in invals])
        sources = [x for x in invals if isinstance(x, (Weight, FromWeight))]
        if sources:
            return [FromWeight(o, sources[0].path, name) for o in outs]
        return outs


def _output(x, program: _Program):
    x = program.value(x, "the output")
    if isinstance(x, IntValue):
        return x.data.astype(jnp.float32) * jnp.asarray(x.scale, jnp.float32)
    return static_value(x)


def _leaf(path: str, leaf):
    if isinstance(leaf, QArray):
        return Weight(path, leaf)
    if isinstance(leaf, TransposedQArray):  # stored with its last two axes swapped
        perm = (*range(leaf.ndim - 2), leaf.ndim - 1, leaf.ndim - 2)
        return Weight(path, leaf.stored, (("transpose", perm),))
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
        ops, element-wise functions (GELU, SiLU, tanh, ...), softmax (also masked, and
        ``jax.nn.softmax(where=)``), LayerNorm / RMSNorm, attention's activation matmuls,
        and scans (``nn.scan`` layer stacks, ``lax.map``, ``fori_loop`` with static
        bounds), unrolled.
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
      or float weight formats, an int32 accumulator that could overflow, a ``cond`` or
      ``while_loop`` on integer values, a function not finite or without enough bits on
      its input's range, a bound that compounds a product's without ``calibration``;
      (when called) an unused ``op_stats`` entry, a bad ``margin``, empty ``calibration``.

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
        flat = jax.tree.leaves(args)
        if ranges is not None:
            program.measure_inputs(flat, ranges.values[0])
        outs = program.evaluate(closed.jaxpr, closed.consts, [*leaves, *flat])
        if ranges is not None and program.position + 1 != len(ranges.names):
            raise ValueError(
                "integer_only: the calibration batches' program differs from this call's (it has "
                f"{len(ranges.names) - 1} equations, this call {program.position})"
            )
        outs = [_output(o, program) for o in outs]
        program.op_stats.check_all_used()
        return jax.tree.unflatten(traced.out_tree, outs)

    return jax.jit(run)


__all__ = ["integer_only"]
