"""Re-evaluating a jaxpr with the ops that read params replaced.

:func:`evaluate` walks a jaxpr equation by equation. Params leaves enter as
:class:`WeightRef`s: symbolic values that remember the leaf path, the stored leaf
(a ``QArray`` or a float array) and the layout ops applied since. Layout ops on a
``WeightRef`` extend it; a ``dot_general`` or ``conv_general_dilated`` that reads one is
handed to the :class:`Handler`; any other consumer gets the value
:meth:`Handler.materialize` gives (the float weight by default; the quantizing handlers
give the quantized one, so an embedding lookup reads what deployment stores), unless
:meth:`Handler.other` replaces the op (the fixed-point transform adds a bias inside an
accumulator that way).
Higher-order primitives are entered only when a ``WeightRef`` flows into them, or, for a
handler that :attr:`~Handler.visits_activation_ops`, when they may hold a matmul between
two activations (:meth:`Handler.activation_op`; its name stack is joined to those of the
calls it sits in: :func:`full_scope`). Otherwise they are bound unchanged, custom
derivative rules and all:

* ``jit``/``pjit``: the body is evaluated inline; a weight view it returns
  (``lax.dynamic_index_in_dim``, ``jnp.rot90``, a user's jitted helper) stays a ``WeightRef``;
* ``custom_jvp_call``, ``custom_vjp_call``: inlined only when a target op inside reads a
  weight the handler acts on (:meth:`Handler.acts_on`); the ops inside then get the
  handler's derivative rules and the user's custom rule is dropped (a quantized weight
  inside a user's straight-through ``custom_vjp`` gets the transform's STE instead).
  Otherwise the call is bound unchanged on materialized values, keeping the user's rule;
* ``scan``: rebuilt with ``lax.scan``; a stacked param fed as ``xs`` (directly or through
  layout ops that keep its layers on axis 0: casts, ``stop_gradient``, transposes of the
  other axes) is sliced per iteration (a stacked ``QArray`` slices with its per-layer
  scales) and the layout ops replayed on the slice, so every iteration is the same op,
  identified by the stacked leaf's path;
* ``cond``, ``while``: rebuilt with ``lax.switch`` / ``lax.while_loop``, weights closed
  over; a value a ``cond`` branch did not emit is NaN (not executed); values emitted in a
  ``while`` body (a data-dependent number of iterations) are reduced over the iterations
  in the loop's carry as the handler's :meth:`Handler.loop_reduction` says, else an error;
* ``remat``/``checkpoint``: rebuilt with ``jax.checkpoint`` (same policy);
* ``shard_map``: rebuilt with ``jax.shard_map``; a ``QArray`` weight is passed in with
  scale specs derived from the weight's spec.
* ``optimization_barrier`` passes a weight through as a view; ``jnp.split`` /
  ``jnp.unstack`` give a view per part.

The weight references and their views live in :mod:`qjax.graph.weight_ref`.

Handlers may ``emit`` values (e.g. calibration statistics) keyed by path; inside a
``scan`` they are stacked per iteration; inside a ``shard_map`` (handlers with
``per_shard_emits`` only) each shard's value is a separate read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from qjax.graph import loop_pooling
from qjax.graph._primitives import scan_counts
from qjax.graph.handler import Handler
from qjax.graph.layout import LAYOUT_PRIMITIVES, leading_slice
from qjax.graph.weight_ref import (  # noqa: F401  (re-exported)
    LayoutOp,
    WeightRef,
    materialize,
    slice_views,
    spec_for_slice,
    split_views,
    unstack_views,
    weight_operand,
)
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray

TARGET_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
# matmuls handlers may replace through Handler.other (their operands differ from a dot's):
# a user's custom derivative around one is inlined as for a target op
OTHER_TARGET_PRIMITIVES = frozenset({"ragged_dot_general"})


class _Emitter:
    """Collects emitted values: ``values[key]`` is the list of everything emitted under
    ``key`` (an op read several times emits several values)."""

    def __init__(self):
        self.values: dict[str, list] = {}

    def __call__(self, key: str, value) -> None:
        self.values.setdefault(key, []).append(value)


def bind_eqn(eqn, invals) -> list:
    """Bind an equation's primitive, unchanged, to new inputs; always a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _value(handler: Handler, x, where: str):
    """``x``, or for a ``WeightRef`` the value the handler gives a non-target consumer
    (``where``: what reads it, for :meth:`Handler.read`)."""
    if not isinstance(x, WeightRef):
        return x
    handler.read(x, where)
    return handler.materialize(x)


def _has_ref(values) -> bool:
    return any(isinstance(v, WeightRef) for v in values)


def evaluate(
    jaxpr, consts, args, handler: Handler, emit: Callable[[str, Any], None], scope: str = ""
) -> list:
    """Evaluate an (open) ``jaxpr`` on ``consts`` and ``args`` (values or ``WeightRef``s);
    ``scope``: the name stack of the call or loop whose body it is (an inlined body's
    equations record their name stack relative to it)."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    activations = handler.visits_activation_ops
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        visit = _has_ref(invals) or (activations and _may_hold_activation_op(eqn, handler))
        outs = _eval_eqn(eqn, invals, handler, emit, scope) if visit else bind_eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _may_hold_activation_op(eqn, handler: Handler) -> bool:
    """An op the handler's :meth:`~Handler.activation_op` sees (a ``dot_general``), or a
    call / control-flow op whose body may hold one."""
    return eqn.primitive.name in handler.activation_primitives or eqn.primitive.name in _RULES


def full_scope(enclosing: str, eqn) -> str:
    """The name stack of ``eqn`` joined to the ``enclosing`` call's or loop's: the module
    path and named scopes it runs under, as written (the walker inlines bodies, whose
    equations record their name stack relative to the call)."""
    own = str(eqn.source_info.name_stack)
    return f"{enclosing}/{own}" if enclosing and own else enclosing or own


def _eval_eqn(eqn, invals, handler, emit, enclosing: str = ""):
    name = eqn.primitive.name
    scope = full_scope(enclosing, eqn)
    if name in handler.activation_primitives and not _has_ref(invals):
        out = handler.activation_op(eqn, invals, scope, emit)
        return out if out is not None else bind_eqn(eqn, invals)
    if name in TARGET_PRIMITIVES:
        out = handler.target(eqn, invals, emit)
        return out if out is not None else _bind_values(eqn, invals, handler)
    if name == "optimization_barrier":
        return _barrier(eqn, invals, handler)
    if name in LAYOUT_PRIMITIVES and isinstance(invals[0], WeightRef) and not _has_ref(invals[1:]):
        ref = invals[0]
        params = dict(eqn.params)
        op = LayoutOp(eqn.primitive, params, tuple(invals[1:]))
        return [dataclasses.replace(ref, ops=(*ref.ops, op))]
    if name == "split" and isinstance(invals[0], WeightRef):
        return split_views(eqn, invals[0])
    if name == "unstack" and isinstance(invals[0], WeightRef):
        return unstack_views(eqn, invals[0])
    rule = _RULES.get(name)
    if rule is not None:
        return rule(eqn, invals, handler, emit, scope)
    out = handler.other(eqn, invals, emit)
    return out if out is not None else _bind_values(eqn, invals, handler)


def _bind_values(eqn, invals, handler):
    """Bind ``eqn`` unchanged, weights replaced by the values the handler gives them."""
    return bind_eqn(eqn, [_value(handler, x, eqn.primitive.name) for x in invals])


def _barrier(eqn, invals, handler) -> list:
    """``optimization_barrier``: a weight passes through as a view (the barrier replayed on
    it); the other operands go through one barrier together."""
    plain = [x for x in invals if not isinstance(x, WeightRef)]
    outs = iter(bind_eqn(eqn, plain) if plain else [])
    op = LayoutOp(eqn.primitive, dict(eqn.params))
    return [
        dataclasses.replace(x, ops=(*x.ops, op)) if isinstance(x, WeightRef) else next(outs) for x in invals
    ]


def _closed(sub, args, handler, emit, scope: str):
    return evaluate(sub.jaxpr, sub.consts, args, handler, emit, scope)


def _inline(key):
    """Evaluate a call's body in place; a weight (view) it returns stays a ``WeightRef``
    (``lax.dynamic_index_in_dim``, ``jnp.rot90`` and a user's jitted helpers return views)."""

    def rule(eqn, invals, handler, emit, scope):
        return _closed(eqn.params[key], invals, handler, emit, scope)

    return rule


class _Probe(Handler):
    """Abstract evaluation that only notes whether a target op reads a weight ``inner``
    acts on."""

    def __init__(self, inner: Handler):
        self.inner, self.found = inner, False

    def acts_on(self, ref: WeightRef) -> bool:
        return self.inner.acts_on(ref)

    def target(self, eqn, invals, emit):
        self.found |= any(isinstance(x, WeightRef) and self.inner.acts_on(x) for x in invals[:2])
        return None

    def other(self, eqn, invals, emit):
        # a ragged dot of a weight is a matmul the policy handlers replace (through other)
        if eqn.primitive.name in OTHER_TARGET_PRIMITIVES:
            self.target(eqn, invals, emit)
        return None


def _custom_derivative(key):
    """``custom_jvp_call`` / ``custom_vjp_call``: inlined (the user's derivative rule then
    gives way to the handler's) only when a target op inside reads a weight the handler
    acts on; otherwise bound unchanged, keeping the user's rule (a straight-through
    binarized layer, a weight no rule matches)."""
    inline = _inline(key)

    def rule(eqn, invals, handler, emit, scope):
        probe = _Probe(handler)

        def trial():
            _closed(eqn.params[key], invals, probe, lambda k, v: None, scope)

        jax.eval_shape(trial)
        if probe.found:
            return inline(eqn, invals, handler, emit, scope)
        return _bind_values(eqn, invals, handler)

    return rule


def _split(values, *sizes):
    out, i = [], 0
    for n in sizes:
        out.append(list(values[i : i + n]))
        i += n
    out.append(list(values[i:]))
    return out


def _scan_parts(ref: WeightRef, length: int):
    """Split a stacked params leaf (and its aux) for ``lax.scan``: the arrays whose leading
    axis has the scan's length are sliced per iteration; those with a leading axis of 1
    (a scale shared by every layer) or none are the same in every iteration. The ref's
    layout ops are replayed on each slice (:func:`slice_views`).

    Returns:
      ``(sliced arrays, rebuild)``; ``rebuild(slices)`` gives the iteration's ``WeightRef``;
      ``None`` when the layout ops do not keep the layers along axis 0.

    Raises:
      ValueError: an array with any other leading size (names the leaf).
    """
    ops = slice_views(ref.ops, length)
    if ops is None:
        return None
    leaves, treedef = jax.tree.flatten((ref.leaf, ref.aux))
    per_layer = []
    for a in leaves:
        shape = jnp.shape(a)
        if shape and shape[0] == length:
            per_layer.append(True)
        elif not shape or shape[0] == 1:
            per_layer.append(False)
        else:
            raise ValueError(
                f"leaf {ref.path!r} is scanned {length} times, but a part of it (a scale, or a value "
                f"kept with it such as a learned scale) has shape {shape}: its leading axis must be "
                f"{length} (one per layer) or 1 (shared)"
            )
    aux_leaves = len(jax.tree.leaves(ref.aux))
    # the sharing of the aux's first array (a learned LSQ scale), as ``aux_shared`` counts it
    aux_shared = aux_leaves > 0 and not per_layer[-aux_leaves]

    def rebuild(slices) -> WeightRef:
        it = iter(slices)
        vals = [next(it) if p else (a[0] if jnp.ndim(a) else a) for a, p in zip(leaves, per_layer)]
        leaf, aux = jax.tree.unflatten(treedef, vals)
        if isinstance(leaf, QArray):
            leaf = leading_slice(leaf)
        elif isinstance(leaf, TransposedQArray):  # leading axes are the same stored and logical
            leaf = TransposedQArray.tree_unflatten(None, [leading_slice(leaf.stored)])
        shared = ref.aux_shared * (length if aux_shared else 1)
        return WeightRef(ref.path, leaf, ops, ref.depth + 1, aux, shared, ref.shard_axes[1:])

    return [a for a, p in zip(leaves, per_layer) if p], rebuild


def _scan(eqn, invals, handler, emit, scope):
    p = eqn.params
    num_consts, num_carry = scan_counts(p)
    consts, init, xs = _split(invals, num_consts, num_carry)
    init = [_value(handler, x, "scan") for x in init]
    # A params leaf fed as xs (through layout ops that keep its layers) is scanned as its
    # stored form (QArray and TransposedQArray slices too), its aux beside it; parts shared
    # by every layer are not sliced.
    parts = [_scan_parts(x, p["length"]) if isinstance(x, WeightRef) else None for x in xs]
    xs_in = [_value(handler, x, "scan") if part is None else part[0] for x, part in zip(xs, parts)]
    body = p["jaxpr"]

    def step(state, x_slices):
        carry, i = state  # i counts the iterations: the handler's randomness folds it in
        local = _Emitter()
        x_vals = [x if part is None else part[1](x) for part, x in zip(parts, x_slices)]
        with handler.iteration(i):
            outs = [
                _value(handler, o, "scan")
                for o in _closed(body, [*consts, *carry, *x_vals], handler, local, scope)
            ]
        return (outs[:num_carry], i + 1), (outs[num_carry:], local.values)

    (carry, _), (ys, emitted) = lax.scan(
        step, (init, jnp.int32(0)), xs_in, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    # a weight every iteration reads whole (a scan constant: fori_loop, nn.scan with
    # broadcast params) is one op: its per-iteration values pool as in a while_loop; a
    # stacked weight's slices are one op per layer, their values stay stacked
    sliced = {x.path for x, part in zip(xs, parts) if part is not None}
    shared = {x.path for x in consts if isinstance(x, WeightRef)} - sliced
    for k, vs in emitted.items():
        for v in vs:
            pooled = handler.pool_iterations(k, v) if k in shared else None
            emit(k, v if pooled is None else pooled)
    return [*carry, *ys]


def _no_emit(what):
    def forbid(key, value):
        raise ValueError(
            f"op {key!r} inside {what} emits values (e.g. calibration statistics); that is not "
            f"supported inside {what}: move the op out of it or calibrate a version without it"
        )

    return forbid


def _cond(eqn, invals, handler, emit, scope):
    index, *ops = invals
    branches = eqn.params["branches"]

    def run_branch(sub):
        local = _Emitter()
        outs = [_value(handler, o, "cond") for o in _closed(sub, ops, handler, local, scope)]
        return outs, local.values

    # Emitted values must have one structure across branches: find the union first (an
    # abstract pass), then fill what a branch does not emit with NaN ("not executed").
    union: dict = {}
    for sub in branches:
        union.update(jax.eval_shape(lambda sub=sub: run_branch(sub)[1]))

    def branch(sub):
        def fn():
            outs, values = run_branch(sub)
            filled = {
                k: values[k]
                if k in values
                else jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), shape)
                for k, shape in union.items()
            }
            return outs, filled

        return fn

    outs, emitted = lax.switch(index, [branch(sub) for sub in branches])
    for k, vs in emitted.items():
        for v in vs:
            emit(k, v)
    return outs


def _while(eqn, invals, handler, emit, scope):
    p = eqn.params
    cond_consts, body_consts, init = _split(invals, p["cond_nconsts"], p["body_nconsts"])
    init = [_value(handler, x, "while") for x in init]

    def cond(carry):
        return _closed(
            p["cond_jaxpr"], [*cond_consts, *carry], handler, _no_emit("lax.while_loop's condition"), scope
        )[0]

    def body_values(carry, i):
        local = _Emitter()
        with handler.iteration(i):  # i counts the iterations: the handler's randomness folds it in
            body = _closed(p["body_jaxpr"], [*body_consts, *carry], handler, local, scope)
        outs = [_value(handler, o, "while") for o in body]
        return outs, local.values

    # what the body emits (an abstract pass): nothing -> the loop as it was
    emitted = jax.eval_shape(body_values, init, jnp.int32(0))[1]
    if not emitted:
        step = lambda state: (body_values(*state)[0], state[1] + 1)
        return lax.while_loop(lambda state: cond(state[0]), step, (init, jnp.int32(0)))[0]
    how = {}
    for key in emitted:
        how[key] = handler.loop_reduction(key)
        if how[key] not in ("min_max", "mean"):
            _no_emit("lax.while_loop")(key, None)
    # the reductions ride in the carry: running min / max (NaN: nothing seen yet), or sums
    # and counts of the non-NaN values
    acc0 = {k: [loop_pooling.acc_init(how[k], v) for v in vs] for k, vs in emitted.items()}

    def body(state):
        carry, i, acc = state
        outs, values = body_values(carry, i)
        acc = {k: [loop_pooling.acc_step(how[k], a, v) for a, v in zip(acc[k], values[k])] for k in acc}
        return outs, i + 1, acc

    carry, _, acc = lax.while_loop(lambda state: cond(state[0]), body, (init, jnp.int32(0), acc0))
    for k, accs in acc.items():
        for a in accs:
            emit(k, loop_pooling.acc_result(how[k], a))
    return carry


def _remat(eqn, invals, handler, emit, scope):
    p = eqn.params
    is_ref = [isinstance(x, WeightRef) for x in invals]
    plain = [x for x, r in zip(invals, is_ref) if not r]

    def fn(*plain_args):
        it = iter(plain_args)
        args = [x if r else next(it) for x, r in zip(invals, is_ref)]
        local = _Emitter()
        outs = evaluate(p["jaxpr"], [], args, handler, local, scope)
        return [_value(handler, o, "checkpoint") for o in outs], local.values

    outs, emitted = jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*plain)
    for k, vs in emitted.items():
        for v in vs:
            emit(k, v)
    return outs


def _shard_map(eqn, invals, handler, emit, scope):
    from qjax.graph.sharding import shard_map_rule  # sharding details live apart

    inner = functools.partial(evaluate, scope=scope)
    return shard_map_rule(eqn, invals, handler, emit, inner, WeightRef, _Emitter)


_RULES: dict[str, Callable] = {
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "custom_jvp_call": _custom_derivative("call_jaxpr"),
    "custom_vjp_call": _custom_derivative("call_jaxpr"),
    "custom_vjp_call_jaxpr": _custom_derivative("fun_jaxpr"),
    "scan": _scan,
    "cond": _cond,
    "while": _while,
    "remat2": _remat,
    "checkpoint": _remat,
    "shard_map": _shard_map,
}


def run(traced, handler: Handler, params_leaves, args_leaves) -> tuple[list, dict]:
    """Evaluate a :class:`qjax.graph.trace.Traced` with params as ``WeightRef``s.

    Returns:
      ``(outputs, emitted)``: the flat outputs and, by key, the list of values handlers
      emitted (stacked along a leading axis for ops inside a ``scan``).
    """
    refs = [
        WeightRef(path, leaf, aux=handler.aux(path)) for path, leaf in zip(traced.param_paths, params_leaves)
    ]
    emitter = _Emitter()
    closed = traced.jaxpr
    outs = evaluate(closed.jaxpr, closed.consts, [*refs, *args_leaves], handler, emitter)
    return [_value(handler, o, "the function's output") for o in outs], emitter.values
