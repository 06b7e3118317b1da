"""The two products of attention over a :class:`qjax.KVCache`, on its codes.

The cache's keys and values are ``(B, T, H, D)`` :class:`qjax.QArray` s with one of three
scale layouts (:func:`mode`):

* ``"token"``: a scale per token (and head, and group of D): ``(B, T, H, G)``;
* ``"static"``: a scale constant along tokens, varying along heads and D: ``(1, 1, H|1, D|G|1)``;
* ``"block"`` (KIVI): a scale per block of tokens and per channel: ``(B, T / block, H|1, D|1)``.

Each product runs as :func:`qjax.quant.ops.quantized_dot_general` on the codes, with the
scales applied where they factor: on the output when they lie on its axes, folded into the
other operand (the queries, or the attention weights) when they vary along the
contraction, and per block of tokens as a batch axis of the product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.qarray import QArray
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.ops_dot import quantized_dot_general

B_AXIS, T_AXIS, H_AXIS, D_AXIS = -4, -3, -2, -1  # the cache layout (batch, length, heads, head_dim)


def mode(q: QArray) -> str:
    """``"token"``, ``"block"`` or ``"static"``: how the scales of a cache side vary."""
    if T_AXIS in q.channel_axes:
        return "token"
    return "block" if q.group_axis == T_AXIS else "static"


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _product(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum`` with float32 accumulation, behind a ``custom_jvp`` as the products on
    codes are (``quantized_dot_general``): the graph layer does not search such bodies, so
    an ``OpRule`` leaves every product of the cache alone, whatever its layout."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


@_product.defjvp
def _product_jvp(subscripts, primals, tangents):
    (a, b), (ta, tb) = primals, tangents
    dot = functools.partial(jnp.einsum, subscripts, preferred_element_type=jnp.float32)
    return _product(subscripts, a, b), dot(ta, b) + dot(a, tb)


def _channels(a: jax.Array, q: QArray) -> jax.Array:
    """A static scale or zero point ``(1, 1, H|1, G|D|1)`` -> float32 ``(1, 1, H|1, D|1)``."""
    a = a.astype(jnp.float32)
    if q.group_axis is not None:
        a = jnp.repeat(a, q.group_size, axis=-1)
    return a


def _codes(q: QArray, shape: tuple[int, ...]) -> QArray:
    """The codes of a ``(B, T, H, D)`` QArray reshaped to the logical ``shape`` (whose
    last axis divides D), with a per-tensor scale of 1 and no zero point, for a product
    whose scales are applied around it."""
    values, packed = q.values, q.packed_axis is not None
    per = 8 // q.format.pack_bits if packed else 1
    if packed and shape[-1] % per:
        # groups split a byte: run on the unpacked codes (this copy costs one read)
        values, packed, per = q.unpacked_values(), False, 1
    return QArray(
        values.reshape(*shape[:-1], shape[-1] // per),
        jnp.ones((1,) * len(shape), jnp.float32),
        format=q.format,
        dtype=jnp.float32,
        packed_axis=-1 if packed else None,
        packed_length=shape[-1] if packed else None,
    )


def _query_spec(q_spec: QuantSpec | None, where: dict, extra: tuple = ()) -> QuantSpec | None:
    """``q_spec``, whose axes refer to the user's ``(batch, S, q_heads, head_dim)``, moved
    onto the queries in a product's layout: ``where[i]`` lists the axes that user axis
    ``i`` became; ``extra`` axes always get their own scales. The product quantizes with
    it (straight-through gradients, as ``qjax.fake_quant``)."""
    if q_spec is None:
        return None
    axes = (0, 1, 2) if q_spec.channel_axes is PER_TOKEN else tuple(a % 4 for a in q_spec.channel_axes)
    chans = tuple(sorted({a for u in axes for a in where[u]} | set(extra)))
    group = None if q_spec.group_axis is None else where[q_spec.group_axis % 4]
    if group is not None and len(group) != 1:
        raise ValueError(
            f"q_spec: groups must run along head_dim or the tokens, got group_axis={q_spec.group_axis}"
        )
    return q_spec.replace(channel_axes=chans, group_axis=None if group is None else group[0], pack=False)


def scores(q5: jax.Array, k: QArray, q_spec: QuantSpec | None, method: str) -> jax.Array:
    """``q · k`` on the codes: ``q5`` ``(B, S, H, R, D)`` (R query heads per cache head),
    ``k`` ``(B, T, H, D)`` -> ``(B, H, S, R, T)`` float32.

    * token: the scales lie on the output's axes (per group of D: blocks of the
      contraction), so the product takes the QArray as it is;
    * static: the scale, which may vary along D, multiplies the queries; a zero point
      would subtract ``Σ_d q_d s_d z_d``, the same for every position a query reads, which
      the softmax cancels, so it is left out;
    * block: the keys are dequantized and read by one product (on XLA:CPU 2.4x faster
      than a product per block of 32 tokens: ``experiments/bench_kv_cache.py``); with
      ``q_spec`` the queries are multiplied by each block's scales instead (one copy per
      block, a batch axis of the product) and ``Σ_d q_d s_jd z_jd`` is subtracted per block.

    With ``q_spec`` (axes of the user's ``(batch, S, q_heads, head_dim)``) the queries are
    quantized after the key scales are folded in (static and block keys; each block's
    copy with its own scales), as an integer ``q · k`` with per-channel key scales needs.
    """
    b, s, h, r, d = q5.shape
    t = k.shape[1]
    dn = (((4,), (3,)), ((0, 2), (0, 2)))
    where = {0: (0,), 1: (1,), 2: (2, 3), 3: (4,)}  # user axis -> axes of q5
    kind = mode(k)
    if kind == "token":
        spec = _query_spec(q_spec, where)
        return quantized_dot_general(q5, k, dn, lhs_spec=spec, out_dtype=jnp.float32, method=method)
    if kind == "static":
        scale = _channels(k.scale, k)[:, :, :, None, :]  # (1, 1, H|1, 1, D|1)
        qs = (q5.astype(jnp.float32) * scale).astype(q5.dtype)
        codes, spec = _codes(k, (b, t, h, d)), _query_spec(q_spec, where)
        return quantized_dot_general(qs, codes, dn, lhs_spec=spec, out_dtype=jnp.float32, method=method)
    if q_spec is None:  # block keys, float queries: one product on the dequantized keys
        if method not in ("auto", "dequant"):
            raise ValueError(
                f"method={method!r}: block-scaled keys are read dequantized unless q_spec is given; "
                "use method='auto' or 'dequant', or pass q_spec"
            )
        kd = k.dequantize()
        qd = q5.astype(jnp.promote_types(q5.dtype, kd.dtype))
        return _product("bshrd,bthd->bhsrt", qd, kd.astype(qd.dtype))
    nb, blk = t // k.group_size, k.group_size
    per_block = lambda a: jnp.transpose(a.astype(jnp.float32), (0, 2, 1, 3))[:, :, :, None, None, :]
    qt = jnp.transpose(q5.astype(jnp.float32), (0, 2, 1, 3, 4))[:, :, None]  # (B, H, 1, S, R, D)
    qs = (qt * per_block(k.scale)).astype(q5.dtype)  # (B, H, nb, S, R, D)
    spec = _query_spec(q_spec, {0: (0,), 1: (3,), 2: (1, 4), 3: (5,)}, extra=(2,))
    codes = _codes(k, (b, nb, blk, h, d))
    dn = (((5,), (4,)), ((0, 1, 2), (0, 3, 1)))
    out = quantized_dot_general(qs, codes, dn, lhs_spec=spec, out_dtype=jnp.float32, method=method)
    if k.zero_point is not None:  # out: (B, H, nb, S, R, blk); the term reads the queries the product read
        read = fake_quant(qs, spec).astype(jnp.float32)
        out = out - jnp.sum(read * per_block(k.zero_point), axis=-1)[..., None]
    return jnp.transpose(out, (0, 1, 3, 4, 2, 5)).reshape(b, h, s, r, t)


def _weights_spec(p_spec: QuantSpec | None, ndim: int) -> QuantSpec | None:
    """``p_spec`` (per tensor, or ``PER_TOKEN``: one scale per query row) on the attention
    weights in a product's layout, the length last."""
    if p_spec is None:
        return None
    rows = () if p_spec.channel_axes == () else tuple(range(ndim - 1))
    return p_spec.replace(channel_axes=rows, pack=False)


def weighted_values(probs: jax.Array, v: QArray, p_spec: QuantSpec | None = None) -> jax.Array:
    """``Σ_t probs[..., t] · v[:, t]`` on the codes: ``probs`` ``(B, H, S, R, T)``, ``v``
    ``(B, T, H, D)`` -> ``(B, S, H, R, D)`` float32. With ``p_spec`` the weights (after a
    per-token value scale is folded in) are quantized too, so the product is integer
    (straight-through gradients).

    * token: the scale varies along the contraction: it multiplies the weights, one copy
      per group of D (``Σ_t p_t s_t (c_t - z_t) = Σ_t (p_t s_t) c_t - Σ_t p_t s_t z_t``);
    * static: the scale multiplies the result (``(Σ_t p_t c_t - z Σ_t p_t) s``);
    * block: the values are dequantized and read by one product, the weights cast to
      their dtype (as a float cache of that dtype is read).
    """
    b, h, s, r, t = probs.shape
    d = v.shape[-1]
    kind = mode(v)
    if kind == "static":
        spec = _weights_spec(p_spec, probs.ndim)
        dn = (((4,), (1,)), ((0, 1), (0, 2)))
        out = quantized_dot_general(probs, _codes(v, (b, t, h, d)), dn, lhs_spec=spec, out_dtype=jnp.float32)
        moved = lambda a: jnp.transpose(_channels(a, v), (0, 2, 1, 3))[:, :, :, None, :]
        if v.zero_point is not None:  # out: (B, H, S, R, D); the term reads the weights the product read
            read = probs if spec is None else fake_quant(probs, spec)
            out = out - jnp.sum(read, axis=-1, keepdims=True) * moved(v.zero_point)
        return jnp.transpose(out * moved(v.scale), (0, 2, 1, 3, 4))
    if kind == "block":  # one product on the dequantized values, weights in their dtype
        if p_spec is not None:
            raise ValueError(
                "p_spec: block-scaled values are read dequantized; it needs per-token or static values"
            )
        vd = v.dequantize()
        return _product("bhsrt,bthd->bshrd", probs.astype(vd.dtype), vd)
    gsize = v.group_size if v.group_axis is not None else d
    g = d // gsize
    per_group = lambda a: jnp.transpose(a.astype(jnp.float32), (0, 2, 3, 1))[:, :, :, None, None, :]
    pw = probs[:, :, None] * per_group(v.scale)  # (B, H, G, S, R, T)
    spec = _weights_spec(p_spec, pw.ndim)
    dn = (((5,), (1,)), ((0, 1, 2), (0, 2, 3)))
    out = quantized_dot_general(pw, _codes(v, (b, t, h, g, gsize)), dn, lhs_spec=spec, out_dtype=jnp.float32)
    if v.zero_point is not None:  # out: (B, H, G, S, R, gs)
        read = pw if spec is None else fake_quant(pw, spec)
        out = out - jnp.sum(read * per_group(v.zero_point), axis=-1)[..., None]
    out = jnp.transpose(out, (0, 3, 1, 4, 2, 5))  # (B, S, H, R, G, gs)
    return out.reshape(b, s, h, r, d)
