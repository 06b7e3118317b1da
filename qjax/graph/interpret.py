"""Re-evaluating a jaxpr with the ops that read params replaced.

:func:`evaluate` walks a jaxpr equation by equation. Params leaves enter as
:class:`WeightRef`s: symbolic values that remember the leaf path, the stored leaf
(a ``QArray`` or a float array) and the layout ops applied since. Layout ops on a
``WeightRef`` extend it; a ``dot_general`` or ``conv_general_dilated`` that reads one is
handed to the :class:`Handler`; any other consumer gets the value
:meth:`Handler.materialize` gives (the float weight by default; the quantizing handlers
give the quantized one, so an embedding lookup reads what deployment stores).
Higher-order primitives are entered only when a ``WeightRef`` flows into them (otherwise
they are bound unchanged, custom derivative rules and all):

* ``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``: the body is evaluated inline
  (the ops inside it get the handler's derivative rules instead of the custom ones);
* ``scan``: rebuilt with ``lax.scan``; a stacked param fed as ``xs`` is sliced per
  iteration (a stacked ``QArray`` slices with its per-layer scales), so every iteration
  is the same op, identified by the stacked leaf's path;
* ``cond``, ``while``: rebuilt with ``lax.switch`` / ``lax.while_loop``, weights closed
  over; a value a ``cond`` branch did not emit is NaN (not executed); values emitted in a
  ``while`` body (a data-dependent number of iterations) are reduced over the iterations
  in the loop's carry as the handler's :meth:`Handler.loop_reduction` says, else an error;
* ``remat``/``checkpoint``: rebuilt with ``jax.checkpoint`` (same policy);
* ``shard_map``: rebuilt with ``jax.shard_map``; a ``QArray`` weight is passed in with
  scale specs derived from the weight's spec.

Handlers may ``emit`` values (e.g. calibration statistics) keyed by path; inside a
``scan`` they are stacked per iteration; inside a ``shard_map`` (handlers with
``per_shard_emits`` only) each shard's value is a separate read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from qjax.graph import loop_pooling
from qjax.graph._primitives import scan_counts
from qjax.graph.layout import LAYOUT_PRIMITIVES, leading_slice
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray, is_quantized

TARGET_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})


@dataclasses.dataclass(frozen=True)
class LayoutOp:
    """One layout equation applied to a weight: primitive, params, extra operands."""

    primitive: Any
    params: dict
    operands: tuple = ()

    def apply(self, x):
        return self.primitive.bind(x, *self.operands, **self.params)


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """A params leaf (or a layout view of it) flowing through the jaxpr.

    Attributes:
      path: the leaf's path (the op identity of everything that reads it).
      leaf: the stored leaf: a ``QArray``, a ``TransposedQArray`` or a float array (a
        per-iteration slice inside a ``scan`` over stacked params). A ``TransposedQArray``
        stands for its logical layout (:meth:`float_leaf`, specs); handlers that read codes
        unwrap it themselves.
      ops: layout ops applied since the leaf, in order.
      depth: how many leading axes of the params leaf enclosing ``scan``s sliced off
        (a spec written for the stacked leaf is adapted with :func:`spec_for_slice`).
      aux: an array the handler keeps with the leaf (:meth:`Handler.aux`, e.g. a learned
        LSQ scale); a ``scan`` over the stacked leaf slices it too (a leading axis of
        size 1 is shared by every slice).
      aux_shared: how many slices share this ``aux`` (the product of the lengths of the
        enclosing scans that did not slice it).
      shard_axes: inside a ``shard_map`` body, the manual mesh axes that split each axis
        of ``leaf`` (its logical layout; ``()`` for a whole axis): the leaf is a shard.
        Empty outside ``shard_map``.
    """

    path: str
    leaf: Any
    ops: tuple[LayoutOp, ...] = ()
    depth: int = 0  # leading (stacked) axes of the params leaf sliced off by enclosing scans
    aux: Any = None
    aux_shared: int = 1
    shard_axes: tuple[tuple[str, ...], ...] = ()

    def float_leaf(self):
        return self.leaf.dequantize() if is_quantized(self.leaf) else self.leaf


def spec_for_slice(spec, depth: int):
    """A weight spec written for a stacked params leaf, adapted to one ``scan`` slice of
    it (``depth`` leading axes removed): non-negative axes shift down, axes that named a
    stacked dim are dropped (each slice gets its own scales there), negative axes stay.

    Raises:
      ValueError: the spec's group axis is a stacked dim.
    """
    if depth == 0 or spec is None:
        return spec
    from qjax.numerics.spec import PER_TOKEN

    def shift(a):
        return a if a < 0 else a - depth

    changes = {}
    if spec.channel_axes is not PER_TOKEN:
        changes["channel_axes"] = tuple(shift(a) for a in spec.channel_axes if a < 0 or a >= depth)
    if spec.group_axis is not None:
        if 0 <= spec.group_axis < depth:
            raise ValueError(f"group_axis={spec.group_axis} is a stacked (scanned) axis of the leaf")
        changes["group_axis"] = shift(spec.group_axis)
    if spec.pack_axis >= 0:
        changes["pack_axis"] = max(spec.pack_axis - depth, 0)
    return spec.replace(**changes)


def weight_operand(invals) -> int | None:
    """Index of the single ``WeightRef`` among a binary target op's first two operands
    (``None`` if both or neither are weights)."""
    refs = [i for i in (0, 1) if isinstance(invals[i], WeightRef)]
    return refs[0] if len(refs) == 1 else None


def materialize(value):
    """The float value of a ``WeightRef`` (dequantized, layout ops replayed); other
    values are returned as they are."""
    if not isinstance(value, WeightRef):
        return value
    x = value.float_leaf()
    for op in value.ops:
        x = op.apply(x)
    return x


class Handler:
    """Decides what a target op that reads a weight becomes.

    Subclasses override :meth:`target`; returning ``None`` evaluates the op on float
    values (weights materialized).

    Attributes:
      per_shard_emits: whether the values this handler emits may be computed per shard
        inside a ``shard_map`` body: each shard's value is then emitted as a separate
        read of the op (as if the op ran once per shard). True only for statistics whose
        reads combine by min / max / mean over per-tensor values (e.g. calibration
        ranges), which a shard of the data measures as well as a batch does; per-feature
        statistics of a sharded weight would mix different features. ``False`` (default):
        emitting inside a ``shard_map`` raises.
    """

    per_shard_emits: bool = False

    def loop_reduction(self, key: str) -> str | None:
        """How the values emitted under ``key`` inside a ``while_loop`` body (a data-dependent
        number of iterations, so they cannot be stacked) combine over the iterations:
        ``"min_max"`` (a ``(lo, hi)`` pair: elementwise minimum of ``lo``, maximum of
        ``hi``) or ``"mean"`` (every leaf averaged), NaN values ignored in both (an untaken
        ``cond`` branch); the combination is emitted once, after the loop. ``None``
        (default): emitting inside a ``while_loop`` raises."""
        return None

    def pool_iterations(self, key: str, stacked: Any) -> Any | None:
        """One value for the values emitted under ``key`` by an op of a ``scan`` body that
        reads one weight in every iteration (a scan constant: ``fori_loop``, broadcast
        params), given stacked along a leading iteration axis; ``None`` keeps them stacked.
        Default: as :meth:`loop_reduction` pools a ``while_loop``'s."""
        how = self.loop_reduction(key)
        return None if how not in ("min_max", "mean") else loop_pooling.pool_iterations(how, stacked)

    def target(self, eqn, invals: list, emit: Callable[[str, Any], None]) -> list | None:
        return None

    def materialize(self, ref: WeightRef):
        """The value an op that is not a target reads from a weight (a gather of an
        embedding, an elementwise op, an output): the float weight by default; handlers
        that quantize override it, so such an op sees the value deployment stores."""
        return materialize(ref)

    def aux(self, path: str) -> Any:
        """An array to keep with the params leaf at ``path`` (``WeightRef.aux``), sliced
        with it by ``scan``s over a stacked leaf; ``None`` by default."""
        return None


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


def _value(handler: Handler, x):
    """``x``, or for a ``WeightRef`` the value the handler gives a non-target consumer."""
    return handler.materialize(x) if isinstance(x, WeightRef) else x


def _has_ref(values) -> bool:
    return any(isinstance(v, WeightRef) for v in values)


def evaluate(jaxpr, consts, args, handler: Handler, emit: Callable[[str, Any], None]) -> list:
    """Evaluate an (open) ``jaxpr`` on ``consts`` and ``args`` (values or ``WeightRef``s)."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = _eval_eqn(eqn, invals, handler, emit) if _has_ref(invals) else bind_eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, handler, emit):
    name = eqn.primitive.name
    if name in TARGET_PRIMITIVES:
        out = handler.target(eqn, invals, emit)
        return out if out is not None else bind_eqn(eqn, [_value(handler, x) for x in invals])
    if name in LAYOUT_PRIMITIVES and isinstance(invals[0], WeightRef) and not _has_ref(invals[1:]):
        ref = invals[0]
        params = dict(eqn.params)
        op = LayoutOp(eqn.primitive, params, tuple(invals[1:]))
        return [dataclasses.replace(ref, ops=(*ref.ops, op))]
    if name == "split" and isinstance(invals[0], WeightRef):
        return _split_weight(eqn, invals[0])
    rule = _RULES.get(name)
    if rule is not None:
        return rule(eqn, invals, handler, emit)
    return bind_eqn(eqn, [_value(handler, x) for x in invals])


def _split_weight(eqn, ref: WeightRef) -> list[WeightRef]:
    """``jnp.split`` of a weight (a fused QKV projection): one ``slice`` layout op per
    part, so each part reaches its matmul as a view of the leaf, as ``w[:, a:b]`` does."""
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    shape = eqn.invars[0].aval.shape
    outs, start = [], 0
    for size in sizes:
        begin = [0] * len(shape)
        end = list(shape)
        begin[axis], end[axis] = start, start + size
        params = {"start_indices": tuple(begin), "limit_indices": tuple(end), "strides": None}
        op = LayoutOp(lax.slice_p, params)
        outs.append(dataclasses.replace(ref, ops=(*ref.ops, op)))
        start += size
    return outs


def _closed(sub, args, handler, emit):
    return evaluate(sub.jaxpr, sub.consts, args, handler, emit)


def _inline(key):
    def rule(eqn, invals, handler, emit):
        return [_value(handler, x) for x in _closed(eqn.params[key], invals, handler, emit)]

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
    (a scale shared by every layer) or none are the same in every iteration.

    Returns:
      ``(sliced arrays, rebuild)``; ``rebuild(slices)`` gives the iteration's ``WeightRef``.

    Raises:
      ValueError: an array with any other leading size (names the leaf).
    """
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
    aux_shared = aux_leaves > 0 and not any(per_layer[-aux_leaves:])

    def rebuild(slices) -> WeightRef:
        it = iter(slices)
        vals = [next(it) if p else (a[0] if jnp.ndim(a) else a) for a, p in zip(leaves, per_layer)]
        leaf, aux = jax.tree.unflatten(treedef, vals)
        if isinstance(leaf, QArray):
            leaf = leading_slice(leaf)
        elif isinstance(leaf, TransposedQArray):  # leading axes are the same stored and logical
            leaf = TransposedQArray.tree_unflatten(None, [leading_slice(leaf.stored)])
        shared = ref.aux_shared * (length if aux_shared else 1)
        return WeightRef(ref.path, leaf, (), ref.depth + 1, aux, shared, ref.shard_axes[1:])

    return [a for a, p in zip(leaves, per_layer) if p], rebuild


def _scan(eqn, invals, handler, emit):
    p = eqn.params
    num_consts, num_carry = scan_counts(p)
    consts, init, xs = _split(invals, num_consts, num_carry)
    init = [_value(handler, x) for x in init]
    # A direct params leaf fed as xs is scanned as its stored form (QArray and
    # TransposedQArray slices too), its aux beside it; parts shared by every layer are not sliced.
    parts = [_scan_parts(x, p["length"]) if isinstance(x, WeightRef) and not x.ops else None for x in xs]
    xs_in = [_value(handler, x) if part is None else part[0] for x, part in zip(xs, parts)]
    body = p["jaxpr"]

    def step(carry, x_slices):
        local = _Emitter()
        x_vals = [x if part is None else part[1](x) for part, x in zip(parts, x_slices)]
        outs = [_value(handler, o) for o in _closed(body, [*consts, *carry, *x_vals], handler, local)]
        return outs[:num_carry], (outs[num_carry:], local.values)

    carry, (ys, emitted) = lax.scan(
        step, init, xs_in, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
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


def _cond(eqn, invals, handler, emit):
    index, *ops = invals
    branches = eqn.params["branches"]

    def run_branch(sub):
        local = _Emitter()
        outs = [_value(handler, o) for o in _closed(sub, ops, handler, local)]
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


def _while(eqn, invals, handler, emit):
    p = eqn.params
    cond_consts, body_consts, init = _split(invals, p["cond_nconsts"], p["body_nconsts"])
    init = [_value(handler, x) for x in init]

    def cond(carry):
        return _closed(
            p["cond_jaxpr"], [*cond_consts, *carry], handler, _no_emit("lax.while_loop's condition")
        )[0]

    def body_values(carry):
        local = _Emitter()
        outs = [_value(handler, o) for o in _closed(p["body_jaxpr"], [*body_consts, *carry], handler, local)]
        return outs, local.values

    # what the body emits (an abstract pass): nothing -> the loop as it was
    emitted = jax.eval_shape(body_values, init)[1]
    if not emitted:
        return lax.while_loop(cond, lambda carry: body_values(carry)[0], init)
    how = {}
    for key in emitted:
        how[key] = handler.loop_reduction(key)
        if how[key] not in ("min_max", "mean"):
            _no_emit("lax.while_loop")(key, None)
    # the reductions ride in the carry: running min / max (NaN: nothing seen yet), or sums
    # and counts of the non-NaN values
    acc0 = {k: [loop_pooling.acc_init(how[k], v) for v in vs] for k, vs in emitted.items()}

    def body(state):
        carry, acc = state
        outs, values = body_values(carry)
        acc = {k: [loop_pooling.acc_step(how[k], a, v) for a, v in zip(acc[k], values[k])] for k in acc}
        return outs, acc

    carry, acc = lax.while_loop(lambda state: cond(state[0]), body, (init, acc0))
    for k, accs in acc.items():
        for a in accs:
            emit(k, loop_pooling.acc_result(how[k], a))
    return carry


def _remat(eqn, invals, handler, emit):
    p = eqn.params
    is_ref = [isinstance(x, WeightRef) for x in invals]
    plain = [x for x, r in zip(invals, is_ref) if not r]

    def fn(*plain_args):
        it = iter(plain_args)
        args = [x if r else next(it) for x, r in zip(invals, is_ref)]
        local = _Emitter()
        outs = evaluate(p["jaxpr"], [], args, handler, local)
        return [_value(handler, o) for o in outs], local.values

    outs, emitted = jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*plain)
    for k, vs in emitted.items():
        for v in vs:
            emit(k, v)
    return outs


def _shard_map(eqn, invals, handler, emit):
    from qjax.graph.sharding import shard_map_rule  # sharding details live apart

    return shard_map_rule(eqn, invals, handler, emit, evaluate, WeightRef, _Emitter)


_RULES: dict[str, Callable] = {
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "custom_jvp_call": _inline("call_jaxpr"),
    "custom_vjp_call": _inline("call_jaxpr"),
    "custom_vjp_call_jaxpr": _inline("fun_jaxpr"),
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
    return [_value(handler, o) for o in outs], emitter.values
