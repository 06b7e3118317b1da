"""A key/value cache stored as quantized codes: :class:`KVCache`.

Autoregressive decoding keeps every past token's keys and values; at long context they
outweigh the model. :class:`KVCache` stores them as a pair of :class:`qjax.QArray` s of
logical shape ``(batch, length, kv_heads, head_dim)`` (Flax's cache layout), with

* **per-token scales** (``channel_axes`` including the batch and length axes, e.g.
  ``qjax.PER_TOKEN``: one scale per token and head, optionally per group of
  ``head_dim``), computed from each token when it is written, so writing a prompt at once
  or one token at a time stores the same codes; or
* **static scales** (a calibrated per-tensor or per-head scale, the fp8 KV-cache recipe),
  given once at :meth:`KVCache.init`.

:meth:`KVCache.attend` computes attention on the codes without dequantizing the cache:
``q Kᵀ`` is :func:`qjax.quant.ops.quantized_dot_general` against the key codes (their
scales lie on the output's axes), and for ``P V`` each value token's scale (which varies
along the contraction) is folded into the probabilities first, so the product again runs
on the codes (``Σ_t p_t s_t (c_t - z_t) = Σ_t (p_t s_t) c_t - Σ_t p_t s_t z_t``). The result
equals float attention over the dequantized cache to float32 rounding. Grouped-query
attention (more query heads than cache heads) is handled by the shapes.

Example:
  >>> spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
  >>> cache = qjax.KVCache.init(spec, batch=1, length=4096, heads=8, head_dim=128)
  >>> cache = cache.update(k, v, index=pos)          # k, v: (1, S, 8, 128)
  >>> out = cache.attend(q, index=pos)                 # q: (1, S, 32, 128), causal
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec
from qjax.quant.ops_dot import quantized_dot_general

_B, _T, _H, _D = -4, -3, -2, -1  # axes of the cache layout (batch, length, heads, head_dim)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_spec(name: str, spec, shape, scale, zero_point) -> bool:
    """Validate a cache side's spec; return whether its scales are per token."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name}: expected a qjax.QuantSpec, got {type(spec).__name__}")
    if spec.rounding != "nearest":
        raise ValueError(f"{name}: a KV cache rounds to nearest; got rounding={spec.rounding!r}")
    layout = spec.layout(shape)
    if layout.group_axis not in (None, _D):
        raise ValueError(
            f"{name}: groups must run along head_dim (axis 3 of (batch, length, heads, head_dim)), "
            f"got group_axis={spec.group_axis}"
        )
    if layout.group_axis is not None and shape[_D] % layout.group_size:
        raise ValueError(f"{name}: group_size={layout.group_size} must divide head_dim={shape[_D]}")
    if spec.packed and spec.pack_axis % 4 != 3:
        raise ValueError(
            f"{name}: packed codes must be packed along head_dim (pack_axis=-1), got pack_axis="
            f"{spec.pack_axis}: tokens are written one at a time"
        )
    per_token = _T in layout.channel_axes
    if per_token:
        if _B not in layout.channel_axes:
            raise ValueError(
                f"{name}: per-token scales must also be per batch row (channel_axes must include axes 0 "
                f"and 1, e.g. qjax.PER_TOKEN), got channel_axes={spec.channel_axes}"
            )
        if scale is not None or zero_point is not None:
            raise ValueError(
                f"{name}: a per-token spec computes its scales from each written token; a static "
                "scale / zero point needs a spec without the length axis in channel_axes"
            )
        if _D in layout.channel_axes:
            raise ValueError(
                f"{name}: per-token scales may vary along head_dim only per group (group_size along axis "
                f"3), got channel_axes={spec.channel_axes}; per-channel scales are static (without axis 1)"
            )
        return True
    if _B in layout.channel_axes:
        raise ValueError(
            f"{name}: a static cache scale may vary along heads and head_dim only, not along the batch "
            f"axis (channel_axes={spec.channel_axes})"
        )
    if scale is None:
        raise ValueError(
            f"{name}: the spec has no per-token scale (axis 1 is not in channel_axes={spec.channel_axes}), "
            "so it needs a static scale: pass it to KVCache.init (e.g. qjax.compute_scale(samples, spec)), "
            "or use channel_axes=qjax.PER_TOKEN"
        )
    return False


def _check_kv(name: str, x, batch: int, heads: int, head_dim: int):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"{name} must have shape (batch, new_tokens, heads, head_dim) = ({batch}, S, {heads}, "
            f"{head_dim}), got {tuple(x.shape)}"
        )
    return x


def _positions(index, batch: int, length: int, new: int):
    """``index`` as an int32 ``(batch,)`` array, checked when concrete."""
    idx = jnp.asarray(index)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"index must be an integer scalar or (batch,) array, got dtype {idx.dtype}")
    if idx.ndim > 1 or (idx.ndim == 1 and idx.shape[0] != batch):
        raise ValueError(f"index must be a scalar or have shape ({batch},), got {tuple(idx.shape)}")
    if _is_concrete(idx):
        host = np.asarray(idx)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi + new > length:
            raise ValueError(
                f"index {host.tolist()} with {new} new tokens writes outside the cache's "
                f"length {length} (positions 0..{length - 1})"
            )
    return jnp.broadcast_to(idx.astype(jnp.int32), (batch,))


def _write(dest: jax.Array, new: jax.Array, cols: jax.Array) -> jax.Array:
    """``dest[b, cols[b]] = new[b]`` for each batch row ``b``. Out-of-range positions
    (possible only with a traced index) are dropped, never wrapped or clamped onto other
    tokens. Mapped over the batch (a scatter with a batching dimension), so a batch axis
    sharded in Explicit mode stays sharded."""
    spec = getattr(getattr(jax.typeof(dest), "sharding", None), "spec", None)
    if spec is not None and len(spec) and spec[0] is not None:  # Explicit mesh axes
        cols = jax.sharding.reshard(cols, jax.sharding.PartitionSpec(spec[0], None))
    put = lambda d, n, c: d.at[c].set(n, mode="drop", wrap_negative_indices=False)
    return jax.vmap(put)(dest, new.astype(dest.dtype), cols)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of past tokens as quantized codes (see the module docstring).

    Attributes:
      k, v: :class:`qjax.QArray` s of logical shape ``(batch, length, heads, head_dim)``.
      k_spec, v_spec: their specs (static).

    Build one with :meth:`init`. A stack of caches for ``nn.scan`` / ``lax.scan`` layers is
    ``jax.vmap(lambda _: KVCache.init(...))(jnp.arange(layers))``; slice it per layer with
    the scan (its ``QArray`` s have one more leading axis than their metadata says).
    """

    k: QArray
    v: QArray
    k_spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    v_spec: QuantSpec = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        spec: QuantSpec,
        *,
        batch: int,
        length: int,
        heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        value_spec: QuantSpec | None = None,
        k_scale=None,
        k_zero_point=None,
        v_scale=None,
        v_zero_point=None,
    ) -> KVCache:
        """An empty cache (all codes zero).

        Args:
          spec: the keys' :class:`qjax.QuantSpec` over ``(batch, length, heads, head_dim)``:
            per token (``channel_axes=qjax.PER_TOKEN``, or explicit axes including 0 and 1,
            optionally ``group_size`` along ``group_axis=3``), or static (axes among 2 and
            groups of 3 only, with ``k_scale`` / ``v_scale``). Any format ``quantize`` takes
            (int8, int4 packed along ``head_dim``, fp8, ...).
          batch, length, heads, head_dim: the cache's shape (``heads``: key/value heads).
          dtype: the float dtype the cache stands for (keys and values are cast to it when
            written; :meth:`dequantize` returns it).
          value_spec: the values' spec (default: ``spec``).
          k_scale, k_zero_point, v_scale, v_zero_point: static scales (and zero points for
            asymmetric specs), broadcastable to the spec's scale shape; only for specs
            without per-token scales.

        Returns:
          A :class:`KVCache`.

        Raises:
          TypeError / ValueError: a bad spec, shape or scale; the message names it.
        """
        value_spec = spec if value_spec is None else value_spec
        dims = dict(batch=batch, length=length, heads=heads, head_dim=head_dim)
        for name, n in dims.items():
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"dtype must be a float dtype, got {dtype}")
        shape = (batch, length, heads, head_dim)
        sides = []
        for name, sp, sc, zp in (
            ("spec", spec, k_scale, k_zero_point),
            ("value_spec", value_spec, v_scale, v_zero_point),
        ):
            per_token = _check_spec(name, sp, shape, sc, zp)
            one = quantize(jnp.zeros((batch, 1, heads, head_dim), dtype), sp, scale=sc, zero_point=zp)
            values = jnp.zeros((batch, length, *one.values.shape[2:]), one.values.dtype)
            scale, zero = one.scale, one.zero_point
            if per_token:
                scale = jnp.zeros((batch, length, *scale.shape[2:]), scale.dtype)
                zero = None if zero is None else jnp.zeros((batch, length, *zero.shape[2:]), zero.dtype)
            sides.append(one.replace_children([values, scale, zero, None, None]))
        return cls(sides[0], sides[1], spec, value_spec)

    # -- shape -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, length, heads, head_dim)``."""
        return tuple(self.k.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, scales and zero points of keys and values."""
        return self.k.nbytes + self.v.nbytes

    def _per_token(self, q: QArray) -> bool:
        return _T in q.channel_axes

    # -- writing -----------------------------------------------------------------------
    def update(self, k, v, index) -> KVCache:
        """Write ``S`` new tokens' keys and values at positions ``index .. index + S - 1``.

        Args:
          k, v: float arrays ``(batch, S, heads, head_dim)``, cast to the cache's dtype.
          index: first position written: an int, or an int array of shape ``(batch,)`` (one
            per sequence).

        Returns:
          The updated cache (``S = 0`` returns it unchanged).

        Raises:
          TypeError / ValueError: bad shapes or dtypes; a concrete ``index`` writing
            outside the cache. Under ``jit`` an out-of-range position is dropped (the cache
            is full), never written over another token.
        """
        b, t, h, d = self.shape
        k = _check_kv("k", k, b, h, d)
        v = _check_kv("v", v, b, h, d)
        if k.shape[1] != v.shape[1]:
            raise ValueError(
                f"k and v must write the same number of tokens, got {k.shape[1]} and {v.shape[1]}"
            )
        s = k.shape[1]
        idx = _positions(index, b, t, s)
        if s == 0:
            return self
        cols = idx[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        sides = []
        for cur, spec, new in ((self.k, self.k_spec, k), (self.v, self.v_spec, v)):
            new = new.astype(cur.dtype)
            if self._per_token(cur):
                qn = quantize(new, spec)
                scale = _write(cur.scale, qn.scale, cols)
                zero = None if cur.zero_point is None else _write(cur.zero_point, qn.zero_point, cols)
            else:
                qn = quantize(new, spec, scale=cur.scale, zero_point=cur.zero_point)
                scale, zero = cur.scale, cur.zero_point
            values = _write(cur.values, qn.values, cols)
            sides.append(cur.replace_children([values, scale, zero, None, None]))
        return dataclasses.replace(self, k=sides[0], v=sides[1])

    # -- reading -----------------------------------------------------------------------
    def dequantize(self) -> tuple[jax.Array, jax.Array]:
        """The keys and values the cache stands for (unwritten positions are 0)."""
        return self.k.dequantize(), self.v.dequantize()

    def attend(
        self,
        q,
        index=None,
        *,
        mask=None,
        softmax_scale: float | None = None,
        q_spec: QuantSpec | None = None,
        method: str = "auto",
    ) -> jax.Array:
        """Softmax attention of ``q`` over the cache, computed on its codes.

        Args:
          q: queries ``(batch, S, q_heads, head_dim)``; ``q_heads`` a multiple of the cache's
            heads (query head ``j`` reads cache head ``j // (q_heads // heads)``).
          index: the position of ``q[:, 0]`` (an int or ``(batch,)``, as given to
            :meth:`update`): query ``s`` sees cache positions ``<= index + s`` (causal, and
            no unwritten position).
          mask: boolean, broadcastable to ``(batch, q_heads, S, length)``, ``True`` where a
            query may read a position; combined with ``index`` when both are given. At
            least one of them is required.
          softmax_scale: multiplies ``q Kᵀ`` (default ``1 / sqrt(head_dim)``).
          q_spec: quantize the queries on the fly too (e.g. ``QuantSpec(qjax.int8,
            channel_axes=qjax.PER_TOKEN)``, one scale per query token and head), so
            ``q Kᵀ`` runs as an integer matmul with int8 keys.
          method: ``quantized_dot_general``'s formulation for both products.

        Returns:
          ``(batch, S, q_heads, head_dim)`` in ``q``'s dtype. A query that may read no
          position gets zeros.

        Raises:
          TypeError / ValueError: bad shapes, dtypes or arguments; the message names them.
        """
        b, t, h, d = self.shape
        q = jnp.asarray(q)
        if not jnp.issubdtype(q.dtype, jnp.floating):
            raise TypeError(f"q must be a float array, got dtype {q.dtype}")
        if q.ndim != 4 or q.shape[0] != b or q.shape[3] != d or q.shape[2] % h:
            raise ValueError(
                f"q must have shape (batch, S, q_heads, head_dim) = ({b}, S, a multiple of {h}, {d}), "
                f"got {tuple(q.shape)}"
            )
        if index is None and mask is None:
            raise ValueError(
                "attend needs index= (causal, and unwritten positions hidden) or mask=: without "
                "them every position of the cache, written or not, would be read"
            )
        s, r = q.shape[1], q.shape[2] // h
        visible = jnp.ones((b, 1, s, t), bool)
        if index is not None:
            idx = _positions(index, b, t, s)
            last = idx[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # (B, S)
            visible = (jnp.arange(t)[None, None, :] <= last[:, :, None])[:, None]
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.dtype != jnp.bool_:
                raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
            try:
                visible = visible & jnp.broadcast_to(mask, (b, h * r, s, t))
            except ValueError:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, q_heads, S, length) = "
                    f"{(b, h * r, s, t)}"
                ) from None
        # (B, q_heads, S, T) -> (B, H, S, R, T), the layout of the scores below.
        visible = jnp.broadcast_to(visible, (b, h * r, s, t)).reshape(b, h, r, s, t).swapaxes(2, 3)

        scores = _scores(q.reshape(b, s, h, r, d), self.k, q_spec, method)  # (B, H, S, R, T)
        scores = scores * (1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale)
        scores = jnp.where(visible, scores, -jnp.inf)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        probs = weights / jnp.where(total > 0, total, 1.0)
        out = _weighted_values(probs, self.v, method)  # (B, S, H, R, D)
        return out.reshape(b, s, h * r, d).astype(q.dtype)


def _static_channels(a: jax.Array, q: QArray) -> jax.Array:
    """A static scale or zero point of ``q`` ``(1, 1, H|1, G|D|1)`` -> float32 ``(1, 1, H|1, D|1)``."""
    a = a.astype(jnp.float32)
    if q.group_axis is not None:
        a = jnp.repeat(a, q.group_size, axis=-1)
    return a


def _codes(q: QArray, groups: int | None = None) -> QArray:
    """The codes of a ``(B, T, H, D)`` QArray as a ``(B, T, H, G, D / G)`` QArray (or
    ``(B, T, H, D)`` for ``groups=None``) with a per-tensor scale of 1 and no zero point, for
    a product whose scales are applied around it."""
    b, t, h, d = q.shape
    values, packed_axis = q.values, q.packed_axis
    gsize = d // (groups or 1)
    per = 8 // q.format.pack_bits if packed_axis is not None else 1
    if packed_axis is not None and gsize % per:
        # groups split a byte: run on the unpacked codes (this copy costs one read)
        values, packed_axis, per = q.unpacked_values(), None, 1
    shape = (b, t, h, gsize // per) if groups is None else (b, t, h, groups, gsize // per)
    return QArray(
        values.reshape(shape),
        jnp.ones((1,) * len(shape), jnp.float32),
        format=q.format,
        dtype=jnp.float32,
        packed_axis=None if packed_axis is None else -1,
        packed_length=None if packed_axis is None else gsize,
    )


def _scores(q5: jax.Array, k: QArray, q_spec: QuantSpec | None, method: str) -> jax.Array:
    """``q · k`` on the codes: ``q5`` ``(B, S, H, R, D)``, ``k`` ``(B, T, H, D)`` ->
    ``(B, H, S, R, T)`` float32.

    Per-token key scales lie on the output's axes (per group of D: blocks of the
    contraction), so the product takes the QArray as it is. A static scale, which may vary
    along D, multiplies the queries instead; a static zero point would subtract
    ``Σ_d q_d s_d z_d``, the same for every position of a query, which the softmax cancels,
    so it is left out."""
    dn = (((4,), (3,)), ((0, 2), (0, 2)))
    if _T in k.channel_axes:
        return quantized_dot_general(q5, k, dn, lhs_spec=q_spec, out_dtype=jnp.float32, method=method)
    scale = _static_channels(k.scale, k)[:, :, :, None, :]  # (1, 1, H|1, 1, D|1)
    qs = (q5.astype(jnp.float32) * scale).astype(q5.dtype)
    return quantized_dot_general(qs, _codes(k), dn, lhs_spec=q_spec, out_dtype=jnp.float32, method=method)


def _weighted_values(probs: jax.Array, v: QArray, method: str) -> jax.Array:
    """``Σ_t probs[..., t] · v[:, t]`` on the codes: ``probs`` ``(B, H, S, R, T)``, ``v`` a
    ``(B, T, H, D)`` QArray -> ``(B, S, H, R, D)`` float32.

    A per-token scale varies along the contraction: it multiplies the weights, one copy
    per group of D (``Σ_t p_t s_t (c_t - z_t) = Σ_t (p_t s_t) c_t - Σ_t p_t s_t z_t``). A
    static scale multiplies the result (``(Σ_t p_t c_t - z Σ_t p_t) s``)."""
    d = v.shape[-1]
    if _T not in v.channel_axes:
        out = quantized_dot_general(
            probs, _codes(v), (((4,), (1,)), ((0, 1), (0, 2))), out_dtype=jnp.float32, method=method
        )  # (B, H, S, R, D)
        moved = lambda a: jnp.transpose(_static_channels(a, v), (0, 2, 1, 3))[:, :, :, None, :]
        if v.zero_point is not None:
            out = out - jnp.sum(probs, axis=-1, keepdims=True) * moved(v.zero_point)
        return jnp.transpose(out * moved(v.scale), (0, 2, 1, 3, 4))
    gsize = v.group_size if v.group_axis is not None else d
    g = d // gsize
    per_group = lambda a: jnp.transpose(a.astype(jnp.float32), (0, 2, 3, 1))[:, :, :, None, None, :]
    pw = probs[:, :, None] * per_group(v.scale)  # (B, H, G, S, R, T)
    dn = (((5,), (1,)), ((0, 1, 2), (0, 2, 3)))
    out = quantized_dot_general(pw, _codes(v, g), dn, out_dtype=jnp.float32, method=method)  # (B,H,G,S,R,gs)
    if v.zero_point is not None:
        out = out - jnp.sum(pw * per_group(v.zero_point), axis=-1)[..., None]
    out = jnp.transpose(out, (0, 3, 1, 4, 2, 5))  # (B, S, H, R, G, gs)
    return out.reshape(*out.shape[:4], d)


__all__ = ["KVCache"]
