"""Integer values with a static scale, and the ops of :func:`qjax.integer_only` on them.

An :class:`IntValue` is an int32 array ``data`` standing for ``data · scale``, where
``scale`` is a concrete float64 array of the same rank (size 1 along the axes it is
constant on) and ``bound`` a concrete upper bound of ``|data|``. Every op here keeps the
bound below ``2^31``: where a sum or an added constant could pass it, the value is first
moved to a coarser scale (``scale · 2^k``, a dyadic rescale), so int32 never wraps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.interpret import bind_eqn
from qjax.quant.dyadic import dyadic, dyadic_mul

LIMIT = 2.0**31 - 2**20  # the largest bound kept (headroom for rounding)
NOOP = ("convert_element_type", "copy", "copy_p", "optimization_barrier", "reduce_precision", "stop_gradient")
_REDUCE = ("reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin")
_WINDOW = ("reduce_window_sum", "reduce_window_max", "reduce_window_min")
_LAYOUT = ("reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "rev")
SUPPORTED = (
    "dot_general, conv_general_dilated (quantized weights), add, sub, mul / div by a static "
    "factor, neg, max / min (ReLU), reshape, transpose, broadcast_in_dim, squeeze, slice, rev, "
    "pad, concatenate, reduce_sum / max / min, argmax / argmin, reduce_window_sum / max / min"
)


@dataclasses.dataclass(frozen=True)
class IntValue:
    """``data`` (int32) standing for ``data · scale``; ``|data| ≤ bound``."""

    data: jax.Array
    scale: np.ndarray
    bound: float


def compress(scale: np.ndarray) -> np.ndarray:
    """``scale`` with every axis it is constant along reduced to size 1."""
    for ax in range(scale.ndim):
        if scale.shape[ax] > 1:
            first = np.take(scale, [0], axis=ax)
            if np.all(scale == first):
                scale = first
    return scale


def align(a: IntValue, scale: np.ndarray) -> IntValue:
    """``a`` at a coarser or equal ``scale`` (broadcastable): ``round(q · S_a / scale)``."""
    shape = np.broadcast_shapes(a.scale.shape, scale.shape)
    ratio = compress(np.broadcast_to(a.scale, shape) / np.broadcast_to(scale, shape))
    scale = compress(np.broadcast_to(scale, shape).copy())
    if np.all(ratio == 1):
        return IntValue(a.data, scale, a.bound)
    b, c = dyadic(ratio)
    return IntValue(dyadic_mul(a.data, b, c), scale, a.bound * float(ratio.max()) + 1)


def coarsen(a: IntValue, growth: float) -> IntValue:
    """``a`` at ``scale · 2^k``, the smallest ``k ≥ 0`` for which ``bound · growth`` (what an
    op will make of the bound) stays below :data:`LIMIT`."""
    need = a.bound * growth / LIMIT
    if need <= 1:
        return a
    return align(a, a.scale * 2.0 ** math.ceil(math.log2(need) + 1e-9))


def _rank(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((1,) * (ndim - scale.ndim) + scale.shape)


def on_integers(eqn, invals, fail) -> list:
    """``eqn`` on integer values (at least one of ``invals`` an :class:`IntValue`, the others
    static arrays); ``fail(why)`` builds the error for an op with no integer form."""
    name = eqn.primitive.name
    if name in NOOP:
        if jnp.issubdtype(eqn.params.get("new_dtype", jnp.float32), jnp.integer):
            raise fail("casts an integer value's real number to an integer type")
        return list(invals) if name == "optimization_barrier" else [invals[0]]
    if name == "neg":
        a = invals[0]
        return [IntValue(-a.data, a.scale, a.bound)]
    if name in ("add", "sub", "max", "min"):
        return [_binary(eqn, invals, fail)]
    if name in ("mul", "div"):
        return [_scaled(eqn, invals, fail)]
    if name in _REDUCE or name in _WINDOW:
        return [_reduce(eqn, invals[0])]
    if name == "concatenate":
        return [_concatenate(eqn, invals)]
    if name == "pad":
        return [_pad(eqn, invals, fail)]
    if name in _LAYOUT:
        if sum(isinstance(x, IntValue) for x in invals) != 1 or not isinstance(invals[0], IntValue):
            raise fail("has integer shape operands")
        return [_layout(eqn, invals)]
    raise fail("has no integer form")


def _binary(eqn, invals, fail) -> IntValue:
    name = eqn.primitive.name
    x, y = invals
    if isinstance(x, IntValue) and isinstance(y, IntValue):
        scale = compress(np.maximum(_rank(x.scale, y.scale.ndim), _rank(y.scale, x.scale.ndim)))
        xa, ya = align(x, scale), align(y, scale)
        if name in ("add", "sub"):
            grow = (xa.bound + ya.bound) / max(xa.bound, ya.bound, 1.0)
            xa, ya = coarsen(xa, grow), coarsen(ya, grow)
            if not np.array_equal(xa.scale, ya.scale):  # coarsened differently: meet again
                scale = np.maximum(xa.scale, ya.scale)
                xa, ya = align(xa, scale), align(ya, scale)
            bound = xa.bound + ya.bound
        else:
            bound = max(xa.bound, ya.bound)
        return IntValue(bind_eqn(eqn, [xa.data, ya.data])[0], xa.scale, bound)
    int_first = isinstance(x, IntValue)
    a, other = (x, y) if int_first else (y, x)
    v = np.asarray(other, np.float64)
    if name in ("max", "min") and np.all(v == (-np.inf if name == "max" else np.inf)):
        return a  # max with -inf / min with +inf: the identity
    if not np.all(np.isfinite(v)):
        raise fail("meets an infinite constant (a softmax's -inf mask, say)")
    scale = _rank(a.scale, v.ndim)
    q = np.abs(np.round(v / scale))
    total = a.bound + q if name in ("add", "sub") else np.maximum(a.bound, q)
    if np.any(total > LIMIT):
        # the constant does not fit at this scale where it is large (a bias over a tiny
        # batch-norm factor): move those elements to a scale where both fit
        k = np.where(total > LIMIT, np.ceil(np.log2(np.maximum(total, 1) / LIMIT) + 1e-9), 0)
        a = align(a, compress(scale * np.exp2(k)))
        scale = _rank(a.scale, v.ndim)
        q = np.abs(np.round(v / scale))
        total = a.bound * np.exp2(-k) + 1 + q if name in ("add", "sub") else np.maximum(a.bound, q)
    const = jnp.asarray(compress(np.round(v / scale)).astype(np.int32))
    args = [a.data, const] if int_first else [const, a.data]
    bound = float(np.max(total)) if np.size(total) else a.bound
    return IntValue(bind_eqn(eqn, args)[0], _rank(a.scale, max(a.data.ndim, v.ndim)), bound)


def _scaled(eqn, invals, fail) -> IntValue:
    name = eqn.primitive.name
    x, y = invals
    if isinstance(x, IntValue) == isinstance(y, IntValue):
        raise fail("multiplies two integer values")
    if name == "div" and isinstance(y, IntValue):
        raise fail("divides by an integer value")
    a, other = (x, y) if isinstance(x, IntValue) else (y, x)
    c = np.asarray(other, np.float64)
    if name == "div":
        if np.any(c == 0):
            raise fail("divides by zero")
        c = 1.0 / c
    sign = np.sign(c).astype(np.int32)
    mag = np.where(c == 0, 1.0, np.abs(c))
    scale = compress(
        np.broadcast_to(_rank(a.scale, c.ndim), np.broadcast_shapes(_rank(a.scale, c.ndim).shape, mag.shape))
        * mag
    )
    data = a.data if np.all(sign == 1) else a.data * jnp.asarray(compress(sign))
    return IntValue(data, _rank(scale, data.ndim), a.bound)


def _uniform(a: IntValue, axes) -> IntValue:
    """``a`` rescaled so that its scale is constant along ``axes`` (their maximum)."""
    axes = tuple(d for d in axes if a.scale.shape[d] > 1)
    if not axes:
        return a
    return align(a, np.max(a.scale, axis=axes, keepdims=True))


def _reduce(eqn, a: IntValue) -> IntValue:
    name, p = eqn.primitive.name, eqn.params
    if name in _WINDOW:
        out_shape = eqn.outvars[0].aval.shape
        axes = [
            d
            for d, k in enumerate(p["window_dimensions"])
            if k > 1 or out_shape[d] != a.data.shape[d]  # pooled, strided or padded
        ]
        a = _uniform(a, axes)
        grow = math.prod(p["window_dimensions"]) if name == "reduce_window_sum" else 1
        a = coarsen(a, grow)
        return IntValue(bind_eqn(eqn, [a.data])[0], a.scale, a.bound * grow)
    axes = tuple(p["axes"])
    a = _uniform(a, axes)
    grow = math.prod(a.data.shape[d] for d in axes) if name == "reduce_sum" else 1
    a = coarsen(a, grow)
    out = bind_eqn(eqn, [a.data])[0]
    if name in ("argmax", "argmin"):
        return out  # indices: plain integers, no scale
    return IntValue(out, np.squeeze(a.scale, axis=axes), a.bound * grow)


def _layout(eqn, invals) -> IntValue:
    a: IntValue = invals[0]
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
        strides = p["strides"] or (1,) * s.ndim
        scale = s[
            tuple(
                slice(None) if s.shape[d] == 1 else slice(lo, hi, st)
                for d, (lo, hi, st) in enumerate(zip(p["start_indices"], p["limit_indices"], strides))
            )
        ]
    elif np.all(s == s.flat[0]):  # reshape of a value with one scale
        scale = np.full((1,) * data.ndim, s.flat[0])
    else:  # reshape: the scale at the full shape along the axes the reshape moves
        keep = 0  # leading axes the reshape leaves alone (the batch), where the scale is 1
        while keep < min(s.ndim, data.ndim) and a.data.shape[keep] == data.shape[keep] and s.shape[keep] == 1:
            keep += 1
        moved = np.broadcast_to(s, s.shape[:keep] + a.data.shape[keep:])
        scale = compress(moved.reshape(s.shape[:keep] + data.shape[keep:]))
    return IntValue(data, scale, a.bound)


def _concatenate(eqn, invals) -> IntValue:
    dim = eqn.params["dimension"]
    parts = [x if isinstance(x, IntValue) else _zeros(x) for x in invals]
    ndim = parts[0].data.ndim
    size = [max(x.scale.shape[d] for x in parts) for d in range(ndim)]
    scales = [
        np.broadcast_to(x.scale, [x.data.shape[d] if d == dim else size[d] for d in range(ndim)])
        for x in parts
    ]
    data = bind_eqn(eqn, [x.data for x in parts])[0]
    return IntValue(data, compress(np.concatenate(scales, axis=dim)), max(x.bound for x in parts))


def _zeros(x) -> IntValue:
    """A static block concatenated to integer values: exact zeros only (of any scale)."""
    v = np.asarray(x)
    if np.any(v != 0):
        raise ValueError("integer_only: a nonzero constant concatenated to an integer value")
    return IntValue(jnp.zeros(v.shape, jnp.int32), np.ones((1,) * v.ndim), 0.0)


def _pad(eqn, invals, fail) -> IntValue:
    a, value = invals
    if isinstance(value, IntValue) or np.asarray(value) != 0:
        raise fail("pads with a value other than 0")
    config = eqn.params["padding_config"]
    for d, (_, _, interior) in enumerate(config):
        if interior and a.scale.shape[d] > 1:
            raise fail("pads inside an axis its scale varies along")
    widths = [(0, 0) if a.scale.shape[d] == 1 else (lo, hi) for d, (lo, hi, _) in enumerate(config)]
    if any(lo < 0 or hi < 0 for lo, hi in widths):
        raise fail("crops an axis its scale varies along")
    data = bind_eqn(eqn, [a.data, jnp.zeros((), jnp.int32)])[0]
    return IntValue(data, np.pad(a.scale, widths, mode="edge"), a.bound)
