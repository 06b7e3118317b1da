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
from qjax.quant.dyadic import fine_dyadic, fine_dyadic_mul
from qjax.quant.integer_arith import mul_shift, normalize

LIMIT = 2.0**31 - 2**20  # the largest bound kept (headroom for rounding)
NOOP = ("convert_element_type", "copy", "copy_p", "optimization_barrier", "reduce_precision", "stop_gradient")
_REDUCE = ("reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin")
_WINDOW = ("reduce_window_sum", "reduce_window_max", "reduce_window_min")
_LAYOUT = ("reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "rev")
SUPPORTED = (
    "dot_general, conv_general_dilated (quantized weights, or two activations an OpRule with static "
    "scales matches), add, sub, mul, div by a static factor or a normalising sum, neg, max / min, "
    "element-wise functions of one value (exp, tanh, erf, logistic, rsqrt, integer_pow, ...: GELU, "
    "SiLU, softmax, LayerNorm / RMSNorm), select_n on a mask, reshape, transpose, broadcast_in_dim, "
    "squeeze, slice, rev, pad, concatenate, stack, split, gather / dynamic_slice by static indices, "
    "reduce_sum / max / min, argmax / argmin, "
    "reduce_window_sum / max / min"
)
PRODUCT_BITS = 30  # a product of two values is shifted to stay below 2^PRODUCT_BITS
QUOTIENT_BITS = 24  # a normalisation's quotients: codes of 2^-QUOTIENT_BITS


@dataclasses.dataclass(frozen=True, eq=False)
class IntValue:
    """``data`` (int32) standing for ``data · scale``; ``|data| ≤ bound``.

    ``real_bound`` / ``loose``: :mod:`qjax.quant.integer_ranges`. ``peak`` / ``least``:
    ``x - max(x)`` has a 0 along the reduced axes, so ``exp`` of it has ``exp(0)``'s codes
    there, and their sum is at least that (a ``log_softmax``'s ``log(sum(exp))``).
    ``mask``: ``(pred, "-inf")`` for ``where(pred, x, -inf)`` (its fill saturated) and
    ``x - max(x)`` of it; ``(pred, "0")`` for a function of that which is 0 at ``-inf``
    (``exp``): what ``jax.nn.softmax(where=)``'s masked sum relies on.
    ``sign``: ``1`` when every element is known ``≥ 0`` (after a ReLU, an ``exp``), ``-1``
    when ``≤ 0`` (``x - max(x)``), else ``0``. ``chain``: ``(root, fn, ops)`` when the value
    is ``fn(root)`` element-wise (:mod:`qjax.quant.integer_chains`). ``reduced``: a
    :class:`Reduced` when the value is a ``max`` / ``sum`` of another, laid out to meet it
    again (a softmax's ``x - max(x)`` and ``e / sum(e)``)."""

    data: jax.Array
    scale: np.ndarray
    bound: float
    sign: int = 0
    chain: tuple | None = None
    reduced: Reduced | None = None
    peak: tuple | None = None  # (axes, codes): along axes, some element has exactly these codes
    least: float | None = None  # every element's codes are at least this (a sum with a peak)
    real_bound: float | None = None  # max |value| measured on calibration data
    loose: bool = False  # the bound compounds a product's (see qjax.quant.integer_ranges)
    bounded: bool = False  # an evaluated function's output: its bound is the function's range
    mask: tuple | None = None  # (pred, "-inf" | "0"): where pred is False the value stands for that


@dataclasses.dataclass(frozen=True, eq=False)
class Reduced:
    """The value is ``kind`` (``"max"`` / ``"sum"``) of ``source`` over ``axes``, or
    (``"masked"``, no axes) ``source`` with some elements set to 0;
    ``aligned``: laid out as ``source`` with the reduced axes kept (size 1 or broadcast
    back), so it meets ``source`` element by element."""

    kind: str
    source: IntValue
    axes: tuple[int, ...]
    aligned: bool = False


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
        return IntValue(a.data, scale, a.bound, sign=a.sign)
    data = fine_dyadic_mul(a.data, fine_dyadic(ratio))  # 30-bit ratios: within a unit of exact
    return IntValue(data, scale, a.bound * float(ratio.max()) + 2, sign=a.sign)


def finer(scale, bound: float):
    """``scale`` divided by the power of two (up to ``2^14``) that keeps codes bounded by
    ``bound`` (at ``scale``) below half of :data:`LIMIT`: where values meet on one scale,
    rounding onto a finer one costs less than onto the coarsest."""
    return scale / 2.0 ** int(np.clip(np.floor(np.log2(LIMIT / 2 / max(bound, 1.0))), 0, 14))


def common_scale(scales, bounds) -> np.ndarray:
    """The scale values of ``scales`` (broadcastable) meet at: their maximum, or where they
    differ, that maximum divided by the power of two (up to ``2^14``) that keeps the
    rescaled bounds' sum below half of :data:`LIMIT` (rounding onto a finer scale costs
    less than onto the coarsest)."""
    ndim = max(np.ndim(s) for s in scales)
    ranked = [_rank(np.asarray(s, np.float64), ndim) for s in scales]
    top = ranked[0]
    for s in ranked[1:]:
        top = np.maximum(top, s)
    top = compress(top)
    shape = np.broadcast_shapes(*(s.shape for s in ranked))
    if all(np.array_equal(np.broadcast_to(s, shape), np.broadcast_to(top, shape)) for s in ranked):
        return top
    return finer(top, sum(float(b) * float(np.max(s / top)) for s, b in zip(ranked, bounds)))


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
        return [IntValue(-a.data, a.scale, a.bound, sign=-a.sign)]
    if name in ("add", "sub", "max", "min"):
        return [_binary(eqn, invals, fail)]
    if name == "mul" and all(isinstance(x, IntValue) for x in invals):
        return [_product(eqn, *invals)]
    if name == "div" and all(isinstance(x, IntValue) for x in invals):
        return [_normalized(*invals, fail)]
    if name in ("mul", "div"):
        return [_scaled(eqn, invals, fail)]
    if name == "select_n":
        return [_select(eqn, invals, fail)]
    if name in _REDUCE or name in _WINDOW:
        return [_reduce(eqn, invals[0])]
    if name == "concatenate":
        return [_concatenate(eqn, invals)]
    if name in _MOVES:
        if any(isinstance(x, IntValue) for x in invals[1:]) or not isinstance(invals[0], IntValue):
            raise fail("indexes by an integer value")
        return [_moved(eqn, invals)]
    if name == "stack":
        return [stack_values(invals, eqn.params["axis"])]
    if name == "split":
        return _split(eqn, invals[0])
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
        # x - max(x): x rescaled exactly as the max read it, so no difference rounds above 0
        own_max = name == "sub" and _is_reduction_of(y, "max", x)
        scale = y.scale if own_max else common_scale([x.scale, y.scale], [x.bound, y.bound])
        xa, ya = align(x, scale), align(y, scale)
        sign = 0
        if own_max:
            sign = -1  # x - max(x) along the reduced axes
        elif name == "add" and x.sign == y.sign:
            sign = x.sign
        elif name == "max" and 1 in (x.sign, y.sign):
            sign = 1
        elif name == "min" and -1 in (x.sign, y.sign):
            sign = -1
        if name in ("add", "sub"):
            grow = (xa.bound + ya.bound) / max(xa.bound, ya.bound, 1.0)
            xa, ya = coarsen(xa, grow), coarsen(ya, grow)
            if not np.array_equal(xa.scale, ya.scale):  # coarsened differently: meet again
                scale = np.maximum(xa.scale, ya.scale)
                xa, ya = align(xa, scale), align(ya, scale)
            bound = xa.bound + ya.bound
        else:
            bound = max(xa.bound, ya.bound)
        peak = (y.reduced.axes, 0) if own_max else None  # the max element's difference is 0
        mask = x.mask if own_max and x.mask is not None and x.mask[1] == "-inf" else None  # -inf - max
        data = bind_eqn(eqn, [xa.data, ya.data])[0]
        return IntValue(data, xa.scale, bound, sign=sign, peak=peak, mask=mask)
    int_first = isinstance(x, IntValue)
    a, other = (x, y) if int_first else (y, x)
    v = np.asarray(other, np.float64)
    if name in ("max", "min") and np.all(v == (-np.inf if name == "max" else np.inf)):
        return a  # max with -inf / min with +inf: the identity
    if np.any(np.isnan(v)):
        raise fail("meets a NaN constant")
    scale = _rank(a.scale, v.ndim)
    fill = mask_fill(v, scale, a.bound) if name in ("add", "sub") else None
    if fill is not None:  # an additive mask: its huge entries saturated, not the value coarsened
        q = np.abs(fill)
        const = jnp.asarray(compress(fill).astype(np.int32))
        args = [a.data, const] if int_first else [const, a.data]
        data = bind_eqn(eqn, args)[0]
        return IntValue(data, _rank(a.scale, max(a.data.ndim, v.ndim)), a.bound + float(np.max(q, initial=0)))
    if not np.all(np.isfinite(v)):
        raise fail("meets an infinite constant")
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
    sign = 0
    if name == "max" and (a.sign > 0 or np.all(v >= 0)):
        sign = 1
    elif name == "min" and (a.sign < 0 or np.all(v <= 0)):
        sign = -1
    elif name == "add" and a.sign and np.all(np.sign(v) * a.sign >= 0):
        sign = a.sign
    elif name == "sub" and a.sign and np.all(-np.sign(v) * a.sign >= 0) and int_first:
        sign = a.sign
    return IntValue(bind_eqn(eqn, args)[0], _rank(a.scale, max(a.data.ndim, v.ndim)), bound, sign=sign)


MASK_MAGNITUDE = 1e8  # a constant this large (or infinite) that does not fit is a mask's fill
FILL_CODES = 2**29  # where a mask's fill saturates, in codes of the value it meets


def mask_fill(v: np.ndarray, scale: np.ndarray, bound: float) -> np.ndarray | None:
    """The codes of constant ``v`` on ``scale`` (int64) with its mask entries saturated at
    ``±FILL_CODES`` (a ``-1e9`` / ``finfo.min`` / ``-inf`` attention mask), or ``None`` when
    ``v`` has no such entries that would not fit, or the saturated fill would not stay far
    from the values (``|value| ≤ bound`` codes ≤ ``2^28``, fill ``≥ 10^4`` in value)."""
    huge = ~np.isfinite(v) | (np.abs(v) >= MASK_MAGNITUDE)
    with np.errstate(all="ignore"):
        codes = np.round(np.where(huge, 0.0, v) / scale)
    if not huge.any() or bound > FILL_CODES / 2 or np.any(np.abs(codes) > FILL_CODES / 2):
        return None
    fits = np.abs(np.where(huge, v, 0.0)) / scale <= LIMIT - bound
    if np.all(fits[np.broadcast_to(huge, fits.shape)]):
        return None  # every entry fits as it is
    if np.any(np.broadcast_to(FILL_CODES * scale, huge.shape)[huge] < 1e4):
        return None
    return np.where(huge, np.sign(v) * FILL_CODES, codes).astype(np.int64)


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
    new_sign = a.sign if np.all(sign >= 0) else (-a.sign if np.all(sign <= 0) else 0)
    return IntValue(data, _rank(scale, data.ndim), a.bound, sign=new_sign)


def uniform(a: IntValue, axes, refine: bool = False) -> IntValue:
    """``a`` rescaled so that its scale is constant along ``axes``: their maximum, or with
    ``refine`` that maximum divided by the power of two (up to ``2^14``) its bound allows."""
    axes = tuple(d for d in axes if a.scale.shape[d] > 1)
    if not axes:
        return a
    top = np.max(a.scale, axis=axes, keepdims=True)
    if refine:
        top = finer(top, a.bound)
    return align(a, top)


def _reduce(eqn, a: IntValue) -> IntValue:
    name, p = eqn.primitive.name, eqn.params
    if name in _WINDOW:
        out_shape = eqn.outvars[0].aval.shape
        axes = [
            d
            for d, k in enumerate(p["window_dimensions"])
            if k > 1 or out_shape[d] != a.data.shape[d]  # pooled, strided or padded
        ]
        a = uniform(a, axes)
        grow = math.prod(p["window_dimensions"]) if name == "reduce_window_sum" else 1
        a = coarsen(a, grow)
        return IntValue(bind_eqn(eqn, [a.data])[0], a.scale, a.bound * grow, sign=a.sign)
    axes = tuple(p["axes"])
    source = a
    a = uniform(a, axes, refine=name != "reduce_sum")
    grow = math.prod(a.data.shape[d] for d in axes) if name == "reduce_sum" else 1
    a = coarsen(a, grow)
    out = bind_eqn(eqn, [a.data])[0]
    if name in ("argmax", "argmin"):
        return out  # indices: plain integers, no scale
    kind = {"reduce_max": "max", "reduce_sum": "sum"}.get(name)
    reduced = None if kind is None else Reduced(kind, source, axes)
    least = None
    if source.peak is not None and set(source.peak[0]) == set(axes) and a.sign > 0:
        # a sum of non-negative codes, one of them the peak's (rescaled: within 2 units)
        ratio = float(np.min(source.scale) / np.max(a.scale))  # the least the peak's codes can shrink to
        least = source.peak[1] * ratio - 2 if kind in ("sum", "max") else None
    scale = np.squeeze(a.scale, axis=axes)
    return IntValue(out, scale, a.bound * grow, sign=a.sign, reduced=reduced, least=least)


def _is_reduction_of(y: IntValue, kind: str, x: IntValue) -> bool:
    """Whether ``y`` is ``kind`` of ``x`` laid out to meet ``x`` element by element."""
    r = y.reduced
    return r is not None and r.kind == kind and r.source is x and r.aligned


def _kept_layout(a: IntValue, eqn, data) -> Reduced | None:
    """``a``'s reduction tag after a layout op: kept (and marked aligned) when the op only
    puts the reduced axes back in place (keepdims), else dropped."""
    r = a.reduced
    if r is None:
        return None
    name, p = eqn.primitive.name, eqn.params
    src = r.source.data.shape
    kept = [d for d in range(len(src)) if d not in r.axes]
    fits = len(data.shape) == len(src) and all(
        data.shape[d] == src[d] or (d in r.axes and data.shape[d] == 1) for d in range(len(src))
    )
    if not fits:
        return None
    if name == "broadcast_in_dim":
        dims = tuple(p["broadcast_dimensions"])
        if dims != (tuple(kept) if a.data.ndim == len(kept) else tuple(range(a.data.ndim))):
            return None
    elif name not in ("reshape", "expand_dims"):
        return None
    return dataclasses.replace(r, aligned=True)


def _product(eqn, x: IntValue, y: IntValue) -> IntValue:
    """Two integer values multiplied: the exact 64-bit product shifted right by the bits
    the bounds need to stay below ``2^PRODUCT_BITS`` (one rounding)."""
    need = x.bound * y.bound / 2.0**PRODUCT_BITS
    shift = 0 if need <= 1 else math.ceil(math.log2(need))
    if shift > 62:
        raise ValueError(
            f"integer_only: a product of values bounded by {x.bound:g} and {y.bound:g} has no int32 form"
        )
    data = mul_shift(x.data, y.data, shift)
    xs, ys = _rank(x.scale, data.ndim), _rank(y.scale, data.ndim)
    scale = compress(np.broadcast_to(xs * ys, np.broadcast_shapes(xs.shape, ys.shape)) * 2.0**shift)
    sign = x.sign * y.sign if x.sign and y.sign else 0
    # loose unless both factors are functions' outputs (a gate's sigmoid · tanh): their
    # bounds are their ranges, so the product's is tight; x · rsqrt(var) compounds x's
    loose = x.loose or y.loose or not (x.bounded and y.bounded)
    return IntValue(data, scale, x.bound * y.bound / 2.0**shift + 1, sign=sign, loose=loose)


def _normalized(x: IntValue, y: IntValue, fail) -> IntValue:
    """``x / y`` where ``y`` is the sum of ``x ≥ 0`` along some axes (a softmax's
    ``e / sum(e)``), or of ``where(mask, x, 0)`` (``softmax(where=)``, whose masked ``e`` are
    ``exp(-inf) = 0`` in float: their quotients are 0 here): a quotient in ``[0, 1]`` by
    long division, codes of ``2^-QUOTIENT_BITS``. Any other division by an integer value
    raises."""
    r = y.reduced
    masked = r is not None and r.kind == "sum" and r.aligned and _is_reduction_of(r.source, "masked", x)
    if not ((_is_reduction_of(y, "sum", x) or masked) and x.sign > 0):
        raise fail(
            "divides by an integer value (only x / sum(x) of a non-negative x, or x / sum(where(mask, "
            "x, 0)), has an integer form)"
        )
    # the jaxpr's own sum was coarsened for int32 (its result is left unused): here the
    # summands are shifted once so their sum stays below 2^29, and the denominator is the
    # exact sum (two int32 words) shifted once, so a long row's many small terms that
    # round to 0 as numerators still count in it (a vocabulary's softmax)
    summands = uniform(r.source, r.axes)  # x, or where(mask, x, 0): its masked quotients are 0
    count = math.prod(summands.data.shape[d] for d in r.axes)
    total = max(summands.bound * count, 1.0)
    shift = max(0, math.ceil(math.log2(total / 2.0**29)))  # den < 2^30
    num = summands.data
    if shift:
        num = jnp.right_shift(num + jnp.int32(1 << (shift - 1)), shift)
    den = _exact_sum_shifted(summands.data, r.axes, count, total, shift)
    if den is None:
        den = jnp.sum(num, axis=r.axes, keepdims=True)
    num = jnp.minimum(num, den)
    q = normalize(num, den, QUOTIENT_BITS)
    q = jnp.broadcast_to(q, np.broadcast_shapes(q.shape, x.data.shape))
    return IntValue(q, np.full((1,) * q.ndim, 2.0**-QUOTIENT_BITS), 2.0**QUOTIENT_BITS, sign=1)


def _exact_sum_shifted(data, axes, count: int, total: float, shift: int):
    """``round(sum(data) / 2^shift)`` along ``axes`` (keepdims) for ``data ≥ 0`` whose exact
    sum (``≤ total``) may pass int32: the high and low ``b`` bits summed apart. ``None``
    when no split keeps both sums in int32."""
    if not shift:
        return jnp.sum(data, axis=axes, keepdims=True)
    b = max(0, math.ceil(math.log2(total) - 30))  # sum of the high parts <= 2^30
    if count * 2.0**b >= 2**31 or b > 30 or shift <= b:
        return None
    mask = jnp.int32((1 << b) - 1)
    hi = jnp.sum(jnp.right_shift(data, b), axis=axes, keepdims=True)
    lo = jnp.sum(data & mask, axis=axes, keepdims=True)  # < count · 2^b
    t = hi + jnp.right_shift(lo, b)  # the sum is t · 2^b + (lo mod 2^b), the rest below 2^b
    k = shift - b  # >= 1: shift = ceil(log2 total) - 29, b = ceil(log2 total) - 30 or 0
    return jnp.right_shift(t + jnp.int32(1 << (k - 1)), k)


def _select(eqn, invals, fail) -> IntValue:
    """``select_n(pred, *cases)`` with a mask ``pred`` (not an integer value): the cases
    at one scale, constants rounded onto it (a mask's ``-inf`` / ``finfo.min`` fill
    saturated at ``-2^29`` codes, :func:`mask_fill`); other constants too large for it
    raise."""
    pred, *cases = invals
    if isinstance(pred, IntValue):
        raise fail("selects by an integer value's codes")
    ints = [c for c in cases if isinstance(c, IntValue)]
    scale = ints[0].scale
    for c in ints[1:]:
        scale = compress(np.maximum(_rank(scale, c.scale.ndim), _rank(c.scale, scale.ndim)))
    parts, bound = [], max(c.bound for c in ints)
    for c in cases:
        if isinstance(c, IntValue):
            a = align(c, scale)
            parts.append(a.data)
            bound = max(bound, a.bound)
        else:
            v = np.asarray(c, np.float64)
            if np.any(np.isnan(v)):
                raise fail("selects a NaN constant")
            sv = _rank(scale, v.ndim)
            codes = mask_fill(v, sv, bound)
            if codes is None:
                with np.errstate(all="ignore"):
                    codes = np.round(v / sv)
                if not np.all(np.abs(codes) <= LIMIT - bound):
                    raise fail(
                        "selects a constant too large for the other case's integer scale (a mask's fill "
                        f"is saturated only from {MASK_MAGNITUDE:g} on, or -inf)"
                    )
            bound = max(bound, float(np.max(np.abs(codes), initial=0)))
            parts.append(jnp.asarray(compress(codes).astype(np.int32)))
    out_shape = eqn.outvars[0].aval.shape
    data = bind_eqn(eqn, [pred, *(jnp.broadcast_to(p, out_shape) for p in parts)])[0]
    out = IntValue(data, _rank(scale, data.ndim), bound)
    if len(cases) != 2 or not isinstance(cases[1], IntValue) or isinstance(cases[0], IntValue):
        return out
    x, fill = cases[1], np.asarray(cases[0], np.float64)  # where(pred, x, fill)
    if np.all(~np.isfinite(fill) & (fill < 0)) or np.all(fill <= -MASK_MAGNITUDE):
        return dataclasses.replace(out, mask=(pred, "-inf"))  # saturated: stands for -inf
    if (
        np.all(fill == 0)
        and x.sign > 0
        and x.mask is not None
        and x.mask[1] == "0"
        and same_operand(x.mask[0], pred)
    ):
        # x is 0 where pred is False (exp of a value masked by pred): this equals x, and
        # x / sum(this) is softmax(where=)'s normalisation
        return dataclasses.replace(out, sign=1, reduced=Reduced("masked", x, (), aligned=True))
    return out


def same_operand(a, b) -> bool:
    """Whether two operands are one value: the same object, or equal static arrays of one
    dtype and shape (NaNs equal)."""
    if a is b:
        return True
    if isinstance(a, (IntValue, jax.core.Tracer)) or isinstance(b, (IntValue, jax.core.Tracer)):
        return False
    try:
        a, b = np.asarray(a), np.asarray(b)
    except (TypeError, ValueError):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    same = a == b
    if np.issubdtype(a.dtype, np.inexact):
        same = same | (np.isnan(a) & np.isnan(b))
    return bool(np.all(same))


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
    return IntValue(data, scale, a.bound, sign=a.sign, reduced=_kept_layout(a, eqn, data), least=a.least)


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


_MOVES = ("gather", "dynamic_slice")  # elements moved by static indices


def _moved(eqn, invals) -> IntValue:
    """A gather / dynamic slice by static indices (``x[..., perm]``, a rotary embedding's
    half swap): the codes moved, and the scale moved with them (the same op on the
    elements' flat positions, so the scale stays exact in float64)."""
    a = invals[0]
    data = bind_eqn(eqn, [a.data, *invals[1:]])[0]
    if a.scale.size == 1:
        return IntValue(data, np.ones((1,) * data.ndim) * a.scale.reshape(()), a.bound, sign=a.sign)
    size = int(np.prod(a.data.shape))
    with jax.ensure_compile_time_eval():  # the indices are static: so are the positions
        positions = jnp.arange(size, dtype=jnp.int32).reshape(a.data.shape)
        moved = np.asarray(bind_eqn(eqn, [positions, *invals[1:]])[0])
    full = np.broadcast_to(a.scale, a.data.shape).reshape(-1)
    return IntValue(data, compress(full[moved]), a.bound, sign=a.sign)


def stack_values(invals, axis: int) -> IntValue:
    """Integer values (and exact zero blocks) stacked along a new ``axis``, each keeping
    its scale (a scanned layer's outputs stacked over the layers, ``jnp.stack``)."""
    parts = [x if isinstance(x, IntValue) else _zeros(x) for x in invals]
    ndim = max(x.data.ndim for x in parts)
    size = [max(_rank(x.scale, ndim).shape[d] for x in parts) for d in range(ndim)]
    scales = [np.expand_dims(np.broadcast_to(_rank(x.scale, ndim), size), axis) for x in parts]
    data = jnp.stack([x.data for x in parts], axis=axis)
    sign = parts[0].sign if all(x.sign == parts[0].sign for x in parts) else 0
    bound = max(x.bound for x in parts)
    measured = [x.real_bound for x in parts if isinstance(x, IntValue)]
    real_bound = max(measured) if all(r is not None for r in measured) else None
    loose = any(x.loose for x in parts)  # a part's bound compounds a product's: so does the stack's
    scale = compress(np.concatenate(scales, axis=axis))
    return IntValue(data, scale, bound, sign=sign, real_bound=real_bound, loose=loose)


def _split(eqn, a: IntValue) -> list:
    axis, sizes = eqn.params["axis"], [int(n) for n in eqn.params["sizes"]]
    outs = bind_eqn(eqn, [a.data])
    if a.scale.shape[axis] == 1:
        scales = [a.scale] * len(sizes)
    else:
        scales = np.split(a.scale, np.cumsum(sizes)[:-1], axis=axis)
    return [IntValue(o, compress(s), a.bound, sign=a.sign) for o, s in zip(outs, scales)]


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
