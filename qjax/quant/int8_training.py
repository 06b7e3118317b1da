"""int8 training (AQT-style): a ``dot_general`` whose forward pass and both backward
passes (activation gradient and weight gradient) are integer matmuls.

Every one of the three matmuls quantizes both of its operands on the fly with one scale
per index of their non-contracting dimensions (per token / per output channel), so each
int32 accumulation factors into scales exactly. The forward pass uses the operands'
``act``/``weight`` formats, the backward passes quantize the incoming gradient with the
rule's ``grad`` spec (stochastic rounding by default: unbiased, which keeps SGD
unbiased) and re-quantize the saved float operands along the axes that are free in that
matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.ops_dot import quantized_dot_general


def _free(ndim: int, contracting, batch) -> list[int]:
    return [d for d in range(ndim) if d not in contracting and d not in batch]


def _per_token(spec: QuantSpec) -> QuantSpec:
    return spec.replace(channel_axes=PER_TOKEN, group_size=None, group_axis=None, pack=False)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _int8_dot(lhs, rhs, key, dn, lhs_spec, rhs_spec, grad_spec):
    return quantized_dot_general(lhs, rhs, dn, lhs_spec=lhs_spec, rhs_spec=rhs_spec)


def _fwd(lhs, rhs, key, dn, lhs_spec, rhs_spec, grad_spec):
    return _int8_dot(lhs, rhs, key, dn, lhs_spec, rhs_spec, grad_spec), (lhs, rhs, key)


def _bwd(dn, lhs_spec, rhs_spec, grad_spec, res, g):
    lhs, rhs, key = res
    k1 = k2 = None
    if key is not None:
        k1, k2 = jax.random.split(key)
    g = g.astype(lhs.dtype)
    dlhs = _grad_dot(g, rhs, dn, grad_spec, rhs_spec, k1, 0, lhs.ndim)
    drhs = _grad_dot(g, lhs, dn, grad_spec, lhs_spec, k2, 1, rhs.ndim)
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None


_int8_dot.defvjp(_fwd, _bwd)


def int8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    *,
    lhs_spec: QuantSpec,
    rhs_spec: QuantSpec,
    grad_spec: QuantSpec,
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.dot_general`` trained in integers: forward and both backward matmuls run as
    int8×int8→int32 (or the specs' formats) with per-token / per-channel scales.

    Args:
      lhs, rhs: float operands (activation and weight, in any order).
      dimension_numbers: as for ``lax.dot_general``.
      lhs_spec, rhs_spec: formats (and rounding) of the operands; their granularity is
        replaced by one scale per non-contracting index of each matmul.
      grad_spec: format of the incoming gradient in the backward matmuls, typically
        ``QuantSpec(qjax.int8, rounding="stochastic")``.
      key: PRNG key, required when ``grad_spec`` rounds stochastically.

    Returns:
      The float result; its VJP is the integer backward pass.

    Raises:
      ValueError: a stochastic spec without ``key`` (at the backward pass).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return _int8_dot(lhs, rhs, key, dn, _per_token(lhs_spec), _per_token(rhs_spec), _per_token(grad_spec))
