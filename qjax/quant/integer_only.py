"""Integer-only inference (HAWQ-V3, Yao et al. 2021): every op from the input's
quantization to the output's dequantization runs on integers.

``qjax.quantized`` runs integer matmuls but rescales their int32 results in float. Here
the function is evaluated on *integer values with a static scale*: an int32 array ``q``
standing for ``q · S``, with ``S`` a concrete per-element scale (per output channel after a
matmul). Because ``S`` is known when the program is traced (the params are concrete), every
rescaling becomes an integer multiply and shift by a dyadic number
(:mod:`qjax.quant.dyadic`):

* a matmul / convolution reading a quantized weight (symmetric codes, one scale per
  output channel or per tensor) takes its activation as codes of the weight's calibrated
  static activation scale (``QArray.act_scale``: ``quantize_params(..., act_stats=...)``):
  the function's float input is quantized once (the program's only float op on the way
  in), an integer value is *requantized*: ``clip(round(q · b / 2^c))`` with
  ``b / 2^c ≈ S / s_act``. The product runs int8 × int8 → int32 (int16 operands for
  ``uint8`` activations), and its scale is ``s_act · s_w``;
* a static operand added to an integer value (a bias, a folded batch norm's shift) is
  rounded onto the value's scale as int32 (HAWQ's int32 bias); a static positive factor
  (a batch norm's ``γ / σ``, an average's ``1 / n``) only changes the scale;
* two integer values meet (a residual ``add``, ``max``) at the larger of their scales,
  each rescaled by its dyadic ratio ``≤ 1``;
* ReLU (``max`` with 0), max / sum pooling, reductions, and layout ops act on the
  integers directly (the scale follows; where it would vary along a reduced or merged
  axis, the value is first rescaled to one scale along it);
* the output is dequantized once (``q · S`` in float32).

Ops the scheme cannot run on integers (GELU, softmax, a division by an activation, a
matmul of an unquantized weight, control flow) raise, naming the primitive and the
module; ops on the float input before its first quantized matmul (a reshape, a
normalisation) run as written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
from qjax.quant.dyadic import dyadic, dyadic_mul, requantize
from qjax.quant.policy import Policy, check_policy

_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_INLINE |= {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_INLINE |= {"custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}
_NOOP = ("convert_element_type", "copy", "copy_p", "optimization_barrier", "reduce_precision")
_REDUCE = ("reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin")
_WINDOW = ("reduce_window_sum", "reduce_window_max", "reduce_window_min")
_SUPPORTED = (
    "dot_general, conv_general_dilated (quantized weights), add, sub, mul / div by a static "
    "factor, neg, max / min (ReLU), reshape, transpose, broadcast_in_dim, squeeze, slice, rev, "
    "pad, concatenate, reduce_sum / max / min, argmax / argmin, reduce_window_sum / max / min"
)


@dataclasses.dataclass(frozen=True)
class _Int:
    """An integer value: ``data`` (int32) stands for ``data · scale``; ``scale`` is a
    concrete float64 array of the same rank, of size 1 along the axes it is constant on."""

    data: jax.Array
    scale: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Weight:
    """A quantized params leaf as an op reads it: ``perm`` the transpose of its axes (or
    ``None``)."""

    path: str
    q: QArray
    perm: tuple[int, ...] | None = None


def _is_static(x) -> bool:
    return not isinstance(x, (_Int, _Weight, jax.core.Tracer))


def _compress(scale: np.ndarray) -> np.ndarray:
    """``scale`` with every axis it is constant along reduced to size 1."""
    for ax in range(scale.ndim):
        if scale.shape[ax] > 1:
            first = np.take(scale, [0], axis=ax)
            if np.all(scale == first):
                scale = first
    return scale


def _dequantized(w: _Weight) -> jax.Array:
    x = w.q.dequantize()
    return x if w.perm is None else jnp.transpose(x, w.perm)


def _static(x):
    return _dequantized(x) if isinstance(x, _Weight) else x


class _Program:
    def __init__(self, policy: Policy):
        self.policy = policy

    # -- the walk ------------------------------------------------------------------------

    def evaluate(self, jaxpr, consts, args, scope: str = "") -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            where = "/".join(s for s in (scope, str(eqn.source_info.name_stack)) if s)
            outs = self._eqn(eqn, invals, where)
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
        if all(_is_static(x) or isinstance(x, _Weight) for x in invals):
            if name in ("transpose", *_NOOP) and isinstance(invals[0], _Weight) and len(invals) == 1:
                w = invals[0]
                if name == "transpose":
                    perm = tuple(eqn.params["permutation"])
                    base = w.perm or tuple(range(len(perm)))
                    return [dataclasses.replace(w, perm=tuple(base[p] for p in perm))]
                return [w]
            with jax.ensure_compile_time_eval():  # params and constants: computed now
                return bind_eqn(eqn, [_static(x) for x in invals])
        weights = [i for i, x in enumerate(invals[:2]) if isinstance(x, _Weight)]
        if name in ("dot_general", "conv_general_dilated"):
            if len(weights) != 1:
                raise ValueError(
                    f"integer_only: the {name} at {where or 'top level'} reads no quantized weight "
                    "(every matmul needs a QArray weight with a static act scale: quantize_params with "
                    "a rule for it and act_stats)"
                )
            return [self._matmul(eqn, invals, weights[0], where)]
        if not any(isinstance(x, _Int) for x in invals):  # the float input, before quantization
            return bind_eqn(eqn, [_static(x) for x in invals])
        return self._on_integers(eqn, invals, where)

    # -- matmuls ---------------------------------------------------------------------------

    def _matmul(self, eqn, invals, wi: int, where: str) -> _Int:
        w: _Weight = invals[wi]
        aspec = self.policy.act_spec(w.path)
        q = w.q
        fail = lambda why: ValueError(f"integer_only: leaf {w.path!r} (at {where or 'top level'}): {why}")
        if aspec is None or aspec.channel_axes is PER_TOKEN or aspec.format.is_float:
            raise fail("needs a rule with an integer act spec with one static scale (channel_axes=())")
        if q.act_scale is None or np.size(q.act_scale) != 1:
            raise fail(
                "has no static activation scale: quantize_params(params, policy, "
                "act_stats=qjax.calibrate(...))"
            )
        if q.act_zero_point is not None or q.zero_point is not None:
            raise fail("integer-only inference takes symmetric weights and activations (no zero points)")
        if q.format.is_float or q.group_axis is not None:
            raise fail(
                "needs integer weight codes with one scale per output channel or per tensor (no groups)"
            )
        codes = unpacked(q).values.astype(jnp.int32) if q.packed_axis is not None else q.values
        w_scale = np.asarray(q.scale, np.float64)
        if w.perm is not None:
            codes, w_scale = jnp.transpose(codes, w.perm), np.transpose(w_scale, w.perm)
        contracted = self._contracted(eqn, wi)
        if any(w_scale.shape[d] != 1 for d in contracted):
            raise fail("its scale varies along the contracted axes")
        s_act = float(np.asarray(q.act_scale, np.float64).reshape(()))
        fmt = aspec.format
        act = self._activation_codes(invals[1 - wi], s_act, fmt.qmin, fmt.qmax)
        fits8 = fmt.qmin >= -128 and fmt.qmax <= 127 and q.format.bits <= 8
        wide = jnp.int8 if fits8 else jnp.int16  # uint8 codes: int16 x int16 -> int32
        operands = [None, None]
        operands[wi], operands[1 - wi] = codes.astype(wide), act.astype(wide)
        params = {**eqn.params, "preferred_element_type": jnp.dtype(jnp.int32)}
        acc = bind_eqn(eqn.replace(params=params), operands)[0]
        return _Int(acc, _compress(s_act * self._out_scale(eqn, wi, w_scale, acc.ndim)))

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

    @staticmethod
    def _activation_codes(x, s_act: float, qmin: int, qmax: int) -> jax.Array:
        if isinstance(x, _Int):
            return requantize(x.data, x.scale / s_act, qmin, qmax)
        if _is_static(x) or isinstance(x, _Weight):
            x = _static(x)
        # the float input's one quantization
        return jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / np.float32(s_act)), qmin, qmax).astype(
            jnp.int32
        )

    # -- ops on integer values -----------------------------------------------------------

    def _on_integers(self, eqn, invals, where: str) -> list:
        name = eqn.primitive.name
        fail = lambda why: ValueError(
            f"integer_only: {name!r} at {where or 'top level'} {why} (integer-only inference covers "
            f"{_SUPPORTED})"
        )
        if any(isinstance(x, jax.core.Tracer) for x in invals):
            raise fail("mixes an integer value with the float input")
        ints = [x for x in invals if isinstance(x, _Int)]
        if name in _NOOP:
            if jnp.issubdtype(eqn.params.get("new_dtype", jnp.float32), jnp.integer):
                raise fail("casts an integer value's real number to an integer type")
            return list(invals) if name == "optimization_barrier" else [invals[0]]
        if name == "neg":
            return [_Int(-invals[0].data, invals[0].scale)]
        if name in ("add", "sub", "max", "min"):
            return [self._binary(eqn, invals, fail)]
        if name in ("mul", "div"):
            return [self._scaled(eqn, invals, fail)]
        if name in _REDUCE or name in _WINDOW:
            return [self._reduce(eqn, invals[0], fail)]
        if name == "concatenate":
            return [self._concatenate(eqn, invals)]
        if name == "pad":
            return [self._pad(eqn, invals, fail)]
        if name in ("reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "rev"):
            if len(ints) != 1 or any(not _is_static(x) for x in invals[1:]):
                raise fail("has dynamic shape operands")
            return [self._layout(eqn, invals)]
        raise fail("has no integer form")

    @staticmethod
    def _align(a: _Int, scale: np.ndarray) -> jax.Array:
        """``a``'s integers at the (coarser or equal) ``scale``: ``round(q · S_a / scale)``."""
        ratio = np.broadcast_to(a.scale, np.broadcast_shapes(a.scale.shape, scale.shape)) / scale
        if np.all(ratio == 1):
            return a.data
        b, c = dyadic(_compress(ratio))
        return dyadic_mul(a.data, b, c)

    def _binary(self, eqn, invals, fail) -> _Int:
        x, y = invals
        if isinstance(x, _Int) and isinstance(y, _Int):
            scale = _compress(np.maximum(x.scale, y.scale))
            return _Int(bind_eqn(eqn, [self._align(x, scale), self._align(y, scale)])[0], scale)
        a, other = (x, y) if isinstance(x, _Int) else (y, x)
        v = np.asarray(other, np.float64)
        scale = a.scale.reshape((1,) * (v.ndim - a.scale.ndim) + a.scale.shape)  # v of higher rank
        q = np.round(v / scale)  # the constant on the value's integer grid (exact for 0)
        if not np.all(np.abs(q) < 2**31 - 1):
            raise fail("adds a constant that does not fit int32 at the value's scale")
        const = jnp.asarray(_compress(q).astype(np.int32))
        args = [a.data, const] if a is x else [const, a.data]
        return _Int(bind_eqn(eqn, args)[0], scale)

    def _scaled(self, eqn, invals, fail) -> _Int:
        name = eqn.primitive.name
        x, y = invals
        if not isinstance(x, _Int) or isinstance(y, _Int):
            raise fail("multiplies two integer values or divides by one")
        c = np.asarray(y, np.float64)
        if name == "div":
            if np.any(c == 0):
                raise fail("divides by zero")
            c = 1.0 / c
        sign = np.sign(c).astype(np.int32)
        mag = np.where(c == 0, 1.0, np.abs(c))
        scale = _compress(
            np.broadcast_to(x.scale * mag, np.broadcast_shapes(x.scale.shape, mag.shape)).copy()
        )
        data = x.data if np.all(sign == 1) else x.data * jnp.asarray(_compress(sign))
        return _Int(data, scale.reshape((1,) * (data.ndim - scale.ndim) + scale.shape))

    def _uniform(self, a: _Int, axes) -> _Int:
        """``a`` rescaled so its scale is constant along ``axes`` (their maximum)."""
        axes = tuple(d for d in axes if a.scale.shape[d] > 1)
        if not axes:
            return a
        scale = np.max(a.scale, axis=axes, keepdims=True)
        return _Int(self._align(a, scale), scale)

    def _reduce(self, eqn, a: _Int, fail) -> _Int:
        name = eqn.primitive.name
        p = eqn.params
        if name in _WINDOW:
            axes = [d for d, k in enumerate(p["window_dimensions"]) if k > 1]
            a = self._uniform(a, axes)
            return _Int(bind_eqn(eqn, [a.data])[0], a.scale)
        axes = tuple(p["axes"])
        a = self._uniform(a, axes)
        out = bind_eqn(eqn, [a.data])[0]
        if name in ("argmax", "argmin"):
            return out  # indices: plain integers, no scale
        return _Int(out, np.squeeze(a.scale, axis=axes))

    def _layout(self, eqn, invals) -> _Int:
        a: _Int = invals[0]
        name, p = eqn.primitive.name, eqn.params
        data = bind_eqn(eqn, [a.data, *invals[1:]])[0]
        s = a.scale
        if name == "transpose":
            scale = np.transpose(s, p["permutation"])
        elif name == "squeeze":
            scale = np.squeeze(s, axis=tuple(p["dimensions"]))
        elif name == "expand_dims":
            scale = np.expand_dims(s, tuple(p["dimensions"]))
        elif name == "broadcast_in_dim":
            shape = [1] * len(p["shape"])
            for i, d in enumerate(p["broadcast_dimensions"]):
                shape[d] = s.shape[i]
            scale = s.reshape(shape)
        elif name == "rev":
            scale = np.flip(s, axis=tuple(d for d in p["dimensions"] if s.shape[d] > 1))
        elif name == "slice":
            idx = tuple(
                slice(None) if s.shape[d] == 1 else slice(lo, hi, st)
                for d, (lo, hi, st) in enumerate(
                    zip(p["start_indices"], p["limit_indices"], p["strides"] or (1,) * s.ndim)
                )
            )
            scale = s[idx]
        else:  # reshape: the scale at the full shape along the axes the reshape moves
            keep = 0  # leading axes the reshape leaves alone (the batch)
            while keep < min(s.ndim, data.ndim) and a.data.shape[keep] == data.shape[keep]:
                keep += 1
            if np.all(s == s.flat[0]):
                scale = np.full((1,) * data.ndim, s.flat[0])
            else:
                if any(s.shape[d] > 1 for d in range(keep)):
                    keep = 0
                moved = np.broadcast_to(s, s.shape[:keep] + a.data.shape[keep:])
                scale = _compress(moved.reshape(s.shape[:keep] + data.shape[keep:]))
        return _Int(data, scale)

    def _concatenate(self, eqn, invals) -> _Int:
        dim = eqn.params["dimension"]
        parts = [x if isinstance(x, _Int) else _Int(*self._constant(x)) for x in invals]
        ndim = parts[0].data.ndim
        size = [max(x.scale.shape[d] for x in parts) for d in range(ndim)]
        scales = [
            np.broadcast_to(x.scale, [x.data.shape[d] if d == dim else size[d] for d in range(ndim)])
            for x in parts
        ]
        data = bind_eqn(eqn, [x.data for x in parts])[0]
        return _Int(data, _compress(np.concatenate(scales, axis=dim)))

    @staticmethod
    def _constant(x):
        """A static array joined to integer values (a concatenated zero block): exact zeros
        only, as zeros of any scale."""
        v = np.asarray(x)
        if np.any(v != 0):
            raise ValueError("integer_only: a nonzero constant concatenated to an integer value")
        return jnp.zeros(v.shape, jnp.int32), np.ones((1,) * v.ndim)

    def _pad(self, eqn, invals, fail) -> _Int:
        a, value = invals
        if not _is_static(value) or np.asarray(value) != 0:
            raise fail("pads with a value other than 0")
        config = eqn.params["padding_config"]
        for d, (_, _, interior) in enumerate(config):
            if interior and a.scale.shape[d] > 1:
                raise fail("pads inside an axis its scale varies along")
        widths = [(0, 0) if a.scale.shape[d] == 1 else (lo, hi) for d, (lo, hi, _) in enumerate(config)]
        if any(lo < 0 or hi < 0 for lo, hi in widths):
            raise fail("crops an axis its scale varies along")
        data = bind_eqn(eqn, [a.data, jnp.zeros((), jnp.int32)])[0]
        return _Int(data, np.pad(a.scale, widths, mode="edge"))


def _output(x):
    if isinstance(x, _Int):
        return x.data.astype(jnp.float32) * jnp.asarray(x.scale, jnp.float32)
    return _static(x)


def integer_only(f: Callable, policy: Policy, qparams: Any, **kwargs) -> Callable:
    """``f`` run integer-only on quantized params (HAWQ-V3): int8 × int8 → int32 matmuls,
    int32 biases, dyadic (integer multiply-and-shift) requantization between layers, ReLU
    and pooling on integers; float only to quantize the input and dequantize the output.

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, a plain
        function): matmuls, convolutions, bias adds, batch norms in inference mode
        (folded or not: a per-channel positive factor and shift), ReLU, residual adds,
        max / average pooling, reductions and layout ops.
      policy: the policy ``qparams`` were quantized with; each weight's rule needs an
        integer ``act`` spec with one static scale (``channel_axes=()``, symmetric).
      qparams: ``qjax.quantize_params(params, policy, act_stats=qjax.calibrate(...))``:
        symmetric integer weights with one scale per output channel or per tensor (int4
        packed too), each holding its input's static scale. Concrete arrays (the dyadic
        multipliers are computed from them when the program is traced).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``g(*args)``, jitted: ``f``'s outputs (integer results dequantized to float32; an
      ``argmax`` stays integer).

    Raises:
      ValueError (when ``g`` is traced): an op with no integer form (named, with its
      module), a matmul without a quantized weight or static activation scale, zero
      points, grouped or float weight formats.

    Example:
      >>> a8 = qjax.QuantSpec(qjax.int8)  # one static scale per tensor
      >>> policy = qjax.Policy([qjax.Rule(".*kernel", weight=w8, act=a8)])
      >>> stats = qjax.calibrate(model.apply, policy, variables, calib)
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> logits = qjax.integer_only(model.apply, policy, qparams)(x)
    """
    check_policy(policy)
    program = _Program(policy)

    def run(*args):
        traced = trace(f, qparams, *args, **kwargs)
        leaves = [
            _Weight(path, leaf) if isinstance(leaf, QArray) else leaf
            for path, leaf in zip(traced.param_paths, traced.param_leaves)
        ]
        closed = traced.jaxpr
        outs = program.evaluate(closed.jaxpr, closed.consts, [*leaves, *jax.tree.leaves(args)])
        return jax.tree.unflatten(traced.out_tree, [_output(o) for o in outs])

    return jax.jit(run)


__all__ = ["integer_only"]
