"""Calibrated ranges of the intermediate values of :func:`qjax.integer_only`.

Integer-only inference bounds every value statically (from the weights' codes and the
activations' formats). Those bounds are exact but loose, and products compound them: a
LayerNorm's output ``(x - mean) · rsqrt(var + eps)`` is bounded by ``1 / √eps`` times the
loose bound of ``x - mean``, so a second norm's ``x²`` over that range keeps no bits of the
real values. I-BERT and TFLite measure every tensor's range on calibration data instead,
and saturate beyond it. Here, with ``integer_only(..., calibration=batches)``, the
function's program is run in float (weights dequantized) on the batches, and the largest
``|value|`` of every equation's output is recorded by its position in the walk; the
integer program then clips a value to ``margin`` times that range where its static bound
would cost precision: before an element-wise function is evaluated on it and before it
enters a product.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qjax.graph.interpret import bind_eqn
from qjax.graph.trace import trace
from qjax.quant import integer_scan


def walk_positions(jaxpr, inline: dict):
    """The equations of ``jaxpr`` in the order :func:`qjax.integer_only` walks them,
    bodies of the ``inline`` primitives (name → param of their jaxpr) entered in place, a
    ``scan``'s body once per iteration (:mod:`qjax.quant.integer_scan`)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name in inline:
            sub = eqn.params[inline[eqn.primitive.name]]
            yield from walk_positions(sub.jaxpr if hasattr(sub, "consts") else sub, inline)
        elif eqn.primitive.name == "scan":  # unrolled: the body once per iteration
            for _ in range(eqn.params["length"]):
                yield from walk_positions(eqn.params["jaxpr"].jaxpr, inline)


def _record(jaxpr, consts, args, inline: dict, out: list) -> list:
    """Evaluate ``jaxpr`` in float, appending each equation's outputs' ``max |value|``
    (``-1`` for non-float outputs) to ``out`` in walk order."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        slot = len(out)
        out.append(None)
        name = eqn.primitive.name
        if name in inline:
            sub = eqn.params[inline[name]]
            inner, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
            outs = _record(inner, sub_consts, invals, inline, out)
        elif name == "scan":
            outs = integer_scan.unrolled(
                eqn,
                invals,
                lambda body, body_consts, args: _record(body, body_consts, args, inline, out),
                lambda x, i: x[i],
                jnp.stack,
                lambda aval: jnp.zeros(aval.shape, aval.dtype),
            )
        else:
            outs = bind_eqn(eqn, invals)
        out[slot] = [_absmax(o) for o in outs]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _absmax(x):
    """``max |x|`` of a float array (float32), ``-1`` for anything else."""
    if jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.size(x):
        return jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.float32(-1)


@dataclasses.dataclass(frozen=True)
class Ranges:
    """``values[i]``: per output of the ``i``-th equation in walk order (``i = 0``: the
    flattened arguments), the largest ``|value|`` measured; ``names[i]``: its primitive,
    which the integer walk checks it meets at the same position."""

    names: tuple[str, ...]
    values: list[list[float]]


def calibrated_ranges(f, qparams, batches, inline: dict, kwargs: dict) -> Ranges:
    """The :class:`Ranges` of ``f``'s program run in float over ``batches`` with the
    quantized weights dequantized.

    Raises:
      ValueError: no batches, or batches whose programs differ.
    """
    from qjax.numerics.qarray import QArray
    from qjax.numerics.transposed import TransposedQArray

    found: list | None = None
    names: tuple | None = None
    programs: dict = {}
    count = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        flat = jax.tree.leaves(args)
        key = (jax.tree.structure(args), tuple((jnp.shape(a), jnp.result_type(a)) for a in flat))
        if key not in programs:  # one trace and one compile per argument shape, not per batch
            traced = trace(f, qparams, *args, **kwargs)
            leaves = [
                leaf.dequantize() if isinstance(leaf, (QArray, TransposedQArray)) else leaf
                for leaf in traced.param_leaves
            ]
            closed = traced.jaxpr

            def run(leaves, flat, closed=closed):
                # the arguments' ranges first (the walk's position -1), then each equation's
                out: list = [[_absmax(a) for a in flat]]
                _record(closed.jaxpr, closed.consts, [*leaves, *flat], inline, out)
                return out

            programs[key] = (jax.jit(run), leaves, closed)
        run_jit, leaves, closed = programs[key]
        values = jax.device_get(run_jit(leaves, flat))
        values = [[float(v) for v in outs] for outs in values]
        batch_names = ("<arguments>", *(e.primitive.name for e in walk_positions(closed.jaxpr, inline)))
        if names is not None and batch_names != names:
            raise ValueError("integer_only: calibration batches give different programs")
        names = batch_names
        found = (
            values if found is None else [[max(a, b) for a, b in zip(x, y)] for x, y in zip(found, values)]
        )
        count += 1
    if not count:
        raise ValueError("integer_only: calibration= holds no batch")
    return Ranges(names, found)


def clip_to_range(x, margin: float, where: str, what: str):
    """``x`` (an :class:`~qjax.quant.integer_values.IntValue`) clipped to ``margin`` times
    its calibrated range where that is below its static bound.

    Raises:
      ValueError: ``x``'s bound compounds a product's and no range was calibrated for it.
    """
    if x.real_bound is None:
        if x.loose:
            raise ValueError(
                f"integer_only: at {where}, {what} reads a value whose static range compounds a "
                "product's (a normalisation's output, say), which would leave it no precision: give "
                "integer_only(..., calibration=[(x,), ...]) so its range is measured"
            )
        return x
    reach = np.ceil(margin * x.real_bound / np.asarray(x.scale, np.float64))
    if np.all(reach >= x.bound):
        return x
    reach = np.minimum(reach, x.bound)
    r = jnp.asarray(reach.astype(np.int32))
    data = jnp.clip(x.data, -r, r)
    if x.sign > 0:
        data = jnp.maximum(data, 0)
    return dataclasses.replace(x, data=data, bound=float(reach.max()))
