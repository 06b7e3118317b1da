"""Int8 training inside :func:`qjax.fake_quantized` (rules and op rules with ``grad=``):
the op keeps the forward pass ``fake_quantized`` serves and gets the integer backward of
:mod:`qjax.quant.int8_training` (AQT-style), with the STE clip mask of each quantized
activation's range applied first."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax.graph.interpret import WeightRef
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.spec import QuantSpec
from qjax.quant.int8_training import (
    check_grad_spec,
    dot_backward,
    with_float_cotangents,
    with_integer_backward,
)
from qjax.quant.int8_training_conv import conv_backward, conv_config
from qjax.quant.policy import Rule, grad_specs
from qjax.quant.serve import _conv_geometry


def _keyed_backward(backward: Callable, grads, where: str) -> Callable:
    """``backward`` of :func:`with_integer_backward`, refusing a missing key when a spec of
    ``grads`` rounds stochastically. The check runs when the backward pass is traced, so a
    forward call (evaluation, a check against the served model) needs no key."""
    if all(g is None or g.rounding != "stochastic" for g in grads):
        return backward

    def run(lhs, rhs, key, g, extra):
        if key is None:
            raise ValueError(
                f"{where}: the grad spec rounds stochastically: pass key= to fake_quantized (a fresh key "
                "every step) to differentiate it"
            )
        return backward(lhs, rhs, key, g, extra)

    return run


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def with_act_ste(x, spec: QuantSpec, static):
    """``x``, with the gradient that ``fake_quant`` by ``spec`` with the static scale
    ``static = (scale, zero_point)`` (or ``None``: the dynamic one) has: the clipped STE,
    zero outside the range (a clipping calibrator's, for a dynamic scale)."""
    return x


def _with_act_ste_fwd(x, spec, static):
    scale, zero_point = (None, None) if static is None else static
    nearest = spec.replace(rounding="nearest")  # stochastic rounding moves no value past the range
    _, vjp_fn = jax.vjp(lambda v: fake_quant(v, nearest, scale=scale, zero_point=zero_point), x)
    return x, (vjp_fn, static)


def _with_act_ste_bwd(spec, res, g):
    vjp_fn, static = res
    return vjp_fn(g)[0], jax.tree.map(jnp.zeros_like, static)


with_act_ste.defvjp(_with_act_ste_fwd, _with_act_ste_bwd)


def check_int8_training(eqn, wi: int, rule: Rule, ref: WeightRef, learned: dict) -> None:
    """Refuse what int8 training (``grad=``) cannot run, naming the leaf and the rule."""
    path, name = ref.path, eqn.primitive.name
    where = f"leaf {path!r} (rule {rule.pattern!r}): grad= (int8 training)"
    if name not in ("dot_general", "conv_general_dilated"):
        raise ValueError(
            f"{where} covers dot_general matmuls and conv_general_dilated convolutions; {name} is not "
            "supported"
        )
    if name == "conv_general_dilated" and wi != 1:
        raise ValueError(
            f"{where} of a convolution needs the weight as the kernel (rhs) operand; here it is the "
            "input (lhs)"
        )
    if isinstance(rule.grad, QuantSpec):
        check_grad_spec(rule.grad, f"{where}: the grad spec")
    else:
        for side in ("activation", "weight"):
            if getattr(rule.grad, side) is not None:
                check_grad_spec(getattr(rule.grad, side), f"{where}: the grad spec GradSpecs.{side}")
    if rule.weight.ste == "lsq" or path in learned:
        raise ValueError(
            f"{where} does not learn scales: its backward pass re-quantizes the weight; use a weight "
            "spec without ste='lsq' (and no learned scales for this leaf), or a rule without grad="
        )


def int8_training(eqn, forward, args, extra, wi: int, rule: Rule, path: str, key, float_vjp):
    """The op whose forward pass is ``forward(act, *extra)`` (the one ``fake_quantized``
    runs without ``grad=``, so the one served) and whose backward pass is the integer
    one, drawing its stochastic rounding from ``key``. A backward matmul that
    :class:`qjax.GradSpecs` keeps in float takes its cotangent from
    ``float_vjp(act, *extra, g) -> (d_act, d_weight)`` (the straight-through gradient)."""
    specs, grads = [None, None], [None, None]
    specs[wi], specs[1 - wi] = rule.weight, rule.act
    gs = grad_specs(rule.grad)
    grads[wi], grads[1 - wi] = gs.weight, gs.activation  # each operand's cotangent matmul
    if eqn.primitive.name == "conv_general_dilated":
        cfg = conv_config(
            args[0].shape,
            args[1].shape,
            **_conv_geometry(eqn),
            lhs_spec=specs[0],
            rhs_spec=specs[1],
            grad_spec=tuple(grads),
        )
        backward = conv_backward(cfg)
    else:
        backward = dot_backward(eqn.params["dimension_numbers"], specs[0], specs[1], tuple(grads))
    where = f"leaf {path!r} (rule {rule.pattern!r}): grad= (int8 training)"
    backward = _keyed_backward(backward, grads, where)

    def by_operand(lhs, rhs, extra, g):
        d_act, d_weight = float_vjp((lhs, rhs)[1 - wi], *extra, g)
        return (d_weight, d_act) if wi == 0 else (d_act, d_weight)

    backward = with_float_cotangents(backward, grads, by_operand)
    run = lambda lhs, rhs, extra: forward((lhs, rhs)[1 - wi], *extra)
    out = with_integer_backward(run, backward, *args, extra, key)
    return out.astype(eqn.outvars[0].aval.dtype)


def op_int8_training(eqn, forward, invals, specs, statics, grad, key, where: str):
    """A matmul between two activations (an ``OpRule`` with ``grad``) whose forward pass is
    ``forward(lhs, rhs, statics)`` and whose backward matmuls are integer ones, each
    operand's gradient clipped to its range first (static, or a clipping calibrator's).
    ``grad``: a ``QuantSpec`` for both, or a ``(dlhs, drhs)`` pair whose ``None`` side takes
    the straight-through cotangent of ``forward`` (the fake-quantized float op)."""
    args = [with_act_ste(x, sp, st) for x, sp, st in zip(invals, specs, statics)]
    grads = (grad, grad) if isinstance(grad, QuantSpec) else tuple(grad)
    backward = _keyed_backward(dot_backward(eqn.params["dimension_numbers"], *specs, grads), grads, where)

    def float_vjp(lhs, rhs, extra, g):
        out, pull = jax.vjp(lambda a, b: forward(a, b, extra), lhs, rhs)
        return pull(g.astype(out.dtype))

    backward = with_float_cotangents(backward, grads, float_vjp)
    out = with_integer_backward(forward, backward, *args, statics, key)
    return out.astype(eqn.outvars[0].aval.dtype)
