"""Fixed-point training: fake-fixed forward, quantized backward, fixed-point updates.

* :func:`fake_fixed` rounds a float tensor onto a format in the forward pass (exactly as
  :func:`qjax.fixed.from_float`) and passes the gradient straight through (STE), zero
  where the value saturated (``ste="clipped"``, the default).
* :func:`quantize_grad` is the identity forward and rounds the incoming gradient onto a
  format in the backward pass, stochastically (unbiased) when the format says so.
* :func:`fake_fixed_point` transforms ``f(params, *args)``: each matched matmul/conv
  reads its weight and input through ``fake_fixed`` and rounds its output onto
  ``output``; with ``LayerFormats.grad`` the output gradient is rounded onto ``grad``
  so both backward matmuls (``dW = xᵀ·g``, ``dx = g·Wᵀ``) see fixed-point operands.
* :func:`fixed_updates` wraps an optax ``GradientTransformation`` so that each matched
  parameter is kept on its accumulator format: ``p' = p + SR(u)`` in integers, where the
  update ``u`` is rounded stochastically onto ``p``'s grid and the sum follows the
  format's overflow mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax.fixed import elementwise
from qjax.fixed.arith import add
from qjax.fixed.array import is_fixed, to_float
from qjax.fixed.cast import from_float
from qjax.fixed.format import Format
from qjax.fixed.network import FLOAT_MANTISSA_BITS, OpsHandler, as_rules, layer_rule, op_rules, where
from qjax.graph.interpret import bind_eqn, materialize, run, weight_operand
from qjax.graph.trace import trace
from qjax.rules import fold_in_path, leaves_with_paths, map_matched, map_with_path


def _fake(x, fmt: Format, key):
    fx = from_float(x, fmt, key=key)
    return to_float(fx, x.dtype), fx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_fixed(x, fmt: Format, clipped: bool, key):
    return _fake(x, fmt, key)[0]


def _fake_fwd(x, fmt, clipped, key):
    y, _ = _fake(x, fmt, key)
    if clipped and fmt.overflow != "WRAP":
        inside = jnp.abs(y - x) <= fmt.lsb  # rounding moves a value by less than one LSB
    else:
        inside = jnp.ones(x.shape, bool)
    return y, inside


def _fake_bwd(fmt, clipped, inside, g):
    return (jnp.where(inside, g, jnp.zeros_like(g)), None)


_fake_fixed.defvjp(_fake_fwd, _fake_bwd)


def fake_fixed(x, fmt: Format, *, key=None, ste: str = "clipped") -> jax.Array:
    """Round ``x`` onto ``fmt`` in the forward pass; straight-through gradient.

    Args:
      x: float array.
      fmt: the format.
      key: PRNG key for ``STOCHASTIC`` rounding.
      ste: ``"clipped"`` (zero gradient where saturation moved the value by more than
        one LSB; WRAP formats pass everything) or ``"plain"`` (identity gradient).

    Returns:
      ``from_float(x, fmt).to_float()`` with ``x``'s dtype.

    Raises:
      ValueError: unknown ``ste``; stochastic rounding without a key.
    """
    if ste not in ("clipped", "plain"):
        raise ValueError(f"unknown ste {ste!r}; expected 'clipped' or 'plain'")
    if fmt.stochastic and key is None:
        raise ValueError(f"{fmt} rounds stochastically: pass key=")
    x = jnp.asarray(x)
    return _fake_fixed(x, fmt, ste == "clipped", key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _qgrad(x, fmt: Format, key):
    return x


def _qgrad_fwd(x, fmt, key):
    return x, key


def _qgrad_bwd(fmt, key, g):
    return (to_float(from_float(g, fmt, key=key), g.dtype), None)


_qgrad.defvjp(_qgrad_fwd, _qgrad_bwd)


def quantize_grad(x, fmt: Format, *, key=None) -> jax.Array:
    """Identity in the forward pass; the gradient flowing back through it is rounded onto
    ``fmt`` (``STOCHASTIC`` rounding needs ``key``; use a fresh key every step).

    Raises:
      ValueError: stochastic rounding without a key.
    """
    if fmt.stochastic and key is None:
        raise ValueError(f"gradient format {fmt} rounds stochastically: pass key=")
    return _qgrad(jnp.asarray(x), fmt, key)


_FLOAT_OPS = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "logistic": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def fake_op(primitive: str, fmts: elementwise.OpFormats, operands: list, dtype, key, ste: str = "clipped"):
    """A merge / table activation as :func:`qjax.fixed.fixed_point` computes it (the same
    values), differentiable: the gradient is the float op's through :func:`fake_fixed`
    roundings of its operands (onto ``input``) and result (onto ``output``), i.e. STE."""
    exact = elementwise.apply(primitive, fmts, operands, dtype, key)
    xs = [fake_fixed(jnp.asarray(x, dtype), fmts.input, key=key, ste=ste) for x in operands]
    y = fake_fixed(_FLOAT_OPS[primitive](*xs), fmts.output, key=key, ste=ste)
    return jax.lax.stop_gradient(exact) + (y - jax.lax.stop_gradient(y))  # exact values, y's gradient


class _FakeFixed(OpsHandler):
    def __init__(self, rs, key, ste: str, ops):
        super().__init__(ops, key)
        self.rs, self.ste = rs, ste

    def run_op(self, primitive, fmts, invals, dtype, key):
        return fake_op(primitive, fmts, invals, dtype, key, self.ste)

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        lf, m = layer_rule(self.rs, ref.path)
        if lf is None:
            return None
        if lf.bias_inside:
            raise ValueError(
                f"{where(ref.path, m)}: LayerFormats.accum / bias_in_accumulator are inference-only "
                "(qjax.fixed.fixed_point); fake_fixed_point accumulates exactly and adds the bias in float"
            )
        k = lambda tag: fold_in_path(self.key, ref.path + tag)
        try:
            w = fake_fixed(ref.float_leaf(), lf.weight, key=k(":w"), ste=self.ste)
            for op in ref.ops:
                w = op.apply(w)
            args = [materialize(v) for v in invals]
            args[wi] = w
            args[1 - wi] = fake_fixed(args[1 - wi], lf.input, key=k(":in"), ste=self.ste)
            (y,) = bind_eqn(eqn, args)
            if lf.output is not None:
                y = fake_fixed(y, lf.output, key=k(":out"), ste=self.ste)
            if lf.grad is not None:
                y = quantize_grad(y, lf.grad, key=k(":grad"))
        except ValueError as e:
            raise ValueError(f"{where(ref.path, m)}, {eqn.primitive.name}: {e}") from e
        return [y]


def fake_fixed_point(f: Callable, rules, *, ops=(), key=None, ste: str = "clipped") -> Callable:
    """``f`` with its matched matmuls/convs fake-fixed, for fixed-point training.

    Forward: leaves whose rule is a plain ``Format`` (biases, norm parameters) rounded onto
    it; weight and input rounded onto ``weight``/``input`` (:func:`fake_fixed`), the
    op in float (exact when the accumulator fits the float significand, so it equals
    :func:`qjax.fixed.fixed_point`), the output rounded onto ``output``. Backward: STE
    through the roundings; with ``grad`` the output gradient is rounded onto it first.

    Args:
      f: ``f(params, *args, **kwargs)``.
      rules: as :func:`qjax.fixed.fixed_point` (``LayerFormats`` and ``Format`` values).
      ops: as :func:`qjax.fixed.fixed_point`: merges and table activations with the
        served values (:func:`fake_op`), straight-through gradients.
      key: PRNG key for stochastic formats (use a fresh key every step).
      ste: ``"clipped"`` or ``"plain"``.

    Returns:
      A function with ``f``'s signature, differentiable in ``params``.
    """
    rs, ops_rs = as_rules(rules), op_rules(ops)

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        params = _fake_format_leaves(params, rs, key, ste)
        traced = trace(f, params, *args, **kwargs)
        handler = _FakeFixed(rs, key, ste, ops_rs)
        outs, _ = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
        handler.check_ops_used("fake_fixed_point")
        return jax.tree.unflatten(traced.out_tree, outs)

    return g


def _fake_format_leaves(params: Any, rs, key, ste: str) -> Any:
    """Leaves whose rule is a plain ``Format`` (biases, norm parameters) rounded onto it
    with a straight-through gradient, as :func:`qjax.fixed.fixed_point` rounds them."""

    def visit(path, leaf, m):
        if not isinstance(m.value, Format) or is_fixed(leaf):
            return leaf
        return fake_fixed(leaf, m.value, key=fold_in_path(key, path + ":p"), ste=ste)

    return map_matched(visit, params, rs)


class FixedUpdatesState(NamedTuple):
    """State of :func:`fixed_updates`: the inner optimizer's state and a PRNG key."""

    inner: Any
    key: jax.Array


def _update_format(fmt: Format) -> Format:
    """The format an update is rounded onto: ``fmt``'s grid and rounding, signed, twice
    its range, saturating."""
    return Format(fmt.width + 1, fmt.integer + 1, True, fmt.rounding, "SAT")


def fixed_updates(inner: optax.GradientTransformation, rules, key) -> optax.GradientTransformation:
    """Keep matched parameters on a fixed-point accumulator format while training.

    For a leaf whose rule value is a ``Format`` (its accumulator format; a
    ``LayerFormats`` rule uses its ``weight`` format), the new value is computed in
    integers: ``p' = cast(p) + cast(u)`` with ``u`` the inner optimizer's update rounded
    onto ``p``'s grid by the format's rounding (``STOCHASTIC``: unbiased, so updates
    smaller than one LSB still move the weight on average) and the sum following the
    format's overflow mode. The returned update is ``p' - p``, so
    ``optax.apply_updates`` lands exactly on ``p'`` (checked: the format must be at most
    23 bits for float32 params, 52 for float64). Other leaves get the inner update.

    Args:
      inner: the optax transformation computing float updates.
      rules: ``(pattern, Format | LayerFormats | None)`` pairs or a ``RuleSet``.
      key: PRNG key (split every step).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: ``update`` called without params; a format too wide for the params'
        float dtype.
    """
    rs = as_rules(rules)

    def fmt_for(path):
        m = rs.match(path)
        v = None if m is None else m.value
        return (v.weight if hasattr(v, "weight") else v), m

    def init(params):
        return FixedUpdatesState(inner.init(params), key)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("fixed_updates needs params: call update(grads, state, params)")
        u, inner_state = inner.update(updates, state.inner, params)
        next_key, step_key = jax.random.split(state.key)
        u_leaves = dict(leaves_with_paths(u))

        def visit(path, p):
            fmt, m = fmt_for(path)
            if fmt is None:
                return u_leaves[path]
            bits = FLOAT_MANTISSA_BITS.get(jnp.dtype(p.dtype), 0)
            if fmt.width + 1 > bits:  # p' - p needs one bit more than the format
                raise ValueError(
                    f"{where(path, m)}: {fmt} is too wide for exact updates of {jnp.dtype(p.dtype).name} "
                    f"params (at most {bits - 1} bits)"
                )
            k = fold_in_path(step_key, path)
            k1, k2 = jax.random.split(k)
            p_fx = from_float(p, fmt, key=k1)
            u_fx = from_float(u_leaves[path], _update_format(fmt), key=k2)
            new = add(p_fx, u_fx, fmt)  # same grid: only the overflow mode acts
            return (to_float(new, p.dtype) - p).astype(p.dtype)

        return map_with_path(visit, params), FixedUpdatesState(inner_state, next_key)

    return optax.GradientTransformation(init, update)
