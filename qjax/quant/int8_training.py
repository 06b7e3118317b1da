"""int8 training (AQT-style): a ``dot_general`` whose forward pass and both backward
passes (activation gradient and weight gradient) are integer matmuls.

The forward pass quantizes each operand exactly as its spec says (per tensor, per
channel, per group, ``PER_TOKEN``), as ``qjax.quantized`` serves it, so a model trained
this way is the model deployed. The backward matmuls quantize their operands with one
scale per index of the axes that are free in *that* matmul (per token / per channel),
so each int32 accumulation factors into scales exactly: the saved float operands are
re-quantized in the formats, rounding and calibration of the ``act`` / ``weight`` specs,
the incoming gradient by the ``grad`` spec (stochastic rounding by default: unbiased,
which keeps SGD unbiased) either with one scale per tensor (``channel_axes=()``) or per
row of each backward matmul (``qjax.PER_TOKEN``, AQT's choice). Other granularities of
the gradient cannot factor out of both backward matmuls and are refused
(:func:`check_grad_spec`).

:func:`with_integer_backward` is the ``custom_vjp`` both int8 dots and int8 convs
(:mod:`qjax.quant.int8_training_conv`) share, also for ``fake_quantized``'s ops, whose
forward is the served op.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from qjax.graph.ops import operand_channel_axes
from qjax.graph.sharding import like_output
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.ops_common import resolve_spec
from qjax.quant.ops_dot import quantized_dot_general


def check_grad_spec(spec: QuantSpec, what: str = "grad_spec") -> None:
    """Refuse a gradient granularity the backward matmuls cannot honour.

    Raises:
      ValueError: ``spec`` has a ``group_size`` or ``channel_axes`` other than ``()``
        (one scale per tensor) and ``qjax.PER_TOKEN`` (one per row of each backward
        matmul), or a symmetric unsigned integer format (it would clamp negative
        gradients to 0); the message starts with ``what``.
    """
    fmt = spec.format
    if spec.symmetric and not fmt.is_float and not getattr(fmt, "signed", True):
        raise ValueError(
            f"{what} has the unsigned format {fmt.name} with symmetric=True: gradients take both signs "
            "(negative ones would be clamped to 0); use a signed format such as qjax.int8"
        )
    if spec.group_size is None and (spec.channel_axes == () or spec.channel_axes is PER_TOKEN):
        return
    got = f"channel_axes={spec.channel_axes}"
    if spec.group_size is not None:
        got = f"group_size={spec.group_size}"
    raise ValueError(
        f"{what} has {got}: int8 training quantizes the incoming gradient with one scale per tensor "
        "(channel_axes=()) or one per row of each backward matmul (channel_axes=qjax.PER_TOKEN: per token "
        "for the input gradient, per output channel for the weight gradient), without group_size; other "
        "scales would vary along an axis one of the two backward matmuls sums over"
    )


def backward_spec(spec: QuantSpec) -> QuantSpec:
    """The spec an operand is re-quantized with in a backward matmul: its format, rounding
    and calibration, one scale per index of the axes free in that matmul."""
    return spec.replace(
        channel_axes=PER_TOKEN, group_size=None, group_axis=None, pack=False, tile_size=None, tile_axis=None
    )


def _grad_spec(spec: QuantSpec) -> QuantSpec:
    """The gradient's spec in the backward matmuls (per tensor stays per tensor)."""
    return spec.replace(pack=False) if spec.channel_axes == () else backward_spec(spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def with_integer_backward(forward: Callable, backward: Callable, lhs, rhs, extra, key):
    """``forward(lhs, rhs, extra)``, whose VJP with respect to ``lhs`` and ``rhs`` is
    ``backward(lhs, rhs, key, g, extra) -> (dlhs, drhs)`` (``extra``, e.g. the stored
    weight leaf a served forward quantizes, and ``key`` get zero cotangents)."""
    return forward(lhs, rhs, extra)


def _wib_fwd(forward, backward, lhs, rhs, extra, key):
    return forward(lhs, rhs, extra), (lhs, rhs, key, extra)


def _wib_bwd(forward, backward, res, g):
    lhs, rhs, key, extra = res
    # on an Explicit mesh the backward matmuls run with the axes Auto, and the cotangents
    # come back in their primals' shardings (a custom VJP must return exactly those types)
    types = (jax.typeof(lhs), jax.typeof(rhs))
    if not isinstance(backward, Mixed):
        dlhs, drhs = like_output(types, backward)(lhs, rhs, key, g, extra)
        return dlhs, drhs, None, None
    ints = like_output(types, backward.integer)(lhs, rhs, key, g, extra)
    floats = backward.float_vjp(lhs, rhs, extra, g)  # the op as written, in the caller's mesh
    dlhs, drhs = (
        i if s is not None else f.astype(x.dtype)
        for i, f, s, x in zip(ints, floats, backward.specs, (lhs, rhs), strict=True)
    )
    return dlhs, drhs, None, None


@dataclasses.dataclass(frozen=True, eq=False)
class Mixed:
    """A backward pass of :func:`with_integer_backward` whose cotangent of each operand with
    a ``None`` spec in ``specs`` (``(dlhs, drhs)``) comes from ``float_vjp(lhs, rhs, extra,
    g) -> (dlhs, drhs)`` (the straight-through gradient of the fake-quantized op) instead
    of ``integer`` (the integer cotangent it replaces is dead code under ``jit``)."""

    integer: Callable
    specs: tuple
    float_vjp: Callable


def with_float_cotangents(backward: Callable, specs, float_vjp: Callable) -> Callable:
    """``backward``, or a :class:`Mixed` one when a spec of ``specs`` is ``None``."""
    if all(s is not None for s in specs):
        return backward
    return Mixed(backward, tuple(specs), float_vjp)


def straight_through_vjp(op: Callable, lhs_spec: QuantSpec, rhs_spec: QuantSpec) -> Callable:
    """``float_vjp`` for :class:`Mixed`: the VJP of ``op(fake_quant(lhs), fake_quant(rhs))``
    with the operands' (resolved) forward specs rounded to nearest: their straight-through
    gradients, clip masks included."""

    def vjp(lhs, rhs, extra, g):
        fq = lambda x, sp: fake_quant(x, sp.replace(rounding="nearest"))
        out, pullback = jax.vjp(lambda a, b: op(fq(a, lhs_spec), fq(b, rhs_spec)), lhs, rhs)
        return pullback(g.astype(out.dtype))

    return vjp


def grad_pair(grad_spec, what: str = "grad_spec") -> tuple[QuantSpec | None, QuantSpec | None]:
    """``(dlhs spec, drhs spec)`` from a ``QuantSpec`` (both backward matmuls) or a pair
    (``None``: that matmul in float), each checked by :func:`check_grad_spec`.

    Raises:
      TypeError: not a ``QuantSpec`` or a pair of ``QuantSpec`` / ``None``.
      ValueError: both ``None``, or a spec :func:`check_grad_spec` refuses.
    """
    pair = (grad_spec, grad_spec) if isinstance(grad_spec, QuantSpec) else grad_spec
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(s is None or isinstance(s, QuantSpec) for s in pair)
    ):
        raise TypeError(
            f"{what} must be a qjax.QuantSpec or a (dlhs, drhs) pair of them / None, got {grad_spec!r}"
        )
    if pair[0] is None and pair[1] is None:
        raise ValueError(f"{what}: both backward matmuls are float; give at least one spec")
    for s in pair:
        if s is not None:
            check_grad_spec(s, what)
    return tuple(pair)


with_integer_backward.defvjp(_wib_fwd, _wib_bwd)


def _free(ndim: int, contracting, batch) -> list[int]:
    return [d for d in range(ndim) if d not in contracting and d not in batch]


def _grad_dot(g, other, dn, g_spec, other_spec, key, wrt: int, out_ndim: int):
    """Cotangent of operand ``wrt`` (0: lhs, 1: rhs) of ``dot_general(lhs, rhs, dn)``:
    ``g`` contracted with the other operand over the other operand's free dims, then
    transposed back into the operand's layout."""
    (lc, rc), (lb, rb) = dn
    mine_c, other_c = (lc, rc) if wrt == 0 else (rc, lc)
    mine_b, other_b = (lb, rb) if wrt == 0 else (rb, lb)
    k = len(lb)
    mine_free = _free(out_ndim, mine_c, mine_b)
    other_free = _free(other.ndim, other_c, other_b)
    # g's dims: batch, lhs free dims, rhs free dims. Contract g over the other operand's.
    start = k + len(mine_free) if wrt == 0 else k
    g_c = tuple(range(start, start + len(other_free)))
    if k == 0 and g_c != tuple(range(g.ndim - len(g_c), g.ndim)):
        # XLA:CPU's fast int8 kernel needs the left operand contracted on its last axes;
        # with a transpose folded into the dot's dimension numbers it falls back to a
        # generic loop (~4x slower for a 256x1024 weight gradient). Move the contracted
        # axes last and keep XLA from folding the transpose back.
        free = [d for d in range(g.ndim) if d not in g_c]
        g = lax.optimization_barrier(jnp.transpose(g, (*free, *g_c)))
        g_c = tuple(range(len(free), g.ndim))
    gdn = ((g_c, tuple(other_free)), (tuple(range(k)), tuple(other_b)))
    out = quantized_dot_general(g, other, gdn, lhs_spec=g_spec, rhs_spec=other_spec, key=key)
    # out's dims: batch, my free dims, then the other operand's contracting dims in
    # increasing order; each pairs with one of my contracting dims.
    rest = sorted(other_c)
    perm = [0] * out_ndim
    for i, d in enumerate(mine_b):
        perm[d] = i
    for j, d in enumerate(mine_free):
        perm[d] = k + j
    for m, d in enumerate(mine_c):
        perm[d] = k + len(mine_free) + rest.index(other_c[m])
    return lax.transpose(out, tuple(perm))


def _dot_backward(dn, lhs_spec, rhs_spec, grad_specs, lhs, rhs, key, g, extra=None):
    """Both cotangents of ``dot_general(lhs, rhs, dn)`` as integer matmuls (specs as
    :func:`backward_spec` / :func:`_grad_spec` made them; ``grad_specs``: the gradient's in
    the dlhs and drhs matmuls)."""
    k1 = k2 = None
    if key is not None:
        k1, k2 = jax.random.split(key)
    g = g.astype(lhs.dtype)
    dlhs = _grad_dot(g, rhs, dn, grad_specs[0], rhs_spec, k1, 0, lhs.ndim)
    drhs = _grad_dot(g, lhs, dn, grad_specs[1], lhs_spec, k2, 1, rhs.ndim)
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype)


def dot_backward(dimension_numbers, lhs_spec: QuantSpec, rhs_spec: QuantSpec, grad_spec):
    """The integer backward pass of ``dot_general`` for :func:`with_integer_backward`
    (``grad_spec``: a ``QuantSpec`` or a ``(dlhs, drhs)`` pair, checked by
    :func:`check_grad_spec` first; a ``None`` side is computed with the other's spec, for
    :func:`with_float_cotangents` to replace)."""
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    pair = (grad_spec, grad_spec) if isinstance(grad_spec, QuantSpec) else grad_spec
    pair = tuple(_grad_spec(s if s is not None else next(t for t in pair if t is not None)) for s in pair)
    return functools.partial(_dot_backward, dn, backward_spec(lhs_spec), backward_spec(rhs_spec), pair)


def _dot_forward(dn, lhs_spec, rhs_spec, lhs, rhs, key):
    return quantized_dot_general(lhs, rhs, dn, lhs_spec=lhs_spec, rhs_spec=rhs_spec, key=key)


def int8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    *,
    lhs_spec: QuantSpec,
    rhs_spec: QuantSpec,
    grad_spec: QuantSpec | tuple[QuantSpec | None, QuantSpec | None],
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.dot_general`` trained in integers: forward and both backward matmuls run as
    int8×int8→int32 (or the specs' formats).

    The forward pass is ``quantized_dot_general(lhs, rhs, dimension_numbers,
    lhs_spec=lhs_spec, rhs_spec=rhs_spec)``: each operand quantized with the scales its
    spec gives (per tensor, per channel, per group along a contracted axis, or
    ``qjax.PER_TOKEN``). The backward matmuls re-quantize the saved float operands in
    their specs' formats with one scale per index of the axes free in that matmul, and
    the incoming gradient by ``grad_spec``.

    Args:
      lhs, rhs: float operands (activation and weight, in any order).
      dimension_numbers: as for ``lax.dot_general``.
      lhs_spec, rhs_spec: how the operands are quantized in the forward matmul (their
        formats, rounding and calibration also in the backward matmuls).
      grad_spec: format of the incoming gradient in the backward matmuls, typically
        ``QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")`` (one
        scale per token for the input gradient, per output channel for the weight
        gradient); ``channel_axes=()``: one scale per tensor. A pair ``(dlhs, drhs)``
        gives each backward matmul its own (AQT's ``dlhs_bits`` / ``drhs_bits``); ``None``
        runs that one in float against the other operand as the forward pass quantized it
        (rounded to nearest), the straight-through gradient.
      key: PRNG key, required when a spec rounds stochastically.

    Returns:
      The float result; its VJP is the integer backward pass.

    Raises:
      ValueError: a ``grad_spec`` with ``group_size`` or with ``channel_axes`` other than
        ``()`` / ``qjax.PER_TOKEN``; operand specs whose scales do not factor out of the
        forward matmul (as ``quantized_dot_general``); a stochastic spec without ``key``
        (``grad_spec``: at the backward pass).
    """
    pair = grad_pair(grad_spec)
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    fkey = None
    if key is not None and "stochastic" in (lhs_spec.rounding, rhs_spec.rounding):
        fkey = jax.random.fold_in(key, 2)  # the backward splits ``key`` itself
    forward = functools.partial(_dot_forward, dn, lhs_spec, rhs_spec)
    params = {"dimension_numbers": dn}
    resolved = [  # PER_TOKEN as the forward resolves it: the operand's axes not contracted
        resolve_spec(sp, operand_channel_axes("dot_general", params, i, x.ndim))
        for i, (sp, x) in enumerate(((lhs_spec, lhs), (rhs_spec, rhs)))
    ]
    float_op = lambda a, b: lax.dot_general(a, b, dn, preferred_element_type=jnp.float32)
    backward = with_float_cotangents(
        dot_backward(dn, lhs_spec, rhs_spec, pair), pair, straight_through_vjp(float_op, *resolved)
    )
    return with_integer_backward(forward, backward, lhs, rhs, fkey, key)
