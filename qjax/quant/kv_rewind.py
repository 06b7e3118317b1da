"""Rewinding a :class:`qjax.KVCache`: forget each sequence's last tokens (speculative
decoding's rejected drafts, a beam dropped) so that the next write continues from there.

Every side's positions from the new length on read as unwritten: they dequantize to 0 (an
empty cache's codes, or the codes of quantized zeros in the block the new length falls in).
A side scaled per block of tokens (KIVI) also reopens that block:

* inside the block that was still being written, the kept tokens' float values are in the
  tail: the cache reads, and goes on writing, exactly as the one that never received the
  dropped tokens (its arrays may differ where nothing reads them);
* inside a block already quantized, the kept tokens' floats are gone: the tail takes their
  dequantized values, so the block's next quantization (with the tokens written next)
  rounds them a second time. The cache is then the one that received those tokens'
  dequantized values, not their original floats.

Reopening dequantizes one block per sequence; clearing the dropped positions touches every
position of the cache once (elementwise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.quant import kv_attention as kva
from qjax.quant import kv_checks as kvc


def new_lengths(cache, lengths) -> jax.Array:
    """``lengths`` as an int32 ``(batch,)`` array in ``[0, current]``: checked when concrete
    (a rewind never moves forward), clipped when traced."""
    b, t = cache.shape[:2]
    n = jnp.asarray(lengths)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        raise TypeError(f"rewind: lengths must be an integer scalar or (batch,) array, got dtype {n.dtype}")
    if n.ndim > 1 or (n.ndim == 1 and n.shape[0] != b):
        raise ValueError(f"rewind: lengths must be a scalar or have shape ({b},), got {tuple(n.shape)}")
    current = jnp.full((b,), t, jnp.int32) if cache.lengths is None else cache.lengths
    if kvc.is_concrete(lengths):  # checked whenever it is known (an int under jit too)
        host = np.broadcast_to(np.asarray(lengths), (b,)).astype(np.int64)
        have = np.asarray(current) if kvc.is_concrete(current) else None
        if host.min() < 0 or (host > (t if have is None else have)).any():
            if cache.lengths is None:
                bound = f"{t}, the cache's length"
            elif have is None:  # traced lengths: the cache's length is what is known
                bound = f"{t}"
            else:
                bound = f"lengths={have.tolist()}, the tokens written"
            raise ValueError(
                f"rewind: lengths {host.tolist()} must each lie in [0, {bound}]: a rewind only forgets tokens"
            )
    n = jnp.clip(n, 0, np.iinfo(np.int32).max).astype(jnp.int32)  # clipped before the cast: no wrap
    return jnp.clip(jnp.broadcast_to(n, (b,)), 0, current)


def _past(positions: int, start: jax.Array, shape: tuple) -> jax.Array:
    """A boolean mask ``(B, positions, 1, ...)`` (to ``len(shape)`` dims) of positions ``>=
    start`` (per sequence)."""
    mask = jnp.arange(positions, dtype=jnp.int32)[None, :] >= start[:, None]
    return mask.reshape(*mask.shape, *(1,) * (len(shape) - 2))


def _cleared_from(side: QArray, spec, start: jax.Array, per: int) -> QArray:
    """``side`` with its positions ``>= start`` unwritten, as :meth:`KVCache.init` makes them:
    codes 0 with scale 1 and zero point 0 (per-token and per-block scales, ``per`` tokens to
    a scale), or the codes of 0 under a static scale."""
    t = side.values.shape[1]
    gone = _past(t, start, side.values.shape)
    if kva.mode(side) == "static":
        b, _, h, d = side.shape
        empty = quantize(
            jnp.zeros((b, 1, h, d), side.dtype), spec, scale=side.scale, zero_point=side.zero_point
        )
        values = jnp.where(gone, empty.values, side.values)
        return side.replace_children([values, side.scale, side.zero_point, None, None])
    values = jnp.where(gone, jnp.zeros((), side.values.dtype), side.values)
    blocks = -(-start // per)  # the first scale whose tokens all go
    scale_gone = _past(side.scale.shape[1], blocks, side.scale.shape)
    scale = jnp.where(scale_gone, jnp.ones((), side.scale.dtype), side.scale)
    zero = side.zero_point
    if zero is not None:
        zero = jnp.where(scale_gone, jnp.zeros((), zero.dtype), zero)
    return side.replace_children([values, scale, zero, None, None])


def _reopened_tail(side: QArray, tail: jax.Array, old: jax.Array, new: jax.Array, batch_like) -> jax.Array:
    """The floats of the block each sequence's new length falls in: the tail where it is the
    block being written, else that block's dequantized values (only it is dequantized)."""
    blk = side.group_size
    first, old_first = new - new % blk, old - old % blk
    at = batch_like(first, side.values)  # sharded like the batch (Explicit meshes)
    take = lambda a, i, size: jax.vmap(lambda x, j: jax.lax.dynamic_slice_in_dim(x, j, size, axis=0))(a, i)
    zero = None if side.zero_point is None else take(side.zero_point, at // blk, 1)
    block = side.replace_children(
        [take(side.values, at, blk), take(side.scale, at // blk, 1), zero, None, None]
    )
    same = (first == old_first)[:, None, None, None]
    return jnp.where(same, tail, block.dequantize().astype(tail.dtype))


def rewound(cache, lengths):
    """:meth:`qjax.KVCache.rewind` (see the module docstring)."""
    from qjax.quant.kv_cache import _append_blocks, _batch_like  # kv_cache imports this module

    n = new_lengths(cache, lengths)
    sides, tails = [], []
    for side, tail, spec in ((cache.k, cache.k_tail, cache.k_spec), (cache.v, cache.v_tail, cache.v_spec)):
        if kva.mode(side) != "block":
            sides.append(_cleared_from(side, spec, n, 1))
            tails.append(tail)
            continue
        blk = side.group_size
        reopened = _reopened_tail(side, tail, cache.lengths, n, _batch_like)
        cleared = _cleared_from(side, spec, n - n % blk + blk, blk)  # the blocks after the reopened one
        # the reopened block re-quantized from its kept floats (zeros after them), as a write
        # of its tokens would leave it; no tokens written (sharded like the tail)
        side, tail = _append_blocks(cleared, reopened, spec, jnp.zeros_like(tail[:, :0]), n, None)
        sides.append(side)
        tails.append(tail)
    lengths = None if cache.lengths is None else n
    return dataclasses.replace(
        cache, k=sides[0], v=sides[1], k_tail=tails[0], v_tail=tails[1], lengths=lengths
    )
