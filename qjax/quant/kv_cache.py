"""A key/value cache stored as quantized codes: :class:`KVCache`.

Autoregressive decoding keeps every past token's keys and values; at long context they
outweigh the model. :class:`KVCache` stores them as a pair of :class:`qjax.QArray` s of
logical shape ``(batch, length, kv_heads, head_dim)`` (Flax's cache layout), with

* **per-token scales** (``channel_axes`` including the batch and length axes, e.g.
  ``qjax.PER_TOKEN``: one scale per token and head, optionally per group of
  ``head_dim``), computed from each token when it is written, so writing a prompt at once
  or one token at a time stores the same codes; or
* **static scales** (a calibrated per-tensor, per-head or per-channel scale, the fp8
  KV-cache recipe), given once at :meth:`KVCache.init`; or
* **per-channel scales over blocks of tokens** (KIVI: ``group_axis=1``, e.g. keys with
  ``channel_axes=(0, 2, 3), group_size=32``), which follow the outlier channels keys have.
  The last, partly written block of each sequence is kept in float beside the codes and
  re-quantized at every write until it is full, so the cache appends (writes go at
  :attr:`KVCache.lengths`), and a block written at once or token by token stores the same
  codes. :meth:`KVCache.rewind` forgets tokens (speculative decoding).

:meth:`KVCache.attend` computes attention on the codes without dequantizing the cache
(:mod:`qjax.quant.kv_attention`): both products run as
:func:`qjax.quant.ops.quantized_dot_general` on the codes, with each scale applied where it
factors: on the output, or folded into the queries (key scales along ``head_dim``) or
into the attention weights (value scales along the tokens,
``Σ_t p_t s_t (c_t - z_t) = Σ_t (p_t s_t) c_t - Σ_t p_t s_t z_t``), a block of tokens being
a batch axis. The result equals float attention over the dequantized cache to float32
rounding. Grouped-query attention (more query heads than cache heads) is handled by the
shapes.

Example:
  >>> spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
  >>> cache = qjax.KVCache.init(spec, batch=1, length=4096, heads=8, head_dim=128)
  >>> cache = cache.update(k, v, index=pos)          # k, v: (1, S, 8, 128)
  >>> out = cache.attend(q, index=pos)                 # q: (1, S, 32, 128), causal
  >>> kivi = qjax.QuantSpec(qjax.int2, channel_axes=(0, 2, 3), group_size=32, group_axis=1)
  >>> cache = qjax.KVCache.init(kivi, value_spec=spec, batch=1, length=4096, heads=8, head_dim=128)
  >>> cache = cache.update(k, v)                       # appends at cache.lengths
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant import kv_attention as kva
from qjax.quant import kv_checks as kvc
from qjax.quant import kv_rewind
from qjax.quant.kv_attention import B_AXIS as _B
from qjax.quant.kv_attention import T_AXIS as _T


def _quantize_static(cur: QArray, spec: QuantSpec, new: jax.Array, name: str) -> QArray:
    """``new`` quantized by the static scale of ``cur``, one token at a time: a token with a
    NaN / Inf keeps its damage to itself (``quantize`` poisons a whole scale group, here the
    token), stored as NaN codes where the format has them (fp8), else as the codes of 0; a
    concrete one is refused."""
    if kvc.is_concrete(new) and not bool(jnp.all(jnp.isfinite(new))):
        bad = np.argwhere(~np.isfinite(np.asarray(new, np.float32)))[0].tolist()
        raise ValueError(
            f"{name} holds NaN/Inf (first at {bad}): a cache with static scales cannot store it (a "
            "per-token cache stores it as NaN)"
        )
    per_token = spec.replace(channel_axes=tuple(sorted({*cur.channel_axes, _B, _T})))
    qn = quantize(new, per_token, scale=cur.scale, zero_point=cur.zero_point)
    bad = ~jnp.all(jnp.isfinite(qn.scale.astype(jnp.float32)), axis=(-2, -1))[
        :, :, None, None
    ]  # (B, S, 1, 1)
    values = qn.values
    if jnp.issubdtype(values.dtype, jnp.floating) and np.isnan(np.asarray(np.nan, values.dtype)):
        values = jnp.where(bad, jnp.asarray(jnp.nan, values.dtype), values)
    else:  # no NaN code: the codes of 0 (a zero point's code, nf4's 0)
        zero = quantize(jnp.zeros_like(new), per_token, scale=cur.scale, zero_point=cur.zero_point)
        values = jnp.where(bad, zero.values, values)
    return qn.replace_children([values, qn.scale, qn.zero_point, None, None])


def _write(dest: jax.Array, new: jax.Array, cols: jax.Array) -> jax.Array:
    """``dest[b, cols[b]] = new[b]`` for each batch row ``b``. Out-of-range positions
    (possible only with a traced index) are dropped, never wrapped or clamped onto other
    tokens. Mapped over the batch (a scatter with a batching dimension), so a batch axis
    sharded in Explicit mode stays sharded."""
    put = lambda d, n, c: d.at[c].set(n, mode="drop", wrap_negative_indices=False)
    return jax.vmap(put)(dest, new.astype(dest.dtype), _batch_like(cols, dest))


def _batch_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` (batch first) with ``ref``'s batch sharding when the mesh axes are Explicit
    (the batch axis of every operand of a ``vmap`` over it must be sharded alike);
    unchanged otherwise."""
    ref_spec = getattr(getattr(jax.typeof(ref), "sharding", None), "spec", None)
    if ref_spec is None:
        return x
    x_spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    want = ref_spec[0] if len(ref_spec) else None
    have = x_spec[0] if x_spec is not None and len(x_spec) else None
    if want == have:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(want, *(None,) * (x.ndim - 1)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of past tokens as quantized codes (see the module docstring).

    Attributes:
      k, v: :class:`qjax.QArray` s of logical shape ``(batch, length, heads, head_dim)``.
      k_spec, v_spec: their specs (static).
      k_tail, v_tail: for a side scaled per block of tokens, the float values of each
        sequence's last, partly written block ``(batch, block, heads, head_dim)`` (else
        ``None``); its codes are re-quantized from them at every write until it is full.
      lengths: for a cache with a side scaled per block of tokens, the tokens written per
        sequence ``(batch,)`` int32 (writes append there); else ``None``.

    Build one with :meth:`init`. A stack of caches for ``nn.scan`` / ``lax.scan`` layers is
    ``jax.vmap(lambda _: KVCache.init(...))(jnp.arange(layers))``; slice it per layer with
    the scan (its ``QArray`` s have one more leading axis than their metadata says).
    """

    k: QArray
    v: QArray
    k_spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    v_spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    k_tail: jax.Array | None = None
    v_tail: jax.Array | None = None
    lengths: jax.Array | None = None

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
            optionally ``group_size`` along ``group_axis=3``); static (channel axes among 2
            and 3, or groups along 3, with ``k_scale`` / ``v_scale``); or per block of
            tokens (``group_axis=1``, ``group_size`` dividing ``length``, channel axes
            including 0, calibration absmax or minmax). Any format ``quantize`` takes
            (int8, int4 / int2 packed along ``head_dim``, fp8, fp4, nf4, ...).
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
        sides, tails = [], []
        for name, sp, sc, zp in (
            ("spec", spec, k_scale, k_zero_point),
            ("value_spec", value_spec, v_scale, v_zero_point),
        ):
            kind = kvc.check_spec(name, sp, shape, sc, zp)
            first = sp.group_size if kind == "block" else 1  # the tokens quantized together
            one = quantize(jnp.zeros((batch, first, heads, head_dim), dtype), sp, scale=sc, zero_point=zp)
            if kind == "static":
                kvc.check_static(name, one.scale, zp)
            scale, zero = one.scale, one.zero_point
            if kind == "static":  # the codes of 0, so unwritten positions dequantize to 0
                values = jnp.broadcast_to(one.values, (batch, length, *one.values.shape[2:]))
            else:  # codes 0, scale 1 (an e8m0 scale has no 0), zero point 0
                values = jnp.zeros((batch, length, *one.values.shape[2:]), one.values.dtype)
                n = length if kind == "token" else length // first
                scale = jnp.ones((batch, n, *scale.shape[2:]), scale.dtype)
                zero = None if zero is None else jnp.zeros((batch, n, *zero.shape[2:]), zero.dtype)
            sides.append(one.replace_children([values, scale, zero, None, None]))
            tails.append(jnp.zeros((batch, first, heads, head_dim), dtype) if kind == "block" else None)
        lengths = None if tails == [None, None] else jnp.zeros((batch,), jnp.int32)
        return cls(sides[0], sides[1], spec, value_spec, tails[0], tails[1], lengths)

    # -- shape -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, length, heads, head_dim)``; raises ``ValueError`` for a stack of caches."""
        if self.k.ndim != 4:  # jax.vmap(KVCache.init)(...): one cache per layer
            raise ValueError(
                f"this KVCache is a stack of caches (keys {self.k.shape}, leading axes {self.k.shape[:-4]}): "
                "call its methods inside jax.lax.scan / jax.vmap over the stack"
            )
        return tuple(self.k.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, scales and zero points of keys and values (and the float
        tails of sides scaled per block of tokens)."""
        tails = sum(
            t.size * t.dtype.itemsize for t in (self.k_tail, self.v_tail, self.lengths) if t is not None
        )
        return self.k.nbytes + self.v.nbytes + tails

    # -- writing -----------------------------------------------------------------------
    def update(self, k, v, index=None, *, count=None) -> KVCache:
        """Write ``S`` new tokens' keys and values at positions ``index .. index + S - 1``.

        Args:
          k, v: float arrays ``(batch, S, heads, head_dim)``, cast to the cache's dtype.
          index: first position written: an int, or an int array of shape ``(batch,)`` (one
            per sequence). A cache with a side scaled per block of tokens appends: it writes
            at :attr:`lengths` (the tokens written so far); ``index`` may then be left out,
            and when given concretely it must equal them (under ``jit`` it is not checked,
            and ``lengths`` keeps counting past ``length`` while the positions are dropped).
          count: how many of the ``S`` tokens are real, an int or one per sequence (a
            ragged prompt batch padded to ``S``, or continuous batching where some
            sequences add nothing this step); the rest are not written, and an appending
            cache advances each sequence by its count. Default: all ``S``. A concrete count
            outside ``[0, S]`` is refused; under ``jit`` it is clipped to it.

        Returns:
          The updated cache (``S = 0`` returns it unchanged).

        Raises:
          TypeError / ValueError: bad shapes or dtypes; a concrete ``index`` writing
            outside the cache. Under ``jit`` an out-of-range position is dropped (the cache
            is full), never written over another token.
        """
        b, t, h, d = self.shape
        k = kvc.check_kv("k", k, b, h, d)
        v = kvc.check_kv("v", v, b, h, d)
        if k.shape[1] != v.shape[1]:
            raise ValueError(
                f"k and v must write the same number of tokens, got {k.shape[1]} and {v.shape[1]}"
            )
        s = k.shape[1]
        if index is None and self.lengths is None:
            raise ValueError(
                "update needs index= (the first position written): only a cache with a side scaled per "
                "block of tokens appends at its lengths by itself"
            )
        count = kvc.counts(count, b, s)
        new = s if count is None else (np.asarray(count) if kvc.is_concrete(count) else 0)
        idx = self._append_index(index, new) if self.lengths is not None else kvc.positions(index, b, t, new)
        if s == 0:
            return self
        cols = idx[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        if count is not None:  # padding tokens: zeros (no NaN to refuse), sent out of range (dropped)
            real = jnp.arange(s)[None, :] < count[:, None]
            cols = jnp.where(real, cols, t)
            k, v = (jnp.where(real[:, :, None, None], x, 0).astype(x.dtype) for x in (k, v))
        sides, tails = [], []
        for cur, tail, spec, new in (
            (self.k, self.k_tail, self.k_spec, k),
            (self.v, self.v_tail, self.v_spec, v),
        ):
            new = new.astype(cur.dtype)
            kind = kva.mode(cur)
            if kind == "block":
                cur, tail = _append_blocks(cur, tail, spec, new, idx, count)
                sides.append(cur)
                tails.append(tail)
                continue
            if kind == "token":
                qn = quantize(new, spec)
                scale = _write(cur.scale, qn.scale, cols)
                zero = None if cur.zero_point is None else _write(cur.zero_point, qn.zero_point, cols)
            else:
                qn = _quantize_static(cur, spec, new, "k" if cur is self.k else "v")
                scale, zero = cur.scale, cur.zero_point
            values = _write(cur.values, qn.values, cols)
            sides.append(cur.replace_children([values, scale, zero, None, None]))
            tails.append(tail)
        lengths = None if self.lengths is None else idx + (s if count is None else count)
        return dataclasses.replace(
            self, k=sides[0], v=sides[1], k_tail=tails[0], v_tail=tails[1], lengths=lengths
        )

    def rewind(self, lengths) -> KVCache:
        """Forget each sequence's tokens from position ``lengths`` on (speculative decoding's
        rejected drafts): they read as unwritten, and an appending cache continues there.

        A side scaled per block of tokens reopens the block ``lengths`` falls in: inside the
        block still being written it is exact (the cache reads and continues as the one that
        never received the dropped tokens); inside a block already quantized (the dropped
        drafts completed it) the kept tokens continue from their dequantized values, rounded
        a second time at the next write (:mod:`qjax.quant.kv_rewind`).

        Args:
          lengths: the tokens to keep, an int or one per sequence ``(batch,)``; at most the
            tokens written (an appending cache: :attr:`lengths`) or the length (a cache
            written by index, whose positions the caller tracks).

        Returns:
          The rewound cache.

        Raises:
          TypeError / ValueError: ``lengths`` not integers of shape ``()`` or ``(batch,)``, or
            (when concrete) negative or past the tokens written. Traced ones are clipped to
            that range.

        Example:
          >>> cache = cache.update(draft_k, draft_v)           # an appending cache, 4 drafts
          >>> cache = cache.rewind(cache.lengths - 4 + accepted)
          >>> cache = cache.rewind(position + accepted)        # a cache written by index
        """
        return kv_rewind.rewound(self, lengths)

    def _append_index(self, index, new) -> jax.Array:
        """Where an appending cache writes: at its lengths (``index`` must agree)."""
        b, t = self.shape[:2]
        lengths = self.lengths
        if index is not None:
            idx = kvc.positions(index, b, t, new)
            if (
                kvc.is_concrete(idx)
                and kvc.is_concrete(lengths)
                and not np.array_equal(np.asarray(idx), np.asarray(lengths))
            ):
                raise ValueError(
                    f"index {np.asarray(idx).tolist()}: this cache has a side scaled per block of tokens, so "
                    f"it appends at the tokens written so far, lengths={np.asarray(lengths).tolist()} (leave "
                    "index out, or pass those)"
                )
        elif kvc.is_concrete(lengths):
            kvc.positions(lengths, b, t, new)  # the range check
        return lengths

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
        p_spec: QuantSpec | None = None,
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
          q_spec: quantize the queries on the fly too, its axes those of ``q`` (e.g.
            ``QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)``: one scale per query
            token and head), so ``q Kᵀ`` runs as an integer matmul with integer keys. With
            static or block-scaled keys, the key scales (per ``head_dim`` channel) are
            folded into the queries first and the products ``q ⊙ s`` are quantized (one
            copy per block of tokens, each with its own scales): the error is that of
            quantizing ``q ⊙ s``, not ``q``. Gradients pass straight through the query
            quantizer (as ``qjax.fake_quant`` with the spec's ``ste``).
          p_spec: quantize the attention weights too before ``P V`` (per-token or static
            values): ``channel_axes=()`` one scale per call, or ``qjax.PER_TOKEN`` one per
            query row, e.g. ``QuantSpec(qjax.uint8, channel_axes=qjax.PER_TOKEN)`` (the
            weights are not negative), so ``P V`` runs as an integer matmul with integer
            values. A per-token value scale is folded in first (``p ⊙ s``, one copy per
            group of ``head_dim``). Straight-through gradients. With one scale per call,
            every sequence's output depends on the whole batch's weights (and a NaN
            anywhere reaches all of them).
          method: ``quantized_dot_general``'s formulation of ``q Kᵀ`` (``"int"`` needs
            ``q_spec`` and integer keys); ``P V`` uses ``"auto"``.

        Returns:
          ``(batch, S, q_heads, head_dim)`` in ``q``'s dtype. A query that may read no
          position gets zeros. A NaN / Inf key reaches the queries that read its position;
          a NaN / Inf value (its token's scale) reaches every query of its sequence and
          head, read or not (``0 × NaN`` in ``p·v``, as in float attention).

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
        for name, spec in (("q_spec", q_spec), ("p_spec", p_spec)):
            if isinstance(spec, QuantSpec) and spec.rounding != "nearest":
                raise ValueError(
                    f"{name}: attend takes no PRNG key; use rounding='nearest', got {spec.rounding!r}"
                )
        if q_spec is not None:
            if not isinstance(q_spec, QuantSpec):
                raise TypeError(f"q_spec must be a qjax.QuantSpec or None, got {type(q_spec).__name__}")
            try:
                q_spec.layout(q.shape)
            except ValueError as e:
                raise ValueError(f"q_spec (over q of shape {tuple(q.shape)}): {e}") from None
        if p_spec is not None:
            if not isinstance(p_spec, QuantSpec):
                raise TypeError(f"p_spec must be a qjax.QuantSpec or None, got {type(p_spec).__name__}")
            if p_spec.group_axis is not None or p_spec.channel_axes not in ((), PER_TOKEN):
                raise ValueError(
                    "p_spec: the attention weights take one scale per call (channel_axes=()) or per query "
                    f"row (qjax.PER_TOKEN), without groups; got {p_spec!r}"
                )
        s, r = q.shape[1], q.shape[2] // h
        visible = jnp.ones((b, 1, s, t), bool)
        if index is not None:
            idx = kvc.positions(index, b, t, s, verb="reads")
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

        scores = kva.scores(q.reshape(b, s, h, r, d), self.k, q_spec, method)  # (B, H, S, R, T)
        scores = scores * (1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale)
        scores = jnp.where(visible, scores, -jnp.inf)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        probs = weights / jnp.where(total > 0, total, 1.0)
        out = kva.weighted_values(probs, self.v, p_spec)  # (B, S, H, R, D)
        return out.reshape(b, s, h * r, d).astype(q.dtype)


def _append_blocks(
    cur: QArray, tail: jax.Array, spec: QuantSpec, new: jax.Array, start: jax.Array, count: jax.Array | None
):
    """Append ``new`` ``(B, S, H, D)`` at positions ``start`` ``(B,)`` of a side scaled per
    block of tokens: the partly written block (its floats in ``tail``) and the new tokens
    form a window of whole blocks, quantized per block and written over those blocks
    (positions after the new tokens are unwritten: their codes are zeros); the new last
    partial block's floats become the tail. Only the first ``count`` (per sequence) of the
    new tokens are real (the others are zeros, as unwritten positions). Returns
    ``(QArray, tail)``."""
    s = new.shape[1]
    blk = cur.group_size
    width = blk * -(-(blk + s) // blk)  # whole blocks holding a partial block and the new tokens
    start = _batch_like(start, new)
    real = s if count is None else _batch_like(count, new)  # the tokens after it are zeros
    filled = start % blk  # (B,) tokens already in the partial block
    first = start - filled  # (B,) its first position
    kept = jnp.where((jnp.arange(blk) < filled[:, None])[:, :, None, None], tail, 0)
    window = jnp.pad(kept, ((0, 0), (0, width - blk), (0, 0), (0, 0)))  # keeps an Explicit sharding
    window = jax.vmap(lambda w, n, o: jax.lax.dynamic_update_slice_in_dim(w, n, o, axis=0))(
        window, new, filled
    )
    qw = quantize(window, spec)  # unwritten positions are zeros, which absmax / minmax ignore
    cols = first[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    blocks = first[:, None] // blk + jnp.arange(width // blk, dtype=jnp.int32)[None, :]
    values = _write(cur.values, qw.values, cols)
    scale = _write(cur.scale, qw.scale, blocks)
    zero = None if cur.zero_point is None else _write(cur.zero_point, qw.zero_point, blocks)
    offset = (filled + real) // blk * blk  # (B,) where the new partial block starts in the window
    tail = jax.vmap(lambda w, o: jax.lax.dynamic_slice_in_dim(w, o, blk, axis=0))(window, offset)
    return cur.replace_children([values, scale, zero, None, None]), tail


__all__ = ["KVCache"]
