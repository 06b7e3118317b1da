"""Pallas GPU kernels (Triton backend) for low-bit matmul.

Why Triton first and not Mosaic GPU: Mosaic GPU exposes Hopper's ``wgmma`` directly but
wants its operands staged through shared memory in swizzled layouts that the kernel must set
up by hand, and it runs on Hopper only. The Triton backend lowers ``dot`` to ``wgmma`` on
Hopper and ``mma`` elsewhere by itself, unpacks nibbles in registers, pipelines the K loop
(``num_stages``) and runs on Ampere as well, so one kernel source covers every NVIDIA GPU
and every layout. The exceptions, all ``engine=`` choices that configs or the tuning table
make: on Hopper, the large int8 GEMM, where TMA and warp specialization matter
(:mod:`qjax.kernels.gpu_wgmma`), and the weight-only matmul at a few rows of a weight stored
``(N, K)``, streamed by TMA and unpacked into ``wgmma``'s register operand
(:mod:`qjax.kernels.gpu_wgmma_weight_only`); and the weight-only matmul at a few rows on
CUDA cores (:mod:`qjax.kernels.gpu_gemv`, ``engine="gemv"``).

Two kernels:

* :func:`weight_only_matmul_gpu` -- W4A16 / W8A16: bfloat16 activations times int8 or
  packed int4 codes, float32 accumulation, per-channel or per-group scales. Codes become
  bfloat16 through integer logic (:mod:`qjax.kernels._fastcvt`), not the slow conversion
  instructions, or with ``dequant="ptx"`` through inline PTX that works on four codes per
  32-bit register (:mod:`qjax.kernels._ptx`); for the ``"k_halves"`` layout each K tile
  is two contiguous halves (no interleave); the ``"n_pairs"`` layout that ``qjax.quantize`` produces runs
  two half-width dots (even / odd output columns) interleaved once after the K loop, and
  ``"k_pairs"`` two dots of the low / high nibbles against the even / odd activations
  (read from a free ``(M, K/2, 2)`` view), so neither interleaves codes in the loop
  (swapped ``"k_pairs"`` tiles still join the nibbles along K: Triton 3.5 fails to
  compile the even / odd form there).
  Group scales multiply each tile's float32 partial product (one group per
  tile). For small batches ``swap=True`` computes ``W^T x^T`` so the weight tile is the
  wide side of the tensor-core instruction and the batch (padded to 16) the narrow one;
  ``split_k`` cuts K across programs to fill the GPU when N alone gives too few tiles.
* :func:`int8_matmul_gpu` -- W8A8: int8 x int8 -> int32 blocked GEMM, the per-token x
  per-channel rescale fused in the epilogue, grouped tile order for L2 reuse. The weight
  may come as ``(K, N)`` or transposed ``(N, K)``: Hopper's 8-bit ``wgmma`` reads both
  operands K-major, so a ``(K, N)`` weight tile needs a transpose on chip that the
  ``(N, K)`` one does not.

Rows beyond M are masked, never padded, so a batch of 1 costs no extra copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax.kernels._common import BlockConfig, cdiv, grouped_tile, int8_dimension_numbers, split_layout
from qjax.kernels._fastcvt import codes_f32, nibbles_bf16
from qjax.kernels._ptx import int8_bf16_ptx, nibbles_bf16_ptx

_F32 = jnp.float32
_DN = (((1,), (0,)), ((), ()))  # (m, k) x (k, n)
_DN_SWAP = (((0,), (1,)), ((), ()))  # w (k, n) x x (m, k) -> (n, m)
_DN_NK = (((1,), (1,)), ((), ()))  # (m, k) x w (n, k) -> (m, n), or w (n, k) x (m, k) -> (n, m)


def _int8_bf16(p):
    """int8 codes as bfloat16 (exact) through the float32 magic-number conversion: one
    float -> bfloat16 conversion instead of int -> float -> bfloat16."""
    return codes_f32(p.astype(jnp.int32), 0, 8).astype(jnp.bfloat16)


def _load(ref, idx, mask):
    if mask is None:
        return ref[idx]
    return pltr.load(ref.at[idx], mask=mask, other=0)


def _store(ref, idx, value, mask):
    if mask is None:
        ref[idx] = value
    else:
        pltr.store(ref.at[idx], value, mask=mask)


# -- weight-only -----------------------------------------------------------------------------------


def _split_sum(out, o_ref, ws_ref, cnt_ref, rmask, interpret):
    """``split_reduce="kernel"``: store this program's float32 partial ``out`` (its output tile)
    in the workspace, count it on the tile's counter and, in the program that arrives last,
    sum every partial in split order (deterministic, whichever program is last) and write the
    tile. The barrier before the counter's acquire-release atomic orders all threads' stores
    before it (CUTLASS's semaphore pattern). Plain loads are safe from stale L1 lines: only
    the last program of a tile reads its workspace, once, and L1 starts clean at each launch
    (jax 0.10-0.11 cannot lower ``cache_modifier=".cg"``: it looks the string up in a table
    keyed ``"cg"``). The interpreter runs the programs one after another, with no barrier."""
    j, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = ws_ref.shape[0]
    bm, bn = out.shape
    tile = (pl.ds(pl.multiple_of(i * bm, bm), bm), pl.ds(pl.multiple_of(j * bn, bn), bn))
    _store(ws_ref, (s, *tile), out, rmask)
    if not interpret:
        pltr.debug_barrier()
    arrived = pltr.atomic_add(cnt_ref, (i * pl.num_programs(0) + j,), jnp.ones((), jnp.int32))

    @pl.when(arrived == split - 1)
    def _():
        total = None
        for t in range(split):
            part = _load(ws_ref, (jnp.int32(t), *tile), rmask)
            total = part if total is None else total + part
        _store(o_ref, (slice(None), slice(None)), total.astype(o_ref.dtype), rmask)


def _weight_only_kernel(x_ref, w_ref, s_ref, *refs, layout, m, cfg, steps, group_size, interpret):
    bm, bk, swap = cfg.block_m, cfg.block_k, cfg.swap
    # the output; with split_reduce="kernel" also the counters (input, aliased output) and workspace
    o_ref = refs[0] if len(refs) == 1 else refs[1]
    layout, nk = split_layout(layout)  # nk: the weight tile is (N, K), its scales are columns
    # codes -> bfloat16 (int4 bytes: the low and high nibbles): integer logic or inline PTX
    if cfg.dequant == "ptx":
        nibbles = functools.partial(nibbles_bf16_ptx, interpret=interpret)
        int8_bf16 = functools.partial(int8_bf16_ptx, interpret=interpret)
    else:
        nibbles, int8_bf16 = nibbles_bf16, _int8_bf16
    bn = o_ref.shape[-1]
    if m % bm:
        rows = pl.program_id(1) * bm + jnp.arange(bm, dtype=jnp.int32)
        rmask = (rows < m)[:, None]
    else:
        rmask = None

    def finish(out):  # the float32 tile, to the output (or to the split-K sum)
        if len(refs) == 1:
            _store(o_ref, (slice(None), slice(None)), out.astype(o_ref.dtype), rmask)
        else:
            _, _, cnt_ref, ws_ref = refs
            _split_sum(out, o_ref, ws_ref, cnt_ref, rmask, interpret)

    def mm(xt, wt):
        if nk:  # wt is (n, k): contract both operands' last axes
            return lax.dot_general(*((wt, xt) if swap else (xt, wt)), _DN_NK, preferred_element_type=_F32)
        if swap:
            return lax.dot_general(wt, xt, _DN_SWAP, preferred_element_type=_F32)
        return lax.dot_general(xt, wt, _DN, preferred_element_type=_F32)

    def x_tile(start, size):
        return _load(x_ref, (slice(None), pl.ds(start, size)), rmask).astype(jnp.bfloat16)

    def x_pair_tile(start, size, parity):
        """``size`` activations at K = 2 (start + j) + parity: x is ``(M, K/2, 2)`` for
        ``"k_pairs"`` (a free reshape), so the even / odd columns are a plain load."""
        mask = None if rmask is None else rmask[:, :, None]
        v = _load(x_ref, (slice(None), pl.ds(start, size), pl.ds(parity, 1)), mask)
        return v.reshape(v.shape[0], size).astype(jnp.bfloat16)

    def w_tile(start, size):  # `size` codes (or bytes) along K from `start`
        return w_ref[:, pl.ds(start, size)] if nk else w_ref[pl.ds(start, size), :]

    def oriented(s):
        """A scale row (1, n) -- a column (n, 1) for an (N, K) weight -- as it multiplies
        the accumulator: (bn, bm) when swapped, else (bm, bn)."""
        return s if nk == swap else s.T

    def group_scale(t, half=None):  # the scales of K tile t's group (of half `half` of the columns)
        g = pl.ds((t * bk) // group_size, 1)
        if nk:
            return s_ref[:, g] if half is None else s_ref[:, half, g]
        return s_ref[g, :] if half is None else s_ref[g, :, half]

    def scaled(part, t, half=None):  # one group's partial product times its scales
        return part if group_size is None else part * oriented(group_scale(t, half))

    if layout == "n_pairs":
        # the low and high nibbles hold the even and odd output columns: two half-width dots
        # per K step, the columns interleaved once after the loop (not per step: Triton's
        # join + reshape is a layout conversion through shared memory)
        def body_pairs(t, accs):
            k0 = pl.multiple_of(t * bk, bk)
            lo, hi = nibbles(w_tile(k0, bk))
            xt = x_tile(k0, bk)
            return accs[0] + scaled(mm(xt, lo), t, 0), accs[1] + scaled(mm(xt, hi), t, 1)

        half = (bn // 2, bm) if swap else (bm, bn // 2)
        even, odd = lax.fori_loop(0, steps, body_pairs, (jnp.zeros(half, _F32), jnp.zeros(half, _F32)))
        if swap:
            even, odd = even.T, odd.T
        acc = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], bn)
        if group_size is None:
            acc = acc * (s_ref[...].T if nk else s_ref[...])
        finish(acc)
        return

    def body(t, acc):
        k0 = pl.multiple_of(t * bk, bk)
        if layout == "k_halves":  # two contiguous halves of the activation tile, no interleave
            r0 = pl.multiple_of(t * (bk // 2), bk // 2)
            lo, hi = nibbles(w_tile(r0, bk // 2))
            part = mm(x_tile(k0, bk // 2), lo) + mm(x_tile(k0 + bk // 2, bk // 2), hi)
        elif layout == "int8":
            part = mm(x_tile(k0, bk), int8_bf16(w_tile(k0, bk)))
        elif not swap:  # k_pairs: the low / high nibbles meet the even / odd activations
            r0 = pl.multiple_of(t * (bk // 2), bk // 2)
            lo, hi = nibbles(w_tile(r0, bk // 2))
            part = mm(x_pair_tile(r0, bk // 2, 0), lo) + mm(x_pair_tile(r0, bk // 2, 1), hi)
        else:  # k_pairs swapped: interleave the nibbles along K (Triton joins along the last
            # axis only); the even / odd form above makes Triton 3.5's pass pipeline fail
            # on swapped tiles (offline, experiments/results/kpairs_sass_sm90_2026-11-27.md)
            r0 = pl.multiple_of(t * (bk // 2), bk // 2)
            lo, hi = nibbles(w_tile(r0, bk // 2))
            if nk:  # K is the tile's last axis: a plain join
                w = jnp.stack([lo, hi], axis=-1).reshape(bn, bk)
            else:
                w = jnp.stack([lo.T, hi.T], axis=-1).reshape(bn, bk).T
            part = mm(x_tile(k0, bk), w)
        return acc + scaled(part, t)

    shape = (bn, bm) if swap else (bm, bn)
    acc = lax.fori_loop(0, steps, body, jnp.zeros(shape, _F32))
    if group_size is None:
        acc = acc * oriented(s_ref[...])
    finish(acc.T if swap else acc)


def weight_only_matmul_gpu(
    x, w, scales, *, layout, group_size, out_dtype, config: BlockConfig, interpret=False
):
    """``x @ W`` for an int8 / packed-int4 weight on a GPU (Pallas Triton backend).

    Args:
      x: ``(M, K)`` activations (cast to bfloat16).
      w: the weight in ``layout`` (``int8`` bytes; see :mod:`qjax.kernels._common`); an
        ``"_nk"`` layout is stored ``(N, K)``.
      scales: float32 ``(K // group_size, N)`` or ``(1, N)`` (``group_size=None``); for an
        ``"_nk"`` layout ``(N, K // group_size)`` or ``(N, 1)``.
      layout, group_size: the weight's layout and group size along K.
      out_dtype: result dtype.
      config: tiles; ``block_k`` must divide ``K // split_k`` and, with groups, the group
        size; ``block_n`` must divide N. For ``"k_halves"`` the tile must equal the pack
        block (the caller checks).
      interpret: run in the Pallas interpreter.

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    m, k = x.shape
    base, nk = split_layout(layout)
    n = scales.shape[0 if nk else 1]
    bm, bn, bk, split = config.block_m, config.block_n, config.block_k, config.split_k
    kc = k // split
    steps = kc // bk
    w_block = {"n_pairs": (kc, bn // 2), "int8": (kc, bn)}.get(base, (kc // 2, bn))  # (K, N) view
    if nk:
        w_block, w_index = w_block[::-1], (lambda j, i, s: (j, s))
    else:
        w_index = lambda j, i, s: (s, j)
    groups = kc // (group_size or kc)
    if group_size is None:
        if nk:  # (N, 1): a column per tile
            s_spec = pl.BlockSpec((bn, 1), lambda j, i, s: (j, 0))
        else:
            s_spec = pl.BlockSpec((1, bn), lambda j, i, s: (0, j))
    elif base == "n_pairs" and nk:  # (N/2, 2, groups): even / odd rows' scales, a free reshape
        scales = scales.reshape(n // 2, 2, scales.shape[1])
        s_spec = pl.BlockSpec((bn // 2, 2, groups), lambda j, i, s: (j, 0, s))
    elif base == "n_pairs":  # (groups, N/2, 2): even / odd columns' scales, a free reshape
        scales = scales.reshape(scales.shape[0], n // 2, 2)
        s_spec = pl.BlockSpec((groups, bn // 2, 2), lambda j, i, s: (s, j, 0))
    elif nk:
        s_spec = pl.BlockSpec((bn, groups), lambda j, i, s: (j, s))
    else:
        s_spec = pl.BlockSpec((groups, bn), lambda j, i, s: (s, j))
    if base == "k_pairs" and not config.swap:  # (M, K/2, 2): even / odd activations
        x = x.reshape(m, k // 2, 2)
        x_spec = pl.BlockSpec((bm, kc // 2, 2), lambda j, i, s: (i, s, 0))
    else:
        x_spec = pl.BlockSpec((bm, kc), lambda j, i, s: (i, s))
    grid = (n // bn, cdiv(m, bm), split)
    final = (jax.ShapeDtypeStruct((m, n), out_dtype), pl.BlockSpec((bm, bn), lambda j, i, s: (i, j)))
    inputs, in_specs = [x, w, scales], [x_spec, pl.BlockSpec(w_block, w_index), s_spec]
    aliases = {}
    if split == 1:
        outs = [final]
    elif config.split_reduce == "xla":  # the float32 partials, summed by XLA below
        outs = [
            (
                jax.ShapeDtypeStruct((split, m, n), _F32),
                pl.BlockSpec((None, bm, bn), lambda j, i, s: (s, i, j)),
            )
        ]
    else:  # one arrival counter per output tile (zeroed here) and a workspace of partials
        tiles = grid[0] * grid[1]
        whole = lambda shape: pl.BlockSpec(shape, lambda j, i, s: (0,) * len(shape))
        inputs.append(jnp.zeros((tiles,), jnp.int32))
        in_specs.append(whole((tiles,)))
        aliases = {3: 1}
        ws = (split, grid[1] * bm, n)  # rows padded to whole tiles; only rows < M are touched
        outs = [
            final,
            (jax.ShapeDtypeStruct((tiles,), jnp.int32), whole((tiles,))),
            (jax.ShapeDtypeStruct(ws, _F32), whole(ws)),
        ]
    kernel = functools.partial(
        _weight_only_kernel,
        layout=layout,
        m=m,
        cfg=config,
        steps=steps,
        group_size=group_size,
        interpret=interpret,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=[o[0] for o in outs],
        grid=grid,
        in_specs=in_specs,
        out_specs=[o[1] for o in outs],
        input_output_aliases=aliases,
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"qjax_w{8 if base == 'int8' else 4}a16_{layout}",
    )(*inputs)[0]
    if split > 1 and config.split_reduce == "xla":
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out


# -- int8 x int8 ---------------------------------------------------------------------------------------


def _int8_kernel(a_ref, b_ref, as_ref, bs_ref, o_ref, *, m, cfg, steps, num_m, num_n, b_layout):
    bm, bk = cfg.block_m, cfg.block_k
    dn = int8_dimension_numbers(b_layout)
    if m % bm:
        i, _ = grouped_tile(pl.program_id(0), num_m, num_n)
        rmask = ((i * bm + jnp.arange(bm, dtype=jnp.int32)) < m)[:, None]
    else:
        rmask = None

    def body(t, acc):
        k0 = pl.multiple_of(t * bk, bk)
        a = _load(a_ref, (slice(None), pl.ds(k0, bk)), rmask)
        b = b_ref[pl.ds(k0, bk), :] if b_layout == "kn" else b_ref[:, pl.ds(k0, bk)]
        return acc + lax.dot_general(a, b, dn, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, o_ref.shape[-1]), jnp.int32))
    a_s = _load(as_ref, (slice(None), slice(None)), rmask)
    out = acc.astype(_F32) * a_s * bs_ref[...]
    _store(o_ref, (slice(None), slice(None)), out.astype(o_ref.dtype), rmask)


def int8_matmul_gpu(
    a_q, b_q, a_scale, b_scale, *, out_dtype, config: BlockConfig, b_layout="kn", interpret=False
):
    """``(a_q @ b_q) * a_scale * b_scale`` with int8 operands on a GPU (Pallas Triton).

    Args:
      a_q: ``(M, K)`` int8; b_q: ``(K, N)`` int8, or ``(N, K)`` with ``b_layout="nk"``.
      a_scale: float32 ``(M, 1)``; b_scale: float32 ``(1, N)``.
      out_dtype: result dtype.
      config: ``block_n`` divides N, ``block_k`` divides K (the caller checks).
      interpret: run in the Pallas interpreter.

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    m, k = a_q.shape
    n = b_q.shape[1] if b_layout == "kn" else b_q.shape[0]
    bm, bn = config.block_m, config.block_n
    num_m, num_n = cdiv(m, bm), n // bn

    def rows(pid):
        return grouped_tile(pid, num_m, num_n)[0]

    def cols(pid):
        return grouped_tile(pid, num_m, num_n)[1]

    kernel = functools.partial(
        _int8_kernel, m=m, cfg=config, steps=k // config.block_k, num_m=num_m, num_n=num_n, b_layout=b_layout
    )
    b_spec = (
        pl.BlockSpec((k, bn), lambda p: (0, cols(p)))
        if b_layout == "kn"
        else pl.BlockSpec((bn, k), lambda p: (cols(p), 0))
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_m * num_n,),
        in_specs=[
            pl.BlockSpec((bm, k), lambda p: (rows(p), 0)),
            b_spec,
            pl.BlockSpec((bm, 1), lambda p: (rows(p), 0)),
            pl.BlockSpec((1, bn), lambda p: (0, cols(p))),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda p: (rows(p), cols(p))),
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="qjax_int8_matmul",
    )(a_q, b_q, a_scale, b_scale)
