"""A paged key/value cache stored as codes: :class:`PagedKVCache` (vLLM's PagedAttention
layout).

Continuous batching serves many sequences of unknown final length from one pool of memory:
the cache is cut into pages of ``page_size`` tokens, and each sequence owns a list of pages
(its row of a *page table*, kept by the caller's scheduler, as vLLM's block manager does).
Sequences may share full pages (a common prompt prefix, stored once and not written
again); a row may not hold a page twice.

The pool is a :class:`qjax.KVCache` whose batch axis indexes pages:
``(num_pages, page_size, heads, head_dim)`` codes with per-token or static scales, so a
page stores exactly what a contiguous cache stores for the same tokens. Writing token ``i``
of a sequence puts its codes (and per-token scale) in page ``page_table[b, i // page_size]``
at slot ``i % page_size``; attention gathers a sequence's pages into the contiguous layout
and runs :meth:`qjax.KVCache.attend` on the codes, so the result equals that of a
contiguous cache holding the same tokens, bit for bit. Scales per block of tokens (KIVI)
are not paged (their float tail is per sequence).

Example:
  >>> spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
  >>> cache = qjax.PagedKVCache.init(spec, num_pages=1024, page_size=16, heads=8, head_dim=128)
  >>> table = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]])   # 2 sequences, 4 pages each
  >>> cache = cache.update(k, v, table, index=lengths)    # k, v: (2, S, 8, 128)
  >>> out = cache.attend(q, table, index=lengths)         # q: (2, S, 32, 128), causal
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec
from qjax.quant import kv_attention as kva
from qjax.quant import kv_checks as kvc
from qjax.quant.kv_cache import KVCache, _quantize_static


def _table(page_table, batch: int | None, num_pages: int) -> jax.Array:
    t = jnp.asarray(page_table)
    if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim != 2 or (batch is not None and t.shape[0] != batch):
        want = "(batch, pages_per_sequence)" if batch is None else f"({batch}, pages_per_sequence)"
        raise ValueError(
            f"page_table must be an integer array of shape {want}, got {t.dtype} {tuple(t.shape)}"
        )
    if kvc.is_concrete(t) and t.size:
        host = np.asarray(t)
        bad = host[(host < 0) | (host >= num_pages)]
        if bad.size:
            raise ValueError(f"page_table holds page {int(bad[0])}, outside the pool's {num_pages} pages")
        for row, pages in enumerate(host):
            if len(set(pages.tolist())) != len(pages):
                raise ValueError(
                    f"page_table row {row} holds a page twice ({pages.tolist()}): a sequence's positions "
                    "would overwrite each other (sequences may share pages, a row may not repeat one)"
                )
    return t.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Keys and values in a pool of pages (see the module docstring).

    Attributes:
      pool: a :class:`qjax.KVCache` of shape ``(num_pages, page_size, heads, head_dim)``.
    """

    pool: KVCache

    @classmethod
    def init(
        cls,
        spec: QuantSpec,
        *,
        num_pages: int,
        page_size: int,
        heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        value_spec: QuantSpec | None = None,
        k_scale=None,
        k_zero_point=None,
        v_scale=None,
        v_zero_point=None,
    ) -> PagedKVCache:
        """An empty pool (all codes zero).

        Args:
          spec, value_spec, dtype, k_scale, k_zero_point, v_scale, v_zero_point: as for
            :meth:`qjax.KVCache.init` (per-token or static scales; not per block of tokens).
          num_pages, page_size, heads, head_dim: the pool's shape.

        Returns:
          A :class:`PagedKVCache`.

        Raises:
          TypeError / ValueError: as :meth:`qjax.KVCache.init`, or a spec scaled per block
            of tokens.
        """
        for name, n in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {n!r}")
        for name, sp in (("spec", spec), ("value_spec", value_spec)):
            if isinstance(sp, QuantSpec) and sp.group_axis is not None and sp.group_axis % 4 == 1:
                raise ValueError(
                    f"PagedKVCache: {name} scales per block of tokens (group_axis=1, KIVI), which keep a "
                    "float tail per sequence and are not paged; use per-token or static scales"
                )
        pool = KVCache.init(
            spec,
            batch=num_pages,
            length=page_size,
            heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            value_spec=value_spec,
            k_scale=k_scale,
            k_zero_point=k_zero_point,
            v_scale=v_scale,
            v_zero_point=v_zero_point,
        )
        if pool.lengths is not None:
            raise ValueError(
                "PagedKVCache: scales per block of tokens (group_axis=1, KIVI) keep a float tail per "
                "sequence and are not paged; use per-token or static scales"
            )
        return cls(pool)

    @property
    def num_pages(self) -> int:
        return self.pool.shape[0]

    @property
    def page_size(self) -> int:
        return self.pool.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's codes, scales and zero points."""
        return self.pool.nbytes

    def update(self, k, v, page_table, index, *, count=None) -> PagedKVCache:
        """Write ``S`` new tokens of each sequence at its positions ``index .. index + S - 1``.

        Args:
          k, v: float arrays ``(batch, S, heads, head_dim)``.
          page_table: int ``(batch, pages_per_sequence)``: the pool page holding each
            sequence's positions ``[j · page_size, (j + 1) · page_size)``.
          index: first position written, an int or one per sequence ``(batch,)``.
          count: how many of the ``S`` tokens are real (an int or one per sequence); the
            rest are not written. Default: all.

        Returns:
          The updated cache. Under ``jit`` a position past the sequence's pages is dropped,
          never written over another page.

        Raises:
          TypeError / ValueError: bad shapes or dtypes, a page outside the pool, or a
            concrete ``index`` writing past the sequence's pages.
        """
        pool = self.pool
        h, d = pool.shape[2:]
        k = jnp.asarray(k)
        if k.ndim != 4:
            raise ValueError(f"k must have shape (batch, new_tokens, {h}, {d}), got {tuple(k.shape)}")
        k = kvc.check_kv("k", k, k.shape[0], h, d)
        b, s = k.shape[:2]
        v = kvc.check_kv("v", v, b, h, d)
        if v.shape[1] != s:
            raise ValueError(f"k and v must write the same number of tokens, got {s} and {v.shape[1]}")
        table = _table(page_table, b, self.num_pages)
        capacity = table.shape[1] * self.page_size
        count = kvc.counts(count, b, s)
        new = s if count is None else (np.asarray(count) if kvc.is_concrete(count) else 0)
        idx = kvc.positions(index, b, capacity, new)
        if s == 0:
            return self
        pos = idx[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # (B, S)
        real = (pos >= 0) & (pos < capacity)  # a traced index out of range: dropped
        if count is not None:
            real &= jnp.arange(s)[None, :] < count[:, None]
            k, v = (jnp.where(real[:, :, None, None], x, 0).astype(x.dtype) for x in (k, v))
        column = jnp.clip(pos // self.page_size, 0, table.shape[1] - 1)
        page = jnp.take_along_axis(table, column, axis=1)
        real &= (page >= 0) & (page < self.num_pages)  # a traced page id outside the pool: dropped
        page = jnp.where(real, page, self.num_pages)
        slot = pos % self.page_size
        sides = []
        for cur, spec, x in ((pool.k, pool.k_spec, k), (pool.v, pool.v_spec, v)):
            x = x.astype(cur.dtype)
            put = lambda dest, val: dest.at[page, slot].set(
                val.astype(dest.dtype), mode="drop", wrap_negative_indices=False
            )
            if kva.mode(cur) == "token":
                qn = quantize(x, spec)
                scale = put(cur.scale, qn.scale)
                zero = None if cur.zero_point is None else put(cur.zero_point, qn.zero_point)
            else:  # static scales
                qn = _quantize_static(cur, spec, x, "k" if cur is pool.k else "v")
                scale, zero = cur.scale, cur.zero_point
            sides.append(cur.replace_children([put(cur.values, qn.values), scale, zero, None, None]))
        return PagedKVCache(dataclasses.replace(pool, k=sides[0], v=sides[1]))

    def gather(self, page_table) -> KVCache:
        """Each sequence's pages as a contiguous :class:`qjax.KVCache`
        ``(batch, pages_per_sequence · page_size, heads, head_dim)`` (the codes and scales
        copied, not dequantized)."""
        return self._gather(_table(page_table, None, self.num_pages))

    def _gather(self, table: jax.Array) -> KVCache:
        """:meth:`gather` of a checked int32 page table."""
        b, n = table.shape

        def rows(x):  # (num_pages, page_size, ...) -> (batch, n * page_size, ...)
            if x is None:
                return None
            # a traced id outside the pool (padding, -1) reads a page of the pool, never fill
            # values (NaN scales would reach every query through 0 x NaN)
            y = jnp.take(x, table.reshape(-1), axis=0, mode="clip")
            return y.reshape(b, n * x.shape[1], *x.shape[2:])

        def side(q):
            if kva.mode(q) == "token":
                return q.replace_children([rows(q.values), rows(q.scale), rows(q.zero_point), None, None])
            return q.replace_children([rows(q.values), q.scale, q.zero_point, None, None])  # static

        pool = self.pool
        return dataclasses.replace(pool, k=side(pool.k), v=side(pool.v))

    def attend(self, q, page_table, index=None, **kwargs) -> jax.Array:
        """:meth:`qjax.KVCache.attend` over each sequence's pages (``index`` / ``mask`` and
        the other keywords as there). Positions of pages not written for this sequence
        (a traced padding id outside the pool reads some page of it) must be hidden by
        ``index`` or ``mask``, as unwritten positions of a contiguous cache are.

        Raises:
          ValueError: a page table whose rows do not match ``q``'s batch; as
            :meth:`qjax.KVCache.attend`.
        """
        table = _table(page_table, None, self.num_pages)
        if np.ndim(q) >= 1 and table.shape[0] != np.shape(q)[0]:
            raise ValueError(
                f"page_table has {table.shape[0]} rows (sequences) but q has batch {np.shape(q)[0]}"
            )
        return self._gather(table).attend(q, index, **kwargs)  # the table is checked once


__all__ = ["PagedKVCache"]
