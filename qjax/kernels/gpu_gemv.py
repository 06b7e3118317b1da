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

A weight stored ``(N, K)`` (layouts ``"int8_nk"``, ``"k_pairs_nk"``, ``"n_pairs_nk"``:
PyTorch's ``(out, in)``) is the natural matrix-vector layout: its words run along K, so a
word's codes all belong to one output column (two for ``n_pairs_nk``) and multiply
consecutive activations. The tile is ``(block_n, words)``; each activation row keeps one
float32 accumulator of that shape per output parity, reduced along K once after the loop:

* ``"int8_nk"``: byte ``b`` of word ``(n, c)`` = ``W[k0 + 4c + b, n]``;
* ``"k_pairs_nk"``: nibble ``j = 0..7`` = ``W[k0 + 8c + j, n]``;
* ``"n_pairs_nk"``: byte ``b``'s low / high nibble = ``W[k0 + 4c + b, 2n]`` /
  ``W[k0 + 4c + b, 2n + 1]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax.kernels._common import BlockConfig, cdiv, split_layout
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


def _pieces_nk(layout: str) -> list[tuple[int, int, int]]:
    """``(output parity, bit position in the word, code's K offset in the word)`` per code of
    a word of a weight stored ``(N, K)``."""
    if layout == "int8":
        return [(0, 8 * b, b) for b in range(4)]
    if layout == "k_pairs":
        return [(0, 4 * j, j) for j in range(8)]
    return [(h, 8 * b + 4 * h, b) for b in range(4) for h in (0, 1)]  # n_pairs: low / high = even / odd


def _gemv_kernel(x_ref, w_ref, s_ref, c_ref, o_ref, *, layout, nk, m, cfg, steps, group_size):
    # every tensor of the K loop has the word tile's 2-D shape (or broadcasts to it from an
    # activation column / scale row, or for an (N, K) weight an activation row / scale
    # column), so Triton keeps the decoded codes in the layout they were loaded in: a 3-D
    # (row, rows, words) accumulator made it move every decoded code through shared memory
    # (STS + LDSM + 2 barriers per step, sm_90 SASS)
    bm, bk = cfg.block_m, cfg.block_k
    bits = 8 if layout == "int8" else 4
    if nk:  # tile (output rows, words along K); one accumulator per output parity
        pieces, nacc = _pieces_nk(layout), 2 if layout == "n_pairs" else 1
        tile = (w_ref.shape[0], w_ref.shape[1] // steps)
    else:  # tile (word rows along K, words); one accumulator per column slot of a word
        pieces, nacc = _pieces(layout), slots(layout)
        tile = (w_ref.shape[0] // steps, w_ref.shape[1])
    if m % bm:
        first = pl.program_id(1) * bm
        live = [first + r < m for r in range(bm)]  # rows past M: inputs read as 0, not stored
    else:
        live = [None] * bm

    def x_part(t, r, part):
        """Activations of row r meeting code `part` of each word: a (rows, 1) column, or for
        an (N, K) weight a (1, words) row. x is (M, K / span, span) for the (N, K) layouts and
        k_pairs (part: the code's K offset in the word / even-odd K), else (M, K, 1)."""
        if nk:
            idx, shape = (pl.ds(t * tile[1], tile[1]), pl.ds(part, 1)), (1, tile[1])
        else:
            k0 = t * tile[0] if layout == "k_pairs" else t * bk + part * tile[0]
            idx, shape = (pl.ds(k0, tile[0]), pl.ds(part if layout == "k_pairs" else 0, 1)), (tile[0], 1)
        ref = x_ref.at[(pl.ds(r, 1), *idx)]
        v = ref[...] if live[r] is None else pltr.load(ref, mask=live[r], other=0)
        return v.reshape(shape).astype(jnp.bfloat16).astype(_F32)  # rounded like the other kernels do

    def scale(group, acc):  # one group's scales of accumulator `acc`: a row, or a column for nk
        return s_ref[:, acc, pl.ds(group, 1)] if nk else s_ref[pl.ds(group, 1), :, acc]

    # the conversion constants, loaded once: as registers they let ptxas fuse each code's
    # mask and bias into a single LOP3 (as immediates they cost two)
    magic = {p: c_ref[0, p // 4] for p in sorted({pos % 16 for _, pos, _ in pieces})}

    def body(t, accs):
        if nk:
            word = w_ref[:, pl.ds(pl.multiple_of(t * tile[1], tile[1]), tile[1])]
        else:
            word = w_ref[pl.ds(pl.multiple_of(t * tile[0], tile[0]), tile[0]), :]
        high = lax.shift_right_logical(word, jnp.int32(16))
        accs = list(accs)
        xs = {}
        for acc, pos, part in pieces:
            v = codes_f32(word if pos < 16 else high, pos % 16, bits, magic[pos % 16])
            if group_size is not None:
                v = v * scale((t * bk) // group_size, acc)
            for r in range(bm):
                if (r, part) not in xs:
                    xs[r, part] = x_part(t, r, part)
                accs[r * nacc + acc] = accs[r * nacc + acc] + v * xs[r, part]
        return tuple(accs)

    zero = jnp.zeros(tile, _F32)
    accs = lax.fori_loop(0, steps, body, (zero,) * (bm * nacc))
    for r in range(bm):
        for acc in range(nacc):
            # reduced along K: (1, words) output columns, or (rows, 1) for an (N, K) weight
            out = jnp.sum(accs[r * nacc + acc], axis=1 if nk else 0, keepdims=True)
            if group_size is None:
                out = out * scale(0, acc)
            ref = o_ref.at[pl.ds(r, 1), :, pl.ds(acc, 1)]
            out = out.reshape(1, -1, 1).astype(o_ref.dtype)
            if live[r] is None:
                ref[...] = out
            else:
                pltr.store(ref, out, mask=live[r])


def _gemv_nk(x, w, scales, *, layout, group_size, out_dtype, config: BlockConfig, interpret):
    """:func:`weight_only_gemv` for a weight stored ``(N, K)`` (``layout`` without ``_nk``)."""
    m, k = x.shape
    n = scales.shape[0]
    bm, bn, bk, split = config.block_m, config.block_n, config.block_k, config.split_k
    kc = k // split
    nout = 2 if layout == "n_pairs" else 1
    span = 8 if layout == "k_pairs" else 4  # codes per word along K
    words = as_words(w)  # (N, K / 8) for k_pairs, (N / 2, K / 4) for n_pairs, (N, K / 4) for int8
    x = x.reshape(m, k // span, span)
    x_spec = pl.BlockSpec((bm, kc // span, span), lambda j, i, s: (i, s, 0))
    w_spec = pl.BlockSpec((bn // nout, kc // span), lambda j, i, s: (j, s))
    groups = 1 if group_size is None else k // group_size
    scales = scales.reshape(n // nout, nout, groups)  # (N, 1) or (N, K // group) in parities
    s_cols = 1 if group_size is None else kc // group_size
    s_spec = pl.BlockSpec((bn // nout, nout, s_cols), lambda j, i, s: (j, 0, 0 if group_size is None else s))
    kernel = functools.partial(
        _gemv_kernel, layout=layout, nk=True, m=m, cfg=config, steps=kc // bk, group_size=group_size
    )
    inputs = ((x, x_spec), (words, w_spec), (scales, s_spec))
    return _launch(
        kernel, inputs, m, n, nout, layout, config, out_dtype, interpret, f"qjax_w{{}}a16_{layout}_nk_gemv"
    )


def _launch(kernel, inputs, m: int, n: int, nslot: int, layout: str, config, out_dtype, interpret, name: str):
    """Run a gemv kernel on ``inputs`` (``(array, BlockSpec)`` pairs: activations, weight
    words, scales) plus the conversion constants; its output ``(M, N / nslot, nslot)``
    (one slice per program along K when split) comes back as ``(M, N)``."""
    bm, bn, split = config.block_m, config.block_n, config.split_k
    grid = (n // bn, cdiv(m, bm), split)
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, n // nslot, nslot), _F32)
        out_spec = pl.BlockSpec((None, bm, bn // nslot, nslot), lambda j, i, s: (s, i, j, 0))
    else:
        out_shape = jax.ShapeDtypeStruct((m, n // nslot, nslot), out_dtype)
        out_spec = pl.BlockSpec((bm, bn // nslot, nslot), lambda j, i, s: (i, j, 0))
    bits = 8 if layout == "int8" else 4
    consts = jnp.asarray([[magic_bits(p, bits) if p % bits == 0 else 0 for p in range(0, 16, 4)]], jnp.int32)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[spec for _, spec in inputs] + [pl.BlockSpec((1, 4), lambda j, i, s: (0, 0))],
        out_specs=out_spec,
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=name.format(bits),
    )(*(a for a, _ in inputs), consts)
    if split > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out.reshape(m, n)


def as_words(w: jax.Array) -> jax.Array:
    """The int8 weight bytes ``(R, C)`` as int32 words ``(R, C // 4)`` (a free bitcast)."""
    r, c = w.shape
    return lax.bitcast_convert_type(w.reshape(r, c // 4, 4), jnp.int32)


def weight_only_gemv(x, w, scales, *, layout, group_size, out_dtype, config: BlockConfig, interpret=False):
    """``x @ W`` for an int8 / packed-int4 weight at a few rows, on CUDA cores (Pallas Triton).

    Args:
      x: ``(M, K)`` activations (rounded to bfloat16 like the other kernels' operands,
        then multiplied in float32).
      w: the weight's int8 bytes in ``layout`` (see :mod:`qjax.kernels._common`); an
        ``"_nk"`` layout is stored ``(N, K)``.
      scales: float32 ``(K // group_size, N)`` or ``(1, N)`` (``group_size=None``); for an
        ``"_nk"`` layout ``(N, K // group_size)`` or ``(N, 1)``.
      layout, group_size: the weight's layout and group size along K.
      out_dtype: result dtype.
      config: ``engine="gemv"`` tiles: ``block_m`` rows per program, ``block_n`` columns,
        ``block_k`` contraction per step (equal to the pack block for ``"k_halves"``),
        ``split_k`` programs along K (checked by ``qjax.kernels.api.check_config_gpu``).
      interpret: run in the Pallas interpreter.

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    layout, nk = split_layout(layout)
    if nk:
        return _gemv_nk(
            x,
            w,
            scales,
            layout=layout,
            group_size=group_size,
            out_dtype=out_dtype,
            config=config,
            interpret=interpret,
        )
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
    kernel = functools.partial(
        _gemv_kernel, layout=layout, nk=False, m=m, cfg=config, steps=kc // bk, group_size=group_size
    )
    inputs = ((x, x_spec), (words, pl.BlockSpec(w_block, lambda j, i, s: (s, j))), (scales, s_spec))
    return _launch(
        kernel, inputs, m, n, nslot, layout, config, out_dtype, interpret, f"qjax_w{{}}a16_{layout}_gemv"
    )
