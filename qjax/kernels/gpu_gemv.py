"""Pallas GPU kernel (Triton backend) for weight-only matmul at a few rows, on CUDA cores.

At batch 1-8 a weight-only matmul is a matrix-vector product: each weight code is read
once and used M times, the tensor cores have nothing to do, and the cost is reading the
weight and turning codes into floats. This kernel (``BlockConfig(engine="gemv")``):

* reads the weight as 32-bit words (4 int8 codes or 8 int4 codes; a free bitcast of the
  stored bytes, whatever the layout),
* turns each code into float32 with integer logic and one multiply-add
  (:func:`qjax.kernels._fastcvt.codes_f32`): no conversion instruction, which bounded the
  tensor-core kernel's small batches at ~1x bf16 on an H200,
* multiply-adds into one float32 accumulator per activation row and code slot of the
  word, of the word tile's shape ``(rows, words)``, reduced over K once after the loop,
* writes each slot's output columns with a strided store (a word's codes belong to
  interleaved columns), so nothing is shuffled between threads.

A word ``(r, c)`` of the weight tile holds, per layout (``S`` column slots):

* ``"int8"``: bytes ``b = 0..3`` = ``W[k0 + r, 4c + b]`` (``S = 4``);
* ``"k_halves"``: byte ``b``'s low / high nibble = ``W[k0 + r, 4c + b]`` /
  ``W[k0 + block_k/2 + r, 4c + b]`` (``S = 4``);
* ``"k_pairs"``: byte ``b``'s low / high nibble = ``W[k0 + 2r, 4c + b]`` /
  ``W[k0 + 2r + 1, 4c + b]`` (``S = 4``);
* ``"n_pairs"``: nibble ``j = 0..7`` = ``W[k0 + r, 8c + j]`` (``S = 8``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax.kernels._common import BlockConfig, cdiv
from qjax.kernels._fastcvt import codes_f32, magic_bits

_F32 = jnp.float32


def slots(layout: str) -> int:
    """Output columns one 32-bit weight word covers (the stride of its columns)."""
    return 8 if layout == "n_pairs" else 4


def _pieces(layout: str) -> list[tuple[int, int, int]]:
    """``(slot, bit position in the word, x part)`` per code of a word; x part 0 is the
    tile's first rows (or even rows for ``k_pairs``), 1 the second half (odd rows)."""
    if layout == "int8":
        return [(b, 8 * b, 0) for b in range(4)]
    if layout == "n_pairs":
        return [(j, 4 * j, 0) for j in range(8)]
    return [(b, 8 * b + 4 * h, h) for b in range(4) for h in (0, 1)]  # k_halves, k_pairs


def _gemv_kernel(x_ref, w_ref, s_ref, c_ref, o_ref, *, layout, m, cfg, steps, group_size):
    # every tensor of the K loop has the word tile's 2-D shape (or broadcasts to it from a
    # (rows, 1) activation column / (1, words) scale row), so Triton keeps the decoded codes
    # in the layout they were loaded in: a 3-D (row, rows, words) accumulator made it move
    # every decoded code through shared memory (STS + LDSM + 2 barriers per step, sm_90 SASS)
    bm, bk = cfg.block_m, cfg.block_k
    bits = 8 if layout == "int8" else 4
    rows = w_ref.shape[0] // steps  # word rows per K step
    cols = w_ref.shape[1]
    nslot = slots(layout)
    if m % bm:
        first = pl.program_id(1) * bm
        live = [first + r < m for r in range(bm)]  # rows past M: inputs read as 0, not stored
    else:
        live = [None] * bm

    def x_column(t, r, part):  # (rows, 1) activations of row r for one code of each word
        # x is (M, K / 2, 2) for k_pairs (part: even / odd K), else (M, K, 1)
        k0 = t * rows if layout == "k_pairs" else t * bk + part * rows
        ref = x_ref.at[pl.ds(r, 1), pl.ds(k0, rows), pl.ds(part if layout == "k_pairs" else 0, 1)]
        v = ref[...] if live[r] is None else pltr.load(ref, mask=live[r], other=0)
        return v.reshape(rows, 1).astype(jnp.bfloat16).astype(_F32)  # rounded like the other kernels do

    # the conversion constants, loaded once: as registers they let ptxas fuse each code's
    # mask and bias into a single LOP3 (as immediates they cost two)
    magic = {p: c_ref[0, p // 4] for p in sorted({pos % 16 for _, pos, _ in _pieces(layout)})}

    def body(t, accs):
        word = w_ref[pl.ds(pl.multiple_of(t * rows, rows), rows), :]
        high = lax.shift_right_logical(word, jnp.int32(16))
        accs = list(accs)
        xs = {}
        for slot, pos, part in _pieces(layout):
            v = codes_f32(word if pos < 16 else high, pos % 16, bits, magic[pos % 16])
            if group_size is not None:
                v = v * s_ref[pl.ds((t * bk) // group_size, 1), :, slot]
            for r in range(bm):
                if (r, part) not in xs:
                    xs[r, part] = x_column(t, r, part)
                accs[r * nslot + slot] = accs[r * nslot + slot] + v * xs[r, part]
        return tuple(accs)

    zero = jnp.zeros((rows, cols), _F32)
    accs = lax.fori_loop(0, steps, body, (zero,) * (bm * nslot))
    for r in range(bm):
        for slot in range(nslot):
            out = jnp.sum(accs[r * nslot + slot], axis=0, keepdims=True)  # (1, words)
            if group_size is None:
                out = out * s_ref[pl.ds(0, 1), :, slot]
            ref, out = o_ref.at[pl.ds(r, 1), :, pl.ds(slot, 1)], out.astype(o_ref.dtype)[:, :, None]
            if live[r] is None:
                ref[...] = out
            else:
                pltr.store(ref, out, mask=live[r])


def as_words(w: jax.Array) -> jax.Array:
    """The int8 weight bytes ``(R, C)`` as int32 words ``(R, C // 4)`` (a free bitcast)."""
    r, c = w.shape
    return lax.bitcast_convert_type(w.reshape(r, c // 4, 4), jnp.int32)


def weight_only_gemv(x, w, scales, *, layout, group_size, out_dtype, config: BlockConfig, interpret=False):
    """``x @ W`` for an int8 / packed-int4 weight at a few rows, on CUDA cores (Pallas Triton).

    Args:
      x: ``(M, K)`` activations (rounded to bfloat16 like the other kernels' operands,
        then multiplied in float32).
      w: the weight's int8 bytes in ``layout`` (see :mod:`qjax.kernels._common`).
      scales: float32 ``(K // group_size, N)`` or ``(1, N)`` (``group_size=None``).
      layout, group_size: the weight's layout and group size along K.
      out_dtype: result dtype.
      config: ``engine="gemv"`` tiles: ``block_m`` rows per program, ``block_n`` columns,
        ``block_k`` contraction per step (equal to the pack block for ``"k_halves"``),
        ``split_k`` programs along K (checked by ``qjax.kernels.api.check_config_gpu``).
      interpret: run in the Pallas interpreter.

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    m, k = x.shape
    n = scales.shape[1]
    bm, bn, bk, split = config.block_m, config.block_n, config.block_k, config.split_k
    kc = k // split
    nslot = slots(layout)
    words = as_words(w)
    packed_k = layout in ("k_halves", "k_pairs")
    w_rows = kc // 2 if packed_k else kc
    w_block = (w_rows, bn // nslot)  # a word covers nslot output columns
    if layout == "k_pairs":  # even / odd K rows side by side
        x = x.reshape(m, k // 2, 2)
        x_spec = pl.BlockSpec((bm, kc // 2, 2), lambda j, i, s: (i, s, 0))
    else:  # a trailing unit axis: x columns load as (rows, 1)
        x = x.reshape(m, k, 1)
        x_spec = pl.BlockSpec((bm, kc, 1), lambda j, i, s: (i, s, 0))
    scales = scales.reshape(scales.shape[0], n // nslot, nslot)
    s_rows = 1 if group_size is None else kc // group_size
    s_spec = pl.BlockSpec(
        (s_rows, bn // nslot, nslot), lambda j, i, s: (0 if group_size is None else s, j, 0)
    )
    grid = (n // bn, cdiv(m, bm), split)
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, n // nslot, nslot), _F32)
        out_spec = pl.BlockSpec((None, bm, bn // nslot, nslot), lambda j, i, s: (s, i, j, 0))
    else:
        out_shape = jax.ShapeDtypeStruct((m, n // nslot, nslot), out_dtype)
        out_spec = pl.BlockSpec((bm, bn // nslot, nslot), lambda j, i, s: (i, j, 0))
    kernel = functools.partial(
        _gemv_kernel, layout=layout, m=m, cfg=config, steps=kc // bk, group_size=group_size
    )
    bits = 8 if layout == "int8" else 4
    consts = jnp.asarray([[magic_bits(p, bits) if p % bits == 0 else 0 for p in range(0, 16, 4)]], jnp.int32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[
            x_spec,
            pl.BlockSpec(w_block, lambda j, i, s: (s, j)),
            s_spec,
            pl.BlockSpec((1, 4), lambda j, i, s: (0, 0)),
        ],
        out_specs=out_spec,
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"qjax_w{8 if layout == 'int8' else 4}a16_{layout}_gemv",
    )(x, words, scales, consts)
    if split > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out.reshape(m, n)
