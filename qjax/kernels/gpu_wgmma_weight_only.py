"""W4A16 / W8A16 at a few rows on Hopper through Pallas Mosaic GPU: the weight streamed by
TMA, unpacked in registers and fed to ``wgmma`` as its register operand (``engine="wgmma"``,
``swap=True``).

The Triton kernels (:mod:`qjax.kernels.gpu`) issue their weight loads from every thread
(``cp.async``); at a few rows they ran on an H100 at 44% of DRAM bandwidth with 11.7%
achieved occupancy (BUILD_NOTES, sixteenth session). This kernel is the Hopper design the
problem asks for: one memory warpgroup streams ``(rows, block_k)`` weight tiles and the
``(block_m, block_k)`` activation tile into swizzled shared memory with TMA, ``num_stages``
deep (:func:`jax.experimental.pallas.mosaic_gpu.emit_pipeline_warp_specialized`), and each
compute warpgroup computes the transposed product ``W^T x^T`` for 64 weight rows: the
weight tile, unpacked to bfloat16 in registers, is the ``M = 64`` side of ``wgmma`` and the
padded batch its narrow ``N = block_m`` side (the operand swap of the small-batch problem).

Weights are stored ``(N, K)`` (``qjax.store_transposed``; layouts ``"n_pairs_nk"`` and
``"int8_nk"``):

* ``"n_pairs_nk"``: byte ``[c, k]`` holds ``W[k, 2c]`` (low nibble) and ``W[k, 2c + 1]``
  (high). One ``(64, block_k)`` int8 tile gives two bfloat16 operands, the low nibbles
  (output columns ``2c``) and the high ones (``2c + 1``), each against the same activation
  tile into its own accumulator: no interleave in the loop. Mosaic GPU allows only bitwise
  operations on 8-bit registers, so the low nibble is ``((b & 0xF) ^ 8)`` (the code plus 8)
  converted and shifted back by 8 in bfloat16, and the high one ``b & 0xF0`` (16 times the
  signed code) converted and scaled by 1/16 -- every step exact. The int8 -> bfloat16
  conversion is Mosaic GPU's four-instruction ``prmt`` / ``sub.bf16x2`` path.
* ``"int8_nk"``: the codes converted directly, one accumulator.

``split_k`` programs each cover ``K / split_k``; their float32 partials, written transposed
``(split_k, parts, N / parts, M)``, are summed, transposed back, scaled per output channel
and cast by one XLA fusion after the kernel. Per-channel scales only (a group size is
refused: :func:`check_config`). A batch under 8 rows in an 8-row tile is read out of bounds
by TMA (zeros on the GPU) and sliced away, with no extra copy; other ragged batches are padded
to the tile first (TMA refuses a tiled operand whose rows are 8 or more and not a multiple of
8), as is every ragged batch under interpretation (jax 0.10's interpreter refuses such reads).

Selected by a config with ``engine="wgmma", swap=True``: ``block_m`` is the padded batch
tile (``wgmma``'s N: a multiple of 8 up to 64), ``block_n`` the output columns per block
(64 weight rows -- 128 int4 or 64 int8 columns -- per compute warpgroup, one or two
warpgroups), ``block_k`` the K step, ``num_stages`` the TMA pipeline depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qjax.kernels._common import BlockConfig, cdiv

LAYOUTS = ("n_pairs_nk", "int8_nk")
_ROWS = 64  # weight rows per compute warpgroup: wgmma's M
_SMEM_BYTES = 227 * 1024  # sm_90 shared memory per block
_BF16 = jnp.bfloat16


def _parts(layout: str) -> int:
    """Output columns per weight row: two nibbles (int4 packed along N) or one code."""
    return 2 if layout == "n_pairs_nk" else 1


def num_compute_warpgroups(cfg: BlockConfig, layout: str) -> int:
    """Compute warpgroups of a block: ``block_n`` output columns over 64 weight rows each."""
    return cfg.block_n // (_ROWS * _parts(layout))


def smem_bytes(cfg: BlockConfig, layout: str) -> int:
    """Shared memory of one block: ``num_stages`` weight and activation tiles in flight plus
    the float32 output tiles of every warpgroup and part."""
    wgs = num_compute_warpgroups(cfg, layout)
    stage = wgs * _ROWS * cfg.block_k + cfg.block_m * cfg.block_k * 2
    out = wgs * _parts(layout) * _ROWS * cfg.block_m * 4
    return cfg.num_stages * stage + out + 1024  # barriers and alignment


def check_config(cfg: BlockConfig, kind: str, m: int, k: int, n: int, group_size, layout: str) -> None:
    """Raise ``ValueError`` naming the rule a weight-only ``wgmma`` config breaks.

    Rules: ``swap=True`` (the weight is ``wgmma``'s register operand); the weight stored
    ``(N, K)`` as ``"n_pairs_nk"`` (W4A16) or ``"int8_nk"`` (W8A16); per-channel scales;
    ``block_m`` a multiple of 8 up to 64; ``block_n`` one or two warpgroups of 64 weight
    rows (128 or 256 int4 columns, 64 or 128 int8 ones) dividing N; ``block_k`` in 64, 128,
    256 dividing ``K // split_k``; at least 2 stages; the shared memory within 227 KiB.
    """

    def bad(msg):
        raise ValueError(
            f"config {cfg} does not fit the weight-only wgmma kernel ({kind}) at M={m}, K={k}, N={n}: {msg}"
        )

    if not cfg.swap:
        bad("swap must be True: the weight is wgmma's register operand")
    if kind not in ("w4a16", "w8a16"):
        bad("it runs the weight-only ops (w4a16, w8a16); W8A8 is gpu_wgmma's non-swapped kernel")
    if layout not in LAYOUTS or (kind == "w4a16") != (layout == "n_pairs_nk"):
        bad(f"the weight must be stored (N, K): 'n_pairs_nk' for w4a16, 'int8_nk' for w8a16, got {layout!r}")
    if group_size is not None:
        bad("per-channel scales only (group scales run on the triton engine)")
    if cfg.persistent or cfg.dequant != "logic" or cfg.split_reduce != "xla":
        bad("persistent, dequant='ptx' and split_reduce='kernel' are options of the other engines")
    if cfg.block_m % 8 or not 8 <= cfg.block_m <= 64:
        bad("block_m (the padded batch tile, wgmma's N) must be a multiple of 8 up to 64")
    rows = _ROWS * _parts(layout)
    if cfg.block_n not in (rows, 2 * rows) or n % cfg.block_n:
        bad(f"block_n must be {rows} or {2 * rows} (one or two warpgroups of 64 weight rows) and divide N")
    if cfg.block_k not in (64, 128, 256):
        bad("block_k must be 64, 128 or 256")
    if cfg.split_k < 1 or k % cfg.split_k or (k // cfg.split_k) % cfg.block_k:
        bad("split_k must divide K and block_k must divide K // split_k")
    if cfg.num_stages < 2:
        bad("num_stages must be at least 2")
    if (need := smem_bytes(cfg, layout)) > _SMEM_BYTES:
        bad(f"needs {need} bytes of shared memory, more than {_SMEM_BYTES}")


def _tiled(dtype, minor: int):
    """Tiling and swizzle transforms of a shared-memory tile whose rows hold ``minor``
    elements of ``dtype`` (the widest swizzle the row allows, at most 128 bytes)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _operands(codes, layout: str):
    """The bfloat16 operands of one ``(64, block_k)`` int8 register tile: its low and high
    nibbles (int4 packed along N) or the codes."""
    if layout == "int8_nk":
        return (codes.astype(_BF16),)
    lo = ((codes & jnp.int8(0x0F)) ^ jnp.int8(0x08)).astype(_BF16) - _BF16(8)
    hi = (codes & jnp.int8(-16)).astype(_BF16) * _BF16(1 / 16)
    return lo, hi


def _kernel(w_gmem, x_gmem, o_gmem, o_smem, *, cfg: BlockConfig, layout: str, wgs: int):
    bm, bk = cfg.block_m, cfg.block_k
    parts = _parts(layout)
    block_rows = wgs * _ROWS
    kc = x_gmem.shape[1] // cfg.split_k
    ni, si, mi = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("m")

    def step(_, w_smem, x_smem, accs):
        codes = w_smem[pl.ds(lax.axis_index("wg") * _ROWS, _ROWS)]
        for acc, operand in zip(accs, _operands(codes, layout), strict=True):
            plgpu.wgmma(acc, operand, x_smem.T)
        plgpu.wgmma_wait(0)
        return accs

    def compute(run_pipeline):
        wg = lax.axis_index("wg")
        rows = pl.ds(ni * block_rows + wg * _ROWS, _ROWS)
        accs = {f"acc{p}": plgpu.ACC((_ROWS, bm), jnp.float32) for p in range(parts)}

        @functools.partial(pl.run_scoped, **accs)
        def _(**refs):
            accs = tuple(refs[f"acc{p}"] for p in range(parts))
            run_pipeline(accs)
            for p, acc in enumerate(accs):
                o_smem[wg, p] = acc[...]
            plgpu.commit_smem()
            for p in range(parts):
                plgpu.copy_smem_to_gmem(o_smem.at[wg, p], o_gmem.at[si, p, rows, pl.ds(mi * bm, bm)])
            plgpu.wait_smem_to_gmem(0)

    pipeline = plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(kc // bk,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((block_rows, bk), lambda kk: (0, kk), transforms=_tiled(jnp.int8, bk)),
            plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=_tiled(_BF16, bk)),
        ],
        wg_axis="wg",
        num_compute_wgs=wgs,
        max_concurrent_steps=cfg.num_stages,
        compute_context=compute,
    )
    pipeline(
        w_gmem.at[pl.ds(ni * block_rows, block_rows), pl.ds(si * kc, kc)],
        x_gmem.at[pl.ds(mi * bm, bm), pl.ds(si * kc, kc)],
    )


def weight_only_wgmma(x, w, scales, *, layout, group_size, out_dtype, config: BlockConfig, interpret=False):
    """``x @ W`` for a weight stored ``(N, K)`` as int8 or int4 packed along N, on Hopper.

    Args:
      x: ``(M, K)`` activations (cast to bfloat16).
      w: ``(N // 2, K)`` int8 bytes (``"n_pairs_nk"``) or ``(N, K)`` int8 codes (``"int8_nk"``).
      scales: float32 ``(N, 1)`` per-channel scales.
      layout: ``"n_pairs_nk"`` or ``"int8_nk"``.
      group_size: must be ``None``.
      out_dtype: result dtype.
      config: a config :func:`check_config` accepts (the caller checks).
      interpret: ``False``, or GPU interpret-mode parameters (tests).

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    del group_size  # per channel (check_config)
    m, n = x.shape[0], scales.shape[0]
    parts, wgs = _parts(layout), num_compute_warpgroups(config, layout)
    m_tiles = cdiv(m, config.block_m)
    mp = m_tiles * config.block_m
    if mp != m and (interpret or m > 8 or config.block_m > 8):
        # TMA zero-fills the rows past M, but only of an array under 8 rows (a tiled operand's
        # rows must be fewer than 8 or a multiple of 8: M = 13 failed on an H100); and jax
        # 0.10's interpreter refuses out-of-bounds reads. M < 8 in an 8-row tile (measured:
        # M = 1) needs no copy.
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    out = plgpu.kernel(
        functools.partial(_kernel, cfg=config, layout=layout, wgs=wgs),
        out_type=jax.ShapeDtypeStruct((config.split_k, parts, n // parts, mp), jnp.float32),
        scratch_types=[plgpu.SMEM((wgs, parts, _ROWS, config.block_m), jnp.float32)],
        grid=(n // parts // (wgs * _ROWS), config.split_k, m_tiles),
        grid_names=("n", "s", "m"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret or None,
    )(w, x.astype(_BF16))
    # (split, part, row, M) -> (M, row, part) -> (M, N): column row * parts + part
    y = out.sum(0).transpose(2, 1, 0).reshape(mp, n)[:m]
    return (y * scales.reshape(1, n)).astype(out_dtype)
