"""Scans in :func:`qjax.integer_only`: ``lax.scan``, Flax's ``nn.scan`` layer stacks,
``lax.map`` and ``fori_loop`` with static bounds, run unrolled.

An integer value carries a *static* scale and bound, and each layer of a stack has its own:
its weight's per-channel scales, its calibrated activation scale, the bounds its outputs
reach. One traced loop body cannot hold values whose scales differ per iteration, so the
integer program evaluates the body once per iteration, on that iteration's slices of the
scanned inputs (a stacked weight's codes *and* scales), carrying the values from one to
the next, and stacks the per-iteration outputs. The float calibration walk
(:mod:`qjax.quant.integer_ranges`) unrolls the same way, so both walks meet every
equation at the same position.

:func:`one_layer` follows ``w[i]`` of a stack the same way (a ``fori_loop`` over layers,
its counter static once unrolled).

The program grows with the number of iterations (a 6-layer stack is six layers' ops),
which is what integer hardware runs anyway; the compile time grows with it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph._primitives import scan_counts
from qjax.graph.layout import leading_slice
from qjax.numerics.qarray import QArray
from qjax.quant.integer_chains import Chain
from qjax.quant.integer_matmuls import FromWeight, Weight, static_value, view
from qjax.quant.integer_values import IntValue, stack_values


def unrolled(eqn, invals: list, run_body: Callable, take: Callable, stack: Callable, empty: Callable) -> list:
    """The outputs of the ``scan`` equation ``eqn`` on ``invals``, its body run once per
    iteration (in reverse order for ``reverse=True``).

    Args:
      eqn: a ``scan`` equation.
      invals: its inputs (consts, initial carry, scanned inputs).
      run_body: ``run_body(jaxpr, consts, args)`` evaluates the body's open jaxpr.
      take: ``take(x, i)``: iteration ``i``'s slice of the scanned input ``x``.
      stack: ``stack(values)``: one body output's per-iteration values stacked on axis 0.
      empty: ``empty(aval)``: a scanned output of a scan of length 0.

    Returns:
      The final carry, then the stacked outputs, as the equation's outputs.
    """
    p = eqn.params
    num_consts, num_carry = scan_counts(p)
    consts = invals[:num_consts]
    carry = list(invals[num_consts : num_consts + num_carry])
    xs = invals[num_consts + num_carry :]
    length, body = p["length"], p["jaxpr"]
    ys: list = [None] * length
    for i in range(length - 1, -1, -1) if p["reverse"] else range(length):
        outs = run_body(body.jaxpr, body.consts, [*consts, *carry, *(take(x, i) for x in xs)])
        carry, ys[i] = list(outs[:num_carry]), outs[num_carry:]
    scanned = eqn.outvars[num_carry:]
    if not length:
        return [*carry, *(empty(v.aval) for v in scanned)]
    return [*carry, *(stack([y[j] for y in ys]) for j in range(len(scanned)))]


def views_without_layer_axis(views: tuple) -> tuple[tuple, bool] | None:
    """A stacked weight's ``("transpose", perm)`` / ``("rev", dims)`` views with its layer
    axis (axis 0) dropped, and whether they reverse the layers (``w[::-1]``); ``None`` when
    a transpose moves the layer axis."""
    out, reversed_ = [], False
    for kind, arg in views:
        if kind == "transpose" and arg[0] != 0:
            return None
        if kind == "rev" and 0 in arg:
            reversed_ = not reversed_
        rest = arg[1:] if kind == "transpose" else tuple(a for a in arg if a != 0)
        out.append((kind, tuple(a - 1 for a in rest)))
    return tuple(out), reversed_


def layer_of(q: QArray, i: int, length: int, path: str, keep_axis: bool = False) -> QArray:
    """Layer ``i`` of a quantized weight stacked along axis 0 (``nn.scan`` params): its
    codes, and its scales, zero points and static activation scale where they are per
    layer (leading axis ``length``), else the shared ones. With ``keep_axis`` the layer
    keeps a leading axis of size 1 (``w[i:i + 1]``; ``w[i]`` is that squeezed).

    Raises:
      ValueError: a part with another leading size, or packed / grouped along axis 0
        (naming ``path``).
    """
    ndim = q.values.ndim
    if not ndim or q.values.shape[0] != length:
        raise ValueError(
            f"integer_only: leaf {path!r} is scanned {length} times but its codes have shape "
            f"{q.values.shape}: a scanned weight must be stacked along axis 0"
        )

    def cut(part, full_rank: bool):
        if part is None or not np.ndim(part):
            return part
        lead = np.shape(part)[0]
        if lead == length:
            return part[i : i + 1] if keep_axis and full_rank else part[i]
        if lead == 1 and full_rank:
            return part if keep_axis else part[0]
        if np.size(part) == 1 and not full_rank:
            return jnp.reshape(part, ())
        raise ValueError(
            f"integer_only: leaf {path!r} is scanned {length} times, but a part of it has shape "
            f"{np.shape(part)}: its leading axis must be {length} (one per layer) or 1 (shared)"
        )

    with jax.ensure_compile_time_eval():
        children = [
            q.values[i : i + 1] if keep_axis else q.values[i],
            cut(q.scale, True),
            cut(q.zero_point, True),
            cut(q.act_scale, False),
            cut(q.act_zero_point, False),
        ]
    if keep_axis:
        return q.replace_children(children)
    try:
        return leading_slice(q.replace_children(children))
    except ValueError as e:
        raise ValueError(f"integer_only: leaf {path!r}: {e}") from e


def one_layer(eqn, invals) -> Weight | None:
    """``w[i]`` of a stacked quantized weight ``w`` (rank 3 or more, not packed or grouped
    along its layer axis; a ``fori_loop`` over layers, its counter static once unrolled): a
    slice / dynamic slice of one index along axis 0 and the whole of every other axis keeps
    it a weight (that layer, axis kept), and squeezing that axis gives the layer; ``None``
    for anything else."""
    if not invals or not isinstance(invals[0], Weight):
        return None
    w, name, p = invals[0], eqn.primitive.name, eqn.params
    q, kept = w.q, views_without_layer_axis(w.views)
    stacked_on_0 = q.ndim >= 3 and all(a is None or a % q.ndim != 0 for a in (q.packed_axis, q.group_axis))
    if not stacked_on_0 or kept is None:
        return None
    shape = view(np.broadcast_to(np.int8(0), q.shape), w.views, np).shape  # as the op sees it
    if name == "squeeze":
        if tuple(p["dimensions"]) != (0,) or shape[0] != 1:
            return None
        return Weight(w.path, layer_of(q, 0, 1, w.path), kept[0])
    if name == "slice":
        start, sizes = (
            list(p["start_indices"]),
            [b - a for a, b in zip(p["start_indices"], p["limit_indices"])],
        )
        if any(st not in (None, 1) for st in p["strides"] or ()):
            return None
    elif name == "dynamic_slice" and not any(
        isinstance(x, (jax.core.Tracer, IntValue, Chain)) for x in invals[1:]
    ):
        sizes = list(p["slice_sizes"])
        start = [int(np.clip(int(np.asarray(v)), 0, n - k)) for v, n, k in zip(invals[1:], shape, sizes)]
    else:
        return None
    if sizes[0] != 1 or any(a != 0 or k != n for a, k, n in zip(start[1:], sizes[1:], shape[1:])):
        return None
    layer = shape[0] - 1 - start[0] if kept[1] else start[0]  # the stored layer of a reversed view
    return Weight(w.path, layer_of(q, layer, shape[0], w.path, keep_axis=True), w.views)


class ScannedValues:
    """The scan slices and stacks of the integer program (a mixin of
    :mod:`qjax.quant.integer_only`'s program: needs its ``value`` and ``input_value``)."""

    def _iteration_slice(self, x, i: int, length: int, where: str):
        """Iteration ``i``'s slice of a scanned input: a stacked quantized weight's layer
        (codes and per-layer scales), an integer value's row (with its scales), else
        ``x[i]``."""
        x = self.value(x, where)
        if isinstance(x, Weight):
            kept = views_without_layer_axis(x.views)
            if kept is None:
                raise ValueError(
                    f"integer_only: leaf {x.path!r} reaches the scan at {where} through a transpose "
                    "that moves its layer axis: a scanned weight is sliced along axis 0 as stored"
                )
            views, reversed_ = kept
            layer = length - 1 - i if reversed_ else i  # w[::-1]: the layers last to first
            return Weight(x.path, layer_of(x.q, layer, length, x.path), views)
        if isinstance(x, IntValue):
            scale = x.scale[i] if x.scale.shape[0] > 1 else x.scale[0]
            return IntValue(
                x.data[i], scale, x.bound, x.sign, real_bound=x.real_bound, loose=x.loose, bounded=x.bounded
            )
        if isinstance(x, jax.core.Tracer):
            return x[i]
        with jax.ensure_compile_time_eval():
            if isinstance(x, FromWeight):
                return FromWeight(x.value[i], x.path, x.via)
            return x[i]

    def _stacked(self, values: list, where: str):
        """One scan output's per-iteration values stacked along a new leading axis."""
        values = [self.value(v, where) for v in values]
        if any(isinstance(v, IntValue) for v in values):
            values = [self.input_value(v, where) if isinstance(v, jax.core.Tracer) else v for v in values]
            return stack_values([static_value(v) for v in values], 0)
        sources = [v for v in values if isinstance(v, (Weight, FromWeight))]
        if any(isinstance(v, jax.core.Tracer) for v in values):
            return jnp.stack([static_value(v) for v in values])
        with jax.ensure_compile_time_eval():
            out = jnp.stack([static_value(v) for v in values])
        return FromWeight(out, sources[0].path, "scan") if sources else out


__all__ = ["ScannedValues", "layer_of", "one_layer", "unrolled", "views_without_layer_axis"]
