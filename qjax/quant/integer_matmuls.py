"""The matmuls of :func:`qjax.integer_only`: a quantized weight's (int8 × int8 → int32 with
its input requantized to the weight's calibrated activation scale) and two activations'
(attention's ``QKᵀ`` / ``PV``, both operands at the static scales an ``OpRule``'s
``op_stats`` give), with the bound of the int32 accumulator checked and the product's
scale laid out along the output. A mixin of the integer program (:mod:`qjax.quant.integer_only`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.interpret import bind_eqn
from qjax.graph.layout import unpacked
from qjax.numerics.qarray import QArray
from qjax.numerics.spec import PER_TOKEN
from qjax.quant import op_stats as op_stats_lib
from qjax.quant.dyadic import requantize
from qjax.quant.integer_values import IntValue, coarsen, compress, uniform


@dataclasses.dataclass(frozen=True)
class Weight:
    """A quantized params leaf as an op reads it: ``q`` (stored codes) with ``views``, the
    ``("transpose", perm)`` / ``("rev", dims)`` ops between the leaf and the op."""

    path: str
    q: QArray
    views: tuple = ()


@dataclasses.dataclass(frozen=True)
class FromWeight:
    """A static value computed from a quantized weight by an op integer-only inference does
    not follow on weights (kept to name it if a matmul reads it)."""

    value: Any
    path: str
    via: str


def view(x, views, xp):
    for kind, arg in views:
        if kind == "transpose":
            x = xp.transpose(x, arg)
        elif np.shape(x) and any(np.shape(x)[d] > 1 for d in arg):
            x = xp.flip(x, axis=tuple(d for d in arg if np.shape(x)[d] > 1))
    return x


def static_value(x):
    if isinstance(x, Weight):
        with jax.ensure_compile_time_eval():  # the params are concrete: so is their value
            return view(x.q.dequantize(), x.views, jnp)
    return x.value if isinstance(x, FromWeight) else x


def _narrowest(lo: int, hi: int, codes: np.ndarray | None = None):
    """The narrowest integer type (int8, int16, else int32) holding ``[lo, hi]`` and ``codes``
    (both operands' centred codes)."""
    if codes is not None:
        lo, hi = min(lo, int(codes.min(initial=0))), max(hi, int(codes.max(initial=0)))
    return jnp.int8 if -128 <= lo and hi <= 127 else jnp.int16 if -32768 <= lo and hi <= 32767 else jnp.int32


class IntegerMatmuls:
    """The matmul ops of the integer program (needs ``policy``, ``op_stats`` and
    ``_input_ranges`` on the program)."""

    # -- matmuls ---------------------------------------------------------------------------

    def _matmul(self, eqn, invals, wi: int, where: str) -> IntValue:
        w: Weight = invals[wi]
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
        if q.format.is_float:
            raise fail("needs integer weight codes (not a float or codebook format)")
        # zero points: both operands enter centred (codes minus zero point), so padded
        # positions of a conv (0) stand for real 0 and no correction terms are needed
        with jax.ensure_compile_time_eval():  # the params are concrete: so are their codes
            w_codes = np.asarray(
                view(unpacked(q).values if q.packed_axis is not None else q.values, w.views, jnp), np.int64
            )
        w_scale = view(np.asarray(q.scale, np.float64), w.views, np)
        contracted = self._contracted(eqn, wi)
        varying = [d for d in contracted if w_scale.shape[d] != 1]
        grouped = None  # the contracted axis the weight's groups lie along
        if varying:
            c = varying[0]
            if not (
                len(varying) == 1
                and eqn.primitive.name == "dot_general"
                and q.group_size is not None
                and w_scale.shape[c] * q.group_size == w_codes.shape[c]
            ):
                raise fail(
                    "its scale varies along the contracted axes (other than groups of a dot_general's one "
                    "contracted axis)"
                )
            grouped = c
        if q.zero_point is not None:
            zp = view(np.round(np.asarray(q.zero_point, np.float64)), w.views, np).astype(np.int64)
            if grouped is not None:  # one zero point per group: repeated over the group's rows
                zp = np.repeat(zp, q.group_size, axis=grouped)
            w_codes = w_codes - zp
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
        if grouped is not None:
            return self._grouped_matmul(
                eqn, wi, act, w_codes, w_scale, grouped, q.group_size, s_act, (lo_a, hi_a), fail
            )
        bound = a_max * float(np.abs(w_codes).sum(axis=contracted).max(initial=0))
        if bound > 2.0**31 - 1:
            raise fail(
                f"its int32 accumulator can overflow: activation codes up to {a_max} times weight codes "
                f"summing to {bound / a_max:.0f} over the contraction; use narrower formats (8 bits) or "
                "a shorter contraction"
            )
        wide = _narrowest(lo_a, hi_a, w_codes)
        operands = [None, None]
        operands[wi], operands[1 - wi] = jnp.asarray(w_codes, wide), act.astype(wide)
        params = {**eqn.params, "preferred_element_type": jnp.dtype(jnp.int32)}
        acc = bind_eqn(eqn.replace(params=params), operands)[0]
        return IntValue(acc, compress(s_act * self._out_scale(eqn, wi, w_scale, acc.ndim)), bound)

    def _grouped_matmul(self, eqn, wi, act, w_codes, w_scale, c, group_size, s_act, act_range, fail):
        """A dot_general whose weight has a scale per group of ``group_size`` along its one
        contracted axis ``c`` (GPTQ / AWQ / int4 g128): the contraction split into groups (a
        batch axis of the int32 product), each group's partial sums rescaled onto one finer
        scale by 30-bit dyadic ratios, and summed (one unit of that scale per group)."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        mine_c, other_c, mine_b, other_b = (rc, lc, rb, lb) if wi == 1 else (lc, rc, lb, rb)
        a = other_c[list(mine_c).index(c)]  # the activation's axis contracted with c
        groups = w_codes.shape[c] // group_size

        def split(x, axis, size):  # axis -> (groups, size)
            return x.reshape((*x.shape[:axis], groups, size, *x.shape[axis + 1 :]))

        def contracted(dims, axis):  # after the split: the group's rows are contracted
            return tuple(d + 1 if d >= axis else d for d in dims)

        def batch(dims, axis):  # after the split: the groups join the batch axes
            return (*(d + (d > axis) for d in dims), axis)

        w_c, a_c = contracted(mine_c, c), contracted(other_c, a)
        w_b, a_b = batch(mine_b, c), batch(other_b, a)
        dims = ((a_c, w_c), (a_b, w_b)) if wi == 1 else ((w_c, a_c), (w_b, a_b))
        group_eqn = eqn.replace(
            params={**eqn.params, "dimension_numbers": dims, "preferred_element_type": jnp.dtype(jnp.int32)}
        )
        w_split = split(w_codes, c, group_size)
        a_max = max(-act_range[0], act_range[1])
        bound = a_max * float(np.abs(w_split).sum(axis=w_c).max(initial=0))
        if bound > 2.0**31 - 1:
            raise fail(f"its int32 accumulator can overflow within a group of {group_size}")
        wide = _narrowest(*act_range, w_split)
        operands = [None, None]
        operands[wi], operands[1 - wi] = jnp.asarray(w_split, wide), split(act, a, group_size).astype(wide)
        acc = bind_eqn(group_eqn, operands)[0]  # (batch..., groups, free...)
        g_axis = len(w_b) - 1
        scale = s_act * self._out_scale(group_eqn, wi, split(w_scale, c, 1), acc.ndim)
        parts = coarsen(uniform(IntValue(acc, compress(scale), bound), (g_axis,), refine=True), groups)
        return IntValue(
            jnp.sum(parts.data, axis=g_axis), np.squeeze(parts.scale, g_axis), parts.bound * groups
        )

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
        wide = _narrowest(min(o[1] for o in operands), max(o[2] for o in operands))
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
        x = static_value(x)  # the float input's one quantization
        return jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / np.float32(s_act)), qmin, qmax).astype(
            jnp.int32
        )
