"""The block configs the tuning run tries: every entry a shipped tuning table can hold
comes from these lists (and the tests lower each one for CUDA at the benchmark's shapes).

:func:`gpu_candidates` lists the Triton configs for one op and shape, already filtered by
:func:`qjax.kernels.api.check_config_gpu`; the Hopper ``wgmma`` W8A8 configs are
:data:`qjax.kernels.gpu_wgmma.CONFIGS`.
"""

from __future__ import annotations

import dataclasses

from qjax.kernels import api, gpu_wgmma_weight_only
from qjax.kernels._common import BlockConfig, pow2_at_least

# (block_m, block_n, block_k, num_warps, num_stages): no split-K, no swap
_W8A8_TILES = (
    (128, 128, 128, 8, 3),
    (128, 256, 128, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 4, 4),
    (64, 256, 128, 8, 3),
)
_WEIGHT_ONLY_LARGE_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 64, 128, 4, 4),
)

# (block_n, block_k, split_k, num_warps, num_stages), swapped operands, batch padded to 16: the
# small-batch kernel should be bandwidth-bound (on the H200 it streamed only ~0.7-0.95 TB/s),
# so the list varies the bytes each program streams per K step (block_n x block_k) and the
# number of programs (N / block_n x split_k); diverse entries first, since tuning stops at
# its deadline. block_k 128 entries serve group size 128.
_SMALL_BATCH_TILES = (
    (64, 256, 4, 4, 4),
    (128, 128, 8, 4, 4),
    (128, 256, 4, 4, 4),
    (64, 128, 4, 4, 4),
    (256, 128, 8, 8, 3),
    (128, 512, 4, 8, 3),
    (64, 128, 8, 4, 4),
    (128, 256, 8, 4, 4),
    (256, 256, 4, 8, 3),
    (128, 128, 16, 4, 4),
    (64, 256, 8, 4, 4),
    (32, 128, 8, 4, 4),
    (64, 512, 4, 4, 3),
    (128, 128, 4, 4, 4),
    (32, 256, 4, 4, 4),
    (128, 256, 2, 4, 4),
    (64, 256, 2, 4, 4),
    (128, 256, 1, 4, 4),
    (64, 128, 2, 4, 4),  # small K or N: fewer splits, narrower tiles
    (64, 128, 1, 4, 4),
    (32, 128, 1, 4, 4),
)

# (block_n, block_k, split_k, num_warps, num_stages), operands not swapped, block_m 16: the
# weight tile is the right operand of Triton's mma.sync. Offline sm_90a SASS
# (experiments/triton_sass.py; experiments/results/ptx_sass_sm90_2026-11-26.jsonl,
# w8a16_sass_sm90_2026-11-26.jsonl):
# * int4 (n_pairs, k_halves) with the inline-PTX unpacking (dequant="ptx"): its register
#   layout keeps each thread's packed bytes together, so the PTX's 1.5 instructions per code
#   pay off: 3.8-4.9 SASS instructions per code in the K loop against 5.8 for the swapped
#   logic-unpacking kernel. On swapped operands Triton re-packs the bytes around the asm and
#   the PTX loses (6.1 against 5.8), so the swapped list keeps the integer logic;
# * "k_pairs" / "k_pairs_nk" with the integer logic (the PTX joined them since 2026-11-27): since
#   the fourteenth session the nibbles meet even / odd activations instead of being joined
#   along K in the unswapped tiles (experiments/results/kpairs_sass_sm90_2026-11-27.md):
#   4.4-5.6 instructions per code (was 6.1-9.2, with 32-64 shared-memory stores per K step
#   for "k_pairs"); swapped tiles keep the join (5.1-8.0);
# * int8 with the integer logic (the PTX loses here, 6.1 against 5.4): 5.1-6.1 instructions
#   per code, 54-127 registers, no spills, where 11 of the 21 swapped tiles spill (up to 3.3
#   KB) at 6.8-11 instructions per code; listed before the swapped tiles.
#
# The split-K partials are summed by XLA (BlockConfig.split_reduce="xla") and, at one row
# only, also in the kernel ("kernel"): on an H100 (2026-11-27, experiments/results/
# gpu_session_2026-11-27/, 8192^2) the in-kernel sum took the same device time at M = 1
# (19.50 vs 19.54 us) and saved wall time (one launch fewer: 26.9 vs 29.0 us; 19.6 vs 19.8 at
# 4096^2), but lost above (M = 16: 22.4 vs 20.6 us device, 33.1 vs 29.9 wall). 256 x 64
# split 16 and 8 warps: the split-8 tile ran at 11.7% achieved occupancy under Nsight
# Compute (its 256 programs, ~2 per SM). No split-K at all (so no sum kernel: XLA's took
# 1.2-1.6 us of the 6.8-7.2 us total at 4096^2), with narrow tiles giving the programs
# instead (16 x 32 / 16 x 16 x 256-1024, 128-256 programs), streamed far worse on an H100
# (2026-11-27, twenty-first session, experiments/results/gpu_session_2026-11-27_s21/
# w4a16_breakdown_narrow.json): 9.3-55 us device at 4096^2 against 6.6-7.2 us for the
# split-8 tiles, so the list keeps split-K
_SMALL_BATCH_UNSWAPPED_TILES = (
    (256, 64, 8, 4, 4),
    (256, 64, 16, 4, 4),
    (128, 128, 8, 4, 4),
    (256, 64, 8, 8, 4),
    (512, 64, 4, 8, 3),
    (256, 128, 8, 8, 3),
    (128, 128, 4, 4, 4),
    (128, 64, 8, 4, 4),
    (256, 128, 4, 4, 4),
    (64, 128, 8, 4, 4),
    (64, 128, 1, 4, 4),  # small K or N
    (64, 64, 1, 4, 4),
)

# the CUDA-core kernel (engine "gemv", batches <= 16): (block_n, block_k, split_k, num_warps,
# num_stages). It is meant to stream the weight at HBM speed, so the list varies the bytes
# a program reads per K step and the number of programs; configs whose float32 accumulators
# would not fit in registers at the batch are dropped (_gemv_fits)
_GEMV_TILES = (
    (128, 128, 8, 4, 3),
    (128, 128, 8, 8, 3),
    (256, 64, 8, 8, 3),
    (128, 64, 8, 4, 4),
    (64, 128, 16, 4, 3),
    (256, 128, 4, 8, 3),
    (128, 32, 8, 4, 4),
    (512, 32, 4, 8, 3),
    (128, 128, 4, 4, 3),
    (64, 64, 16, 4, 4),
    (128, 64, 16, 4, 3),
    (256, 32, 8, 4, 4),
    (64, 256, 8, 4, 3),
    (128, 128, 2, 4, 3),
    (64, 128, 1, 4, 3),  # small K or N
    (64, 32, 1, 4, 3),
    (128, 32, 8, 8, 3),  # batches 4-16: small tiles over 8 warps keep the accumulators in registers
    (64, 64, 8, 8, 3),
    (128, 64, 8, 8, 3),
)
# the Hopper Mosaic GPU weight-only kernel (engine "wgmma", swap; weights stored (N, K) as
# "n_pairs_nk" / "int8_nk", per channel, batches <= 16; qjax.kernels.gpu_wgmma_weight_only):
# (compute warpgroups, block_k, split_k, num_stages). Each warpgroup holds 64 weight rows; the
# list varies the bytes in flight per block (warpgroups x block_k x stages) and the number of
# blocks (N / block_n x split_k: 256-1024 at 8192^2 for int4). In the measured order (H100,
# 2026-11-27, experiments/results/gpu_session_2026-11-27_s18/): correct, but slower than the
# Triton inline-PTX tiles at every case timed (8192^2: 21.6-24.1 us against 16.9-20.6 us;
# 12-19% achieved occupancy, 25-38% of DRAM bandwidth), so it is tried after them
_WGMMA_WEIGHT_ONLY_TILES = (
    (2, 256, 4, 4),
    (2, 128, 8, 4),
    (2, 64, 8, 6),
    (1, 64, 4, 8),
    (1, 256, 8, 4),
    (1, 128, 8, 6),
    (2, 128, 16, 4),
    (1, 128, 16, 4),
)
_GEMV_ACC_PER_THREAD = 64  # float32 accumulator registers a thread may hold


def gemv_accumulators(cfg: BlockConfig, layout: str) -> int:
    """float32 accumulator elements of a ``gemv`` program: one ``(block_m, word rows, words)``
    tile per code slot of a word; int4 packed along K has half the word rows per K step. A
    weight stored ``(N, K)`` has one ``(block_n, words)`` tile per row and output parity: a
    quarter (an eighth for int4 packed along K) of the elements."""
    if layout.endswith("_nk"):
        return cfg.block_m * cfg.block_k * cfg.block_n // (8 if layout == "k_pairs_nk" else 4)
    return cfg.block_m * cfg.block_k * cfg.block_n // (2 if layout in ("k_halves", "k_pairs") else 1)


def _gemv_fits(cfg: BlockConfig, layout: str) -> bool:
    # accumulators: 64 per thread; measured on an H100 (2026-11-26) 256 per thread spilled (25x
    # slower), and in offline sm_90a SASS (experiments/triton_sass.py) 128 per thread took 255
    # registers and spilled. Words: at least two per thread and K step; with one, Triton
    # replicated the tile across threads (19 instructions per code instead of ~4)
    threads = 32 * cfg.num_warps
    words = cfg.block_k * cfg.block_n // 8 if layout != "int8" else cfg.block_k * cfg.block_n // 4
    return gemv_accumulators(cfg, layout) <= _GEMV_ACC_PER_THREAD * threads and words >= 2 * threads


def _tiles(rows) -> list[BlockConfig]:
    return [BlockConfig(bm, bn, bk, 1, False, w, s) for bm, bn, bk, w, s in rows]


def variant(cfg: BlockConfig | None) -> str | None:
    """The kernel family a config runs: its engine, plus ``+ptx`` for the inline-PTX int4
    unpacking and ``+ksum`` for split-K partials summed in the kernel (tuning budgets and
    reports count configs per variant; the lists hold ``+ksum`` configs at one row only)."""
    if cfg is None:
        return None
    name = cfg.engine if cfg.dequant == "logic" else f"{cfg.engine}+{cfg.dequant}"
    return name + ("+ksum" if cfg.split_reduce == "kernel" else "")


def gpu_candidates(kind: str, m: int, k: int, n: int, group: int | None, layout: str) -> list[BlockConfig]:
    """Triton configs worth timing for ``kind`` (``"w8a8"``, ``"w4a16"``, ``"w8a16"``) at
    ``(m, k, n)``: for batches up to 16 the CUDA-core ``gemv`` kernel (``block_m`` = the batch
    rounded up to a power of two; its float32 accumulators fit registers up to batch 8), the
    tensor-core kernel unswapped at ``block_m`` 16 (int8 codes and int4 packed along K:
    integer logic; other int4: the inline-PTX unpacking) and on swapped operands with
    split-K, in that order, the ``gemv`` configs first at batch 1 and last above (measured
    order; a tuning deadline cuts the tail); up to 64 small tiles with optional split-K;
    beyond, the usual GEMM tiles (weight-only tiles above 16 rows also with the PTX
    conversion). On a weight stored ``(N, K)`` as ``"n_pairs_nk"`` / ``"int8_nk"`` with
    per-channel scales, batches up to 16 try the Hopper ``wgmma`` weight-only kernel first
    (:mod:`qjax.kernels.gpu_wgmma_weight_only`; dispatch uses its entries on Hopper only).
    Only configs that fit the shape."""
    if kind == "w8a8":
        c = _tiles(_W8A8_TILES)
    elif m <= 16:
        bm = pow2_at_least(m, 1)
        gemv = [
            cfg
            for bn, bk, split, w, s in _GEMV_TILES
            if _gemv_fits(cfg := BlockConfig(bm, bn, bk, split, False, w, s, engine="gemv"), layout)
        ]
        unswapped = [
            BlockConfig(16, bn, bk, sp, False, w, s) for bn, bk, sp, w, s in _SMALL_BATCH_UNSWAPPED_TILES
        ]
        swapped = [BlockConfig(16, bn, bk, split, True, w, s) for bn, bk, split, w, s in _SMALL_BATCH_TILES]
        wgmma = []
        if layout in gpu_wgmma_weight_only.LAYOUTS and group is None:
            rows = 128 if kind == "w4a16" else 64  # output columns per warpgroup
            wgmma = [
                BlockConfig(8 if m <= 8 else 16, wgs * rows, bk, split, True, num_stages=st, engine="wgmma")
                for wgs, bk, split, st in _WGMMA_WEIGHT_ONLY_TILES
            ]
        ptx = kind == "w4a16"  # unswapped k_pairs tiles too, since 2026-11-27 (see check_config_gpu)
        first = [dataclasses.replace(cfg, dequant="ptx") for cfg in unswapped] if ptx else unswapped
        # H100, K = N = 4096 (experiments/results/gpu_session_2026-11-26/): at M = 1 gemv and the
        # unswapped PTX tiles lead (8.0-11.4 us), at M = 4-16 the tensor-core tiles (8.4-11.6 us)
        # and gemv trails (17-151 us): gemv goes first for one row only
        if m == 1:  # and the same tiles summing their split-K partials in the kernel (see above)
            fused = [dataclasses.replace(cfg, split_reduce="kernel") for cfg in first if cfg.split_k > 1]
            c = gemv + first + fused + swapped + wgmma
        else:
            c = first + swapped + gemv + wgmma
    elif m <= 64:
        c = [
            BlockConfig(bm, bn, bk, split, False, 4, 4)
            for bm in (32, 64)
            for bn in (64, 128)
            for bk in (64, 128)
            for split in (1, 2)
        ]
    else:
        c = _tiles(_WEIGHT_ONLY_LARGE_TILES)
    if m > 16 and kind != "w8a8":  # the PTX conversion of each weight-only tile, after the logic list
        # (not 128 x 256: it spilled in the offline sm_90a SASS,
        # experiments/results/ptx_candidates_sass_sm90_2026-11-26.jsonl)
        c += [dataclasses.replace(cfg, dequant="ptx") for cfg in c if cfg.block_m * cfg.block_n <= 128 * 128]
    ok = []
    for cfg in c:
        try:
            api.check_config_gpu(cfg, kind, m, k, n, group, layout)
            ok.append(cfg)
        except ValueError:  # a tile that does not fit this shape: not a candidate
            pass
    return ok
