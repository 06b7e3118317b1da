"""W8A8 on Hopper through Pallas Mosaic GPU: TMA-fed, warp-specialized ``wgmma`` (s8 x s8 -> s32).

The Triton kernel in :mod:`qjax.kernels.gpu` covers every NVIDIA GPU and every layout; this
one exists for the large-batch int8 GEMM on Hopper (sm_90), where what decides speed is
keeping the tensor cores fed: one memory warpgroup streams ``(block_m, block_k)`` activation
and ``(block_n, block_k)`` weight tiles into swizzled shared memory with TMA, ``num_stages``
deep, while two compute warpgroups each issue ``wgmma`` on half of the ``block_m`` rows.
The per-token x per-channel rescale runs on the int32 accumulator in registers (scales
staged through shared memory in the accumulator's row / column layouts) and the tile leaves
through shared memory with a TMA store.

Constraints (checked by :func:`check_config_wgmma`):

* the weight is ``(N, K)`` (``b_layout="nk"``): 8-bit ``wgmma`` reads both operands
  K-major and has no transposed form;
* ``block_k == 128`` (one 128-byte swizzle row of int8), ``block_m`` in ``{128, 256}`` (two
  warpgroups of 64 or 128 rows), ``block_n`` a multiple of 64 up to 256 with each
  warpgroup's accumulator at most 64 x 256 or 128 x 128 (registers);
* ``block_n`` divides N, 128 divides K; M is padded up to ``block_m`` by the wrapper;
* the shared memory of ``num_stages`` input stages plus the output tiles fits in 227 KiB.

``persistent=True`` launches one block per SM; each loops over output tiles (grouped order)
with one set of pipeline buffers, so the next tile's loads overlap this tile's epilogue.

Selected through :class:`~qjax.kernels._common.BlockConfig` with ``engine="wgmma"``
(measured against the Triton configs in the same tuning run; see
``experiments/bench_kernels.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qjax.kernels import tuning
from qjax.kernels._common import BlockConfig, cdiv, grouped_tile

_SWIZZLE = 128  # bytes: one int8 K tile of 128 is one swizzle row
_BLOCK_K = 128
_SMEM_BYTES = 227 * 1024  # sm_90 shared memory per block
_EPI = 64  # epilogue tile (rows and columns) staged through shared memory


# The configs the benchmark tries (tests lower each for CUDA): (block_m, block_n, stages).
CONFIGS = tuple(
    BlockConfig(bm, bn, _BLOCK_K, num_stages=stages, engine="wgmma", persistent=persistent)
    for persistent in (False, True)
    for bm, bn, stages in ((128, 128, 4), (128, 256, 3), (256, 128, 3))
)


def available() -> bool:
    """Whether the default backend is a Hopper (sm_90) GPU, the one ``wgmma`` runs on."""
    return (tuning.gpu_compute_capability() or "").startswith("9.")


def smem_bytes(cfg: BlockConfig) -> int:
    """Shared memory one block of this config needs: input stages in flight, the epilogue's
    output tiles (two warpgroups, two slots, sized for float32 output) and the scales."""
    inputs = cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k
    out = 2 * 2 * _EPI * _EPI * 4
    scales = 4 * (cfg.block_m + 2 * cfg.block_n)
    return inputs + out + scales + 1024  # barriers and alignment


def check_config_wgmma(cfg: BlockConfig, m: int, k: int, n: int, b_layout: str) -> None:
    """Raise ``ValueError`` naming the rule a ``wgmma`` config breaks for this problem."""

    def bad(msg):
        raise ValueError(f"config {cfg} does not fit the wgmma W8A8 kernel at M={m}, K={k}, N={n}: {msg}")

    if b_layout != "nk":
        bad("8-bit wgmma reads the weight K-major: pass it as (N, K) with b_layout='nk'")
    if cfg.block_k != _BLOCK_K or k % _BLOCK_K:
        bad(f"block_k must be {_BLOCK_K} and divide K")
    if cfg.block_m not in (128, 256):
        bad("block_m must be 128 or 256 (two warpgroups of 64 or 128 rows)")
    wg_m = cfg.block_m // 2
    if cfg.block_n % 64 or not 64 <= cfg.block_n <= 256 or wg_m * cfg.block_n > 64 * 256:
        bad("block_n must be a multiple of 64, at most 256, and block_m // 2 * block_n <= 16384")
    if n % cfg.block_n:
        bad("block_n must divide N")
    if cfg.split_k != 1 or cfg.swap:
        bad("split_k and swap are for the Triton weight-only kernels")
    if cfg.num_stages < 2:
        bad("num_stages must be at least 2")
    if (need := smem_bytes(cfg)) > _SMEM_BYTES:
        bad(f"needs {need} bytes of shared memory, more than {_SMEM_BYTES}")


def _kernel(
    a_gmem, b_gmem, as_gmem, bs_gmem, o_gmem, row_smem, col_smem, out_smem, bars, *, cfg, num_m, num_n
):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    wg_m = bm // 2
    tr = (plgpu.TilingTransform((8, _SWIZZLE)), plgpu.SwizzleTransform(_SWIZZLE))

    def mma(_, a_smem, b_smem, acc_ref):
        wg = lax.axis_index("wg")
        plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * wg_m, wg_m)], b_smem.T)
        plgpu.wgmma_wait(1)  # keep one wgmma in flight; its tiles are released a step late
        return acc_ref

    def pipeline(compute):
        return plgpu.emit_pipeline_warp_specialized(
            mma,
            grid=(a_gmem.shape[1] // bk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=tr, delay_release=1),
                plgpu.BlockSpec((bn, bk), lambda kk: (0, kk), transforms=tr, delay_release=1),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.num_stages,
            compute_context=compute,
        )

    def tile(mi, ni, allocations=None):
        """Output tile ``(mi, ni)``: the K pipeline, then rescale and store."""

        def compute(eval_pipeline):
            wg = lax.axis_index("wg")
            rows = pl.ds(mi * bm + wg * wg_m, wg_m)
            plgpu.copy_gmem_to_smem(as_gmem.at[rows], row_smem.at[wg], bars.at[wg])
            plgpu.copy_gmem_to_smem(bs_gmem.at[pl.ds(ni * bn, bn)], col_smem.at[wg], bars.at[2 + wg])

            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((wg_m, bn), jnp.int32))
            def _(acc_ref):
                eval_pipeline(acc_ref)
                acc = acc_ref[...].astype(jnp.float32)
                plgpu.barrier_wait(bars.at[wg])
                plgpu.barrier_wait(bars.at[2 + wg])
                a_s = lax.broadcast_in_dim(row_smem[wg], acc.shape, [0])
                b_s = lax.broadcast_in_dim(col_smem[wg], acc.shape, [1])
                out = (acc * a_s * b_s).astype(out_smem.dtype)
                # leave through shared memory in _EPI x _EPI tiles, two slots in flight
                chunks = [(r, c) for r in range(0, wg_m, _EPI) for c in range(0, bn, _EPI)]
                for i, (r, c) in enumerate(chunks):
                    slot = out_smem.at[wg, i % 2]
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    slot[...] = out[r : r + _EPI, c : c + _EPI]
                    plgpu.commit_smem()
                    dst = o_gmem.at[pl.ds(mi * bm + wg * wg_m + r, _EPI), pl.ds(ni * bn + c, _EPI)]
                    plgpu.copy_smem_to_gmem(slot, dst)
                plgpu.wait_smem_to_gmem(0)

        pipeline(compute)(
            a_gmem.at[pl.ds(mi * bm, bm), :], b_gmem.at[pl.ds(ni * bn, bn), :], allocations=allocations
        )

    if not cfg.persistent:
        tile(*grouped_tile(lax.axis_index("tiles"), num_m, num_n))
        return
    # persistent: each block walks tiles (strided by the grid) with one set of pipeline
    # buffers, so its memory warpgroup fetches the next tile's first K steps while the
    # compute warpgroups run this tile's epilogue
    ignore = lambda *a, **k: None  # the pipeline body does not affect its allocations

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore).get_allocations(a_gmem, b_gmem),
        collective_axes="wg",
    )
    def _(allocations):
        @plgpu.nd_loop((num_m * num_n,), collective_axes="tiles")
        def _(info):
            (pid,) = info.index
            tile(*grouped_tile(pid, num_m, num_n), allocations)


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 -- an H100 / H200 SXM -- elsewhere,
    e.g. when lowering for CUDA on a CPU)."""
    if jax.default_backend() == "gpu":
        return int(getattr(jax.devices()[0], "core_count", 132))
    return 132


def int8_matmul_wgmma(
    a_q, b_nk, a_scale, b_scale, *, out_dtype, config: BlockConfig, interpret=False, num_blocks=None
):
    """``(a_q @ b_nk.T) * a_scale * b_scale`` with Hopper's int8 ``wgmma`` (Pallas Mosaic GPU).

    Args:
      a_q: ``(M, K)`` int8; b_nk: ``(N, K)`` int8 (the weight transposed).
      a_scale: float32 ``(M, 1)``; b_scale: float32 ``(1, N)``.
      out_dtype: result dtype.
      config: a config :func:`check_config_wgmma` accepts (the caller checks).
      interpret: ``False``, or GPU interpret-mode parameters (tests).
      num_blocks: with ``config.persistent``, the blocks launched (default: one per SM, at
        most one per tile).

    Returns:
      ``(M, N)`` array of ``out_dtype``.
    """
    m, n = a_q.shape[0], b_nk.shape[0]
    bm, bn = config.block_m, config.block_n
    num_m, num_n = cdiv(m, bm), n // bn
    mp = num_m * bm
    a_s = a_scale.reshape(m)
    if mp != m:  # rows past M compute zeros that are sliced away
        a_q = jnp.pad(a_q, ((0, mp - m), (0, 0)))
        a_s = jnp.pad(a_s, (0, mp - m))
    out_dtype = jnp.dtype(out_dtype)
    swizzle = plgpu.find_swizzle(_EPI * out_dtype.itemsize * 8)
    out_tr = (plgpu.TilingTransform((8, swizzle // out_dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
    kernel = functools.partial(_kernel, cfg=config, num_m=num_m, num_n=num_n)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
        scratch_types=[
            plgpu.SMEM((2, bm // 2), jnp.float32),
            plgpu.SMEM((2, bn), jnp.float32),
            plgpu.SMEM((2, 2, _EPI, _EPI), out_dtype, transforms=out_tr),
            plgpu.Barrier(num_barriers=4),
        ],
        grid=(min(num_blocks or num_sms(), num_m * num_n) if config.persistent else num_m * num_n,),
        grid_names=("tiles",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret or None,
    )(a_q, b_nk, a_s, b_scale.reshape(n))
    return out[:m] if mp != m else out
