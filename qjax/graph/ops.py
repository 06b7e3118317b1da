"""What the graph layer knows about a target op: which operand a weight is, and the
axes of the other operand (activation) that a per-token scale runs over."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qjax.graph.interpret import Handler, WeightRef, run
from qjax.graph.trace import trace
from qjax.graph.weight_ref import ragged_weight


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One matmul/conv that reads a params leaf.

    Attributes:
      path: the params leaf path (the op's identity).
      primitive: ``"dot_general"`` or ``"conv_general_dilated"`` (or
        ``"ragged_dot_general"``, listed by ``weight_ops(..., ragged=True)``).
      weight_operand: 0 (lhs) or 1 (rhs).
      weight_shape: the weight operand's shape as the op sees it (after layout ops).
      activation_shape: the other operand's shape (``None`` if it is also a weight).
      params: the equation's params (dimension numbers etc.).
      count: how many times the op runs per call of the function: every read of the
        weight by an identical op (a layer applied twice), times the lengths of the
        enclosing ``scan``s (a stacked leaf's layers, an RNN cell's steps, a static
        ``fori_loop``), times the shards of an enclosing ``shard_map``. An op in a
        ``cond`` branch counts as if its branch ran (an op in several branches, once);
        an op in a ``while_loop`` body (a data-dependent trip count) counts once per
        run of the loop.
    """

    path: str
    primitive: str
    weight_operand: int
    weight_shape: tuple[int, ...]
    activation_shape: tuple[int, ...] | None
    params: dict[str, Any]
    count: int = 1


def _key(op: OpInfo) -> str:
    return repr((op.path, op.primitive, op.weight_operand, op.weight_shape, op.activation_shape, op.params))


class _Recorder(Handler):
    """Records every op it sees and emits a marker per read: the interpreter stacks it
    over enclosing ``scan`` iterations (and shards), so its shape counts the executions."""

    per_shard_emits = True

    def __init__(self):
        self.ops: list[OpInfo] = []

    def loop_reduction(self, key):
        return "mean"  # a while_loop body's op: one marker per run of the loop

    def pool_iterations(self, key, stacked):
        return None  # keep a scan's markers stacked: one per iteration

    def target(self, eqn, invals, emit):
        for i, x in enumerate(invals[:2]):
            if isinstance(x, WeightRef):
                self._record(eqn, invals, i, emit)
        return None

    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot`` reading an expert weight (standard dimension numbers)."""
        if ragged_weight(eqn, invals) is not None:
            self._record(eqn, invals, 1, emit)
        return None

    def _record(self, eqn, invals, i: int, emit) -> None:
        other = invals[1 - i]
        op = OpInfo(
            invals[i].path,
            eqn.primitive.name,
            i,
            tuple(eqn.invars[i].aval.shape),
            None if isinstance(other, WeightRef) else tuple(eqn.invars[1 - i].aval.shape),
            dict(eqn.params),
        )
        self.ops.append(op)
        emit(_key(op), jnp.zeros((), jnp.float32))


def find_ops(f, params: Any, *args, **kwargs) -> list[OpInfo]:
    """Every ``dot_general``/``conv_general_dilated`` of ``f(params, *args, **kwargs)``
    that reads a params leaf (through layout ops, ``jit``, ``scan``, ``cond``, ``remat``,
    custom derivatives, ...), in evaluation order. Identical ops (same leaf, shapes and
    params: a layer applied twice, an op of a ``scan`` body) are listed once, with the
    number of times they run in :attr:`OpInfo.count`.

    Example:
      >>> [op.path for op in qjax.graph.find_ops(model.apply, variables, x)]
      ['params/Dense_0/kernel', 'params/Dense_1/kernel']
    """
    return weight_ops(f, params, args, kwargs)


def weight_ops(f, params: Any, args: tuple, kwargs: dict, ragged: bool = False) -> list[OpInfo]:
    """:func:`find_ops`, with ``ragged``: also every ``lax.ragged_dot`` reading an expert
    weight ``(G, K, N)`` (standard dimension numbers)."""
    traced = trace(f, params, *args, **kwargs)
    recorder = _Recorder()
    # Abstract evaluation: the recorder sees every op at trace time, nothing is computed.
    markers = jax.eval_shape(
        lambda p, a: run(traced, recorder, p, a)[1], list(traced.param_leaves), jax.tree.leaves(args)
    )
    # cond and while bodies are traced more than once (an abstract pass finds what they
    # emit): the recorder sees repeats; the markers that reach the top count executions.
    seen, ops = set(), []
    for op in recorder.ops:
        key = _key(op)
        if op.primitive == "ragged_dot_general" and not ragged:
            continue
        if key not in seen:
            seen.add(key)
            count = sum(math.prod(m.shape) for m in markers.get(key, ()))
            ops.append(dataclasses.replace(op, count=max(count, 1)))
    return ops


def operand_channel_axes(primitive: str, params: dict[str, Any], operand: int, ndim: int) -> tuple[int, ...]:
    """Axes of an operand that are not contracted (``PER_TOKEN`` scale axes).

    ``dot_general``: every non-contracting dimension of that operand (batch dims
    included). ``conv_general_dilated``: the batch dimension of the input.
    """
    if primitive == "dot_general":
        (lc, rc), _ = params["dimension_numbers"]
        contracting = set(lc if operand == 0 else rc)
        return tuple(a for a in range(ndim) if a not in contracting)
    dn = params["dimension_numbers"]
    if not isinstance(dn, lax.ConvDimensionNumbers):
        dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dn)
    return (dn.lhs_spec[0],) if operand == 0 else (dn.rhs_spec[0],)
