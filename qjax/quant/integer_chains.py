"""Element-wise chains on one integer value, for :func:`qjax.integer_only`.

A GELU is a dozen primitives (``x · 0.5 · erfc(-x / √2)``, or the tanh form with ``x³``);
a softmax's ``exp``, a norm's ``rsqrt(var + eps)`` and a SiLU are a few more. Run one at a
time on integers, each would need its own integer form and its intermediate ranges (an
``x³`` of a loosely bounded ``x`` loses most of its bits). Instead, every value computed
element-wise from one integer value (the chain's *root*) with scalar constants is kept as
a :class:`Chain`: the root and the float64 function of it the primitives compose. When a
chain meets an op that is not element-wise on the same root, the whole function is
evaluated on the root's codes at once, on integers
(:func:`qjax.quant.integer_functions.fit_integer_function`).

Linear steps (a scale, a constant added, ``max`` with a constant) also run eagerly on the
integers (:mod:`qjax.quant.integer_values`); their result records the chain it belongs to
(``IntValue.chain``), so a later nonlinear step on it or beside it (``x · Φ(x)``) joins it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import scipy.special as sp

from qjax.quant.integer_functions import fit_integer_function
from qjax.quant.integer_values import IntValue, align, finer

_UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "exp2": np.exp2,
    "log": np.log,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "tanh": np.tanh,
    "logistic": sp.expit,
    "erf": sp.erf,
    "erfc": sp.erfc,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "cbrt": np.cbrt,
    "abs": np.abs,
    "sign": np.sign,
    "square": np.square,
    "sin": np.sin,
    "cos": np.cos,
    "atan": np.arctan,
}
_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "pow": np.power,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}
_IDENTITY = ("convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision")
ELEMENTWISE = frozenset((*_UNARY, *_BINARY, *_IDENTITY, "integer_pow", "select_n", "clamp"))
LINEAR = frozenset(("add", "sub", "neg", "max", "min", *_IDENTITY))  # eager forms keep a chain
_NONLINEAR = frozenset(ELEMENTWISE - LINEAR - {"mul", "div"})


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
    """``fn(root)`` element-wise, not yet evaluated: ``root`` an :class:`IntValue`,
    ``fn`` a float64 function of its real values, ``ops`` the primitives composed (for
    errors), ``shape`` the value's shape (the root's, or broadcast by a constant)."""

    root: IntValue
    fn: Callable[[np.ndarray], np.ndarray]
    ops: tuple[str, ...]
    shape: tuple[int, ...]
    boolean: bool = False
    real_bound: float | None = None  # max |value| measured on calibration data


def root_of(x) -> tuple[IntValue, Callable, tuple[str, ...]] | None:
    """``(root, fn, ops)`` of an integer value or chain (an :class:`IntValue` without a
    recorded chain is its own root)."""
    if isinstance(x, Chain):
        return x.root, x.fn, x.ops
    if isinstance(x, IntValue):
        if x.chain is not None:
            return x.chain
        return x, (lambda v: v), ()
    return None


def _numpy_op(eqn) -> Callable:
    name, p = eqn.primitive.name, eqn.params
    if name in _UNARY:
        return _UNARY[name]
    if name in _BINARY:
        return _BINARY[name]
    if name == "integer_pow":
        return lambda x: np.power(x, p["y"])
    if name == "clamp":
        return lambda lo, x, hi: np.clip(x, lo, hi)
    if name == "select_n":
        return lambda pred, *cases: np.choose(np.asarray(pred, np.int64), cases)
    return lambda x: x  # _IDENTITY


def extend(eqn, invals) -> Chain | None:
    """``eqn`` (element-wise) on values of one chain and scalar constants, as a longer
    chain; ``None`` when it is not that (two roots, a constant that varies per element, an
    integer-typed result)."""
    name = eqn.primitive.name
    if name not in ELEMENTWISE:
        return None
    if name == "convert_element_type" and not np.issubdtype(eqn.params["new_dtype"], np.floating):
        return None
    roots = [root_of(x) for x in invals]
    live = [r for r in roots if r is not None]
    if name in _IDENTITY and len(invals) == 1 and isinstance(invals[0], Chain):
        return invals[0]  # a cast between float types: the same chain (one object, one evaluation)
    if not live or any(r[0] is not live[0][0] for r in live):
        return None
    statics = []
    for x, r in zip(invals, roots):
        if r is None:
            if isinstance(x, jax.core.Tracer):
                return None  # the float input (a mask from it): not a constant
            v = np.asarray(x)
            v = v if v.dtype == np.bool_ else v.astype(np.float64)
            if v.size == 0 or np.any(v != v.flat[0]):
                return None  # varies per element (a per-channel bias): not a scalar constant
            statics.append(v.flat[0])
        else:
            statics.append(None)
    op = _numpy_op(eqn)
    parts = [r[1] if r is not None else None for r in roots]

    def fn(v, op=op, parts=parts, statics=statics):
        return op(*(p(v) if p is not None else s for p, s in zip(parts, statics)))

    ops = (*dict.fromkeys(o for r in live for o in r[2]), name)
    boolean = name in ("gt", "ge", "lt", "le", "eq", "ne")
    return Chain(live[0][0], fn, ops, tuple(eqn.outvars[0].aval.shape), boolean)


def wants_chain(eqn, invals) -> bool:
    """Whether ``eqn`` must extend a chain rather than run eagerly: a nonlinear
    element-wise op, a product / quotient of two values of one root, or any op on an
    unevaluated chain."""
    name = eqn.primitive.name
    if any(isinstance(x, Chain) for x in invals):
        return True
    if name in _NONLINEAR:
        return True
    if name in ("mul", "div"):
        roots = [r[0] for r in map(root_of, invals) if r is not None]
        return len(roots) == 2 and roots[0] is roots[1]
    return False


def evaluate(chain: Chain, where: str, margin: float = 2.0) -> IntValue:
    """The chain's function on its root's codes, on integers: the root at one scale (a
    power-of-two fraction of its largest), then a fitted
    :class:`~qjax.quant.integer_functions.IntegerFunction` (over the inputs where the
    function stays within ``margin`` times its calibrated range, when it has one).

    Raises:
      ValueError: a comparison's result used outside a chain, or a function that is not
        finite or not smooth enough on the root's range (the message names the ops).
    """
    import jax.numpy as jnp

    what = " → ".join(chain.ops)
    if chain.boolean:
        raise ValueError(
            f"integer_only: at {where}, a comparison of an integer value ({what}) is used outside an "
            "element-wise chain (as a mask or an index), which has no integer form"
        )
    root = chain.root
    scale = np.asarray(root.scale, np.float64)
    s = float(np.max(scale))
    if np.any(scale != s):  # per-channel scales: one finer scale, so rounding onto it costs little
        s = finer(s, root.bound)
    root = align(root, np.full((1,) * root.data.ndim, s))  # finer() keeps its bound in int32
    b = int(np.ceil(root.bound))
    lo, hi = (0 if root.sign > 0 else -b), (0 if root.sign < 0 else b)
    least = chain.root.least
    if least is not None and least > 0 and root.sign >= 0:  # a sum with a peak in it: a log's domain
        lo = max(lo, int(np.floor(least * float(np.min(chain.root.scale)) / s)))
    limit = None if chain.real_bound is None else margin * chain.real_bound
    try:
        f = fit_integer_function(chain.fn, s, lo, hi, name=what, out_limit=limit)
    except ValueError as e:
        hint = ""
        if "exp" in chain.ops and "not finite" in str(e):
            hint = " (an exp of a value not known to be <= 0: subtract the max of that same value first)"
        raise ValueError(f"integer_only: at {where}: {e}{hint}") from None
    data = f(root.data)
    # a function with no negative (positive) value on the sample is clamped to it: the
    # sign is what a later softmax division or a root's domain relies on
    sign = 1 if f.lo_value >= 0 else (-1 if f.hi_value <= 0 else 0)
    if sign:
        data = jnp.maximum(data, 0) if sign > 0 else jnp.minimum(data, 0)
    data = jnp.broadcast_to(data, chain.shape)
    peak = None
    if chain.root.peak is not None and chain.root.peak[1] == 0 and sign > 0:  # exp(x - max(x)) has exp(0)
        peak = (chain.root.peak[0], int(max(f.reference(np.array([0]))[0], 0)))
    mask = None
    if chain.root.mask is not None and chain.root.mask[1] == "-inf":  # where the root stands for -inf
        with np.errstate(all="ignore"):
            at_fill = chain.fn(np.array([-np.inf]))
        if np.all(at_fill == 0):  # exp(-inf - max): 0 there, as softmax(where=)'s masked sum assumes
            mask = (chain.root.mask[0], "0")
    scale = np.full((1,) * len(chain.shape), f.out_scale)
    return IntValue(data, scale, f.bound, sign=sign, bounded=True, peak=peak, mask=mask)
