"""The Hopper weight-only kernel (Pallas Mosaic GPU: TMA-fed ``wgmma`` with the weight
unpacked in registers): within float32 rounding of float64 in JAX's GPU interpreter, lowers
for CUDA for every tuning candidate, refuses what it cannot run by name, and is picked by
dispatch only on Hopper and only where the tuning table measured it faster."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.kernels import BlockConfig, api, gpu_wgmma, gpu_wgmma_weight_only, tuning
from qjax.kernels.candidates import gpu_candidates
from qjax.numerics import packing

from .cuda_target import FULL_LOWERING
from .mgpu_interpret import interpret_params, transposed_wgmma_operands

WG = dict(swap=True, engine="wgmma")


def _operands(bits, m, k, n, seed):
    """Activations, the codes ``(K, N)``, the weight stored ``(N, K)`` (int4 packed along N:
    ``"n_pairs_nk"``) and per-channel scales ``(N, 1)``."""
    r = np.random.default_rng(seed)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    codes = r.integers(lo, hi + 1, (k, n))
    stored = jnp.asarray(codes.T, jnp.int8)
    w = packing.pack(stored, 4, axis=0) if bits == 4 else stored
    x = jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16)
    s = r.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    return x, codes, w, jnp.asarray(s)


def _run(bits, x, w, s, cfg, out_dtype=jnp.float32):
    kw = dict(b_layout="nk", platform="gpu", config=cfg, out_dtype=out_dtype, interpret=interpret_params())
    with transposed_wgmma_operands():
        if bits == 4:
            return api.w4a16_matmul(x, w, s, layout="n_pairs", **kw)
        return api.w8a16_matmul(x, w, s, **kw)


@pytest.mark.parametrize(
    "bits,m,k,n,wgs,bk,split,stages",
    [
        (4, 8, 512, 256, 1, 128, 2, 2),  # two K steps per split, two column blocks
        (4, 16, 512, 256, 2, 64, 4, 3),  # two warpgroups, more stages than steps
        (4, 13, 256, 512, 1, 256, 1, 2),  # batch padded to the tile, one K step, no split
        (4, 1, 512, 256, 2, 128, 2, 2),  # a single row
        (4, 24, 256, 128, 1, 128, 2, 2),  # two batch tiles of 16, the second one ragged
        (8, 8, 512, 128, 2, 128, 2, 2),
        (8, 5, 256, 64, 1, 64, 2, 3),
    ],
)
def test_interpreted_kernel_matches_float64(bits, m, k, n, wgs, bk, split, stages):
    x, codes, w, s = _operands(bits, m, k, n, seed=m * n + bits)
    rows = 64 * (2 if bits == 4 else 1)
    cfg = BlockConfig(8 if m <= 8 else 16, wgs * rows, bk, split, num_stages=stages, **WG)
    out = np.asarray(_run(bits, x, w, s, cfg), np.float64)
    ref = np.asarray(x, np.float64) @ (codes * np.asarray(s).T)
    # bf16 activations and integer codes are exact: only the float32 accumulation rounds
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_bf16_output_and_extreme_codes():
    """Every code value, bf16 output: the nibble arithmetic (``(b & 0xF) ^ 8`` less 8,
    ``b & 0xF0`` over 16) is exact for -8 and 7 alike."""
    k, n = 256, 256
    codes = np.tile(np.arange(-8, 8), (k, n // 16))
    stored = jnp.asarray(codes.T, jnp.int8)
    w = packing.pack(stored, 4, axis=0)
    x = jnp.ones((8, k), jnp.bfloat16)
    s = jnp.ones((n, 1), jnp.float32)
    cfg = BlockConfig(8, 128, 128, 2, num_stages=2, **WG)
    out = _run(4, x, w, s, cfg, out_dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.tile(codes.sum(0), (8, 1)))


@pytest.mark.parametrize(
    "cfg,kind,layout,group,match",
    [
        (BlockConfig(8, 256, 128, 2, num_stages=2, engine="wgmma"), "w4a16", "n_pairs_nk", None, "swap"),
        (BlockConfig(8, 256, 128, 2, num_stages=2, **WG), "w4a16", "n_pairs", None, "stored"),
        (BlockConfig(8, 256, 128, 2, num_stages=2, **WG), "w4a16", "k_pairs_nk", None, "n_pairs_nk"),
        (BlockConfig(8, 256, 128, 2, num_stages=2, **WG), "w4a16", "n_pairs_nk", 128, "per-channel"),
        (BlockConfig(12, 256, 128, 2, num_stages=2, **WG), "w4a16", "n_pairs_nk", None, "multiple of 8"),
        (BlockConfig(8, 192, 128, 2, num_stages=2, **WG), "w4a16", "n_pairs_nk", None, "128 or 256"),
        (BlockConfig(8, 256, 128, 2, num_stages=2, **WG), "w8a16", "int8_nk", None, "64 or 128"),
        (BlockConfig(8, 256, 32, 2, num_stages=2, **WG), "w4a16", "n_pairs_nk", None, "64, 128 or 256"),
        (BlockConfig(8, 256, 256, 5, num_stages=2, **WG), "w4a16", "n_pairs_nk", None, "split_k"),
        (BlockConfig(8, 256, 128, 2, num_stages=1, **WG), "w4a16", "n_pairs_nk", None, "num_stages"),
        (BlockConfig(64, 256, 256, 2, num_stages=5, **WG), "w4a16", "n_pairs_nk", None, "shared memory"),
        (BlockConfig(8, 256, 128, 2, num_stages=2, dequant="ptx", **WG), "w4a16", "n_pairs_nk", None, "ptx"),
        (BlockConfig(128, 128, 128, num_stages=2, **WG), "w8a8", "nk", None, "swap are for"),
    ],
)
def test_configs_the_kernel_cannot_run_are_rejected(cfg, kind, layout, group, match):
    with pytest.raises(ValueError, match=match):
        api.check_config_gpu(cfg, kind, 8, 1536, 768, group, layout)


def test_interpret_true_and_a_non_hopper_gpu_are_refused(monkeypatch):
    x, _, w, s = _operands(4, 8, 256, 256, seed=0)
    cfg = BlockConfig(8, 256, 128, 2, num_stages=2, **WG)
    call = lambda **kw: api.w4a16_matmul(
        x, w, s, layout="n_pairs", b_layout="nk", platform="gpu", config=cfg, **kw
    )
    with pytest.raises(ValueError, match="interpret parameters"):
        call(interpret=True)

    class Ampere:
        compute_capability = "8.0"

    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api.jax, "devices", lambda *a: [Ampere()])
    with pytest.raises(ValueError, match=r"needs a Hopper .* compute capability 8\.0"):
        call()


def _lower(kind, layout, m, size, cfg):
    x = jax.ShapeDtypeStruct((m, size), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((size // 2, size) if kind == "w4a16" else (size, size), jnp.int8)
    s = jax.ShapeDtypeStruct((size, 1), jnp.float32)
    kw = dict(b_layout="nk", platform="gpu", config=cfg)
    if kind == "w4a16":
        fn = lambda x, w, s: api.w4a16_matmul(x, w, s, layout="n_pairs", **kw)
    else:
        fn = lambda x, w, s: api.w8a16_matmul(x, w, s, **kw)
    # no abstract mesh (cuda_target's note): the Mosaic GPU call, already through its passes
    assert "mosaic_gpu" in jax.jit(fn).trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kind,layout", [("w4a16", "n_pairs_nk"), ("w8a16", "int8_nk")])
def test_every_tuning_candidate_lowers_for_cuda(kind, layout):
    """The candidates the tuning run times (batches 1-16 at K = N = 4096 and 8192); ``make
    test`` lowers each at one batch and size, ``make precheck-gpu`` at all of them."""
    lowered = 0
    for size in (4096, 8192):
        for m in (1, 4, 16):
            cands = [c for c in gpu_candidates(kind, m, size, size, None, layout) if c.engine == "wgmma"]
            assert cands, (kind, m, size)
            if not FULL_LOWERING and (m, size) not in ((1, 8192), (16, 4096)):
                continue
            for cfg in cands:
                _lower(kind, layout, m, size, cfg)
                lowered += 1
    assert lowered >= 16
    # not for group scales or weights stored (K, N)
    assert not [c for c in gpu_candidates(kind, 4, 4096, 4096, 128, layout) if c.engine == "wgmma"]
    kn = layout.removesuffix("_nk")
    assert not [c for c in gpu_candidates(kind, 4, 4096, 4096, None, kn) if c.engine == "wgmma"]


def test_candidates_fit_shared_memory():
    for kind, layout in (("w4a16", "n_pairs_nk"), ("w8a16", "int8_nk")):
        for cfg in gpu_candidates(kind, 16, 8192, 8192, None, layout):
            if cfg.engine == "wgmma":
                assert gpu_wgmma_weight_only.smem_bytes(cfg, layout) <= 227 * 1024


@pytest.mark.parametrize("hopper", [True, False])
def test_dispatch_takes_the_kernel_only_on_hopper_and_when_faster(monkeypatch, hopper):
    triton = BlockConfig(16, 256, 64, 8, False, 4, 4, dequant="ptx")
    wgmma = BlockConfig(8, 256, 128, 8, num_stages=4, **WG)
    entries = (
        tuning.TunedEntry("w4a16_n_pairs_nk", 4, 8192, 8192, None, triton, 20.0, 50.0),
        tuning.TunedEntry("w4a16_n_pairs_nk_wgmma", 4, 8192, 8192, None, wgmma, 15.0, 50.0),
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(gpu_wgmma, "available", lambda: hopper)
    assert ("wgmma" in api.engines_here("w4a16", "n_pairs_nk")) is hopper
    assert "wgmma" not in api.engines_here("w4a16", "n_pairs")  # weights stored (K, N)
    chosen = api.choose_config("gpu", "w4a16", 4, 8192, 8192, None, "n_pairs_nk", None, None)
    assert chosen == (wgmma if hopper else triton)
    assert tuning.kernel_name("w4a16", "n_pairs_nk", "wgmma") == "w4a16_n_pairs_nk_wgmma"


@pytest.mark.parametrize("m,bm", [(13, 16), (70, 16), (9, 8), (5, 8), (5, 16), (1, 8)])
def test_ragged_batches_lower_for_cuda_padded_only_where_tma_needs_it(m, bm):
    """TMA zero-fills the rows of a batch tile past M only for arrays under 8 rows (on an
    H100, M = 13 failed to lower: "dimension 0 must have size smaller or a multiple of its
    tiling 8"); those batches are padded to the tile first, and a batch under 8 rows in an
    8-row tile is not copied."""
    cfg = BlockConfig(bm, 128, 128, 2, **WG)
    _lower("w4a16", "n_pairs_nk", m, 1024, cfg)
    x = jax.ShapeDtypeStruct((m, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 1024), jnp.int8)
    s = jax.ShapeDtypeStruct((1024, 1), jnp.float32)
    fn = lambda x, w, s: api.w4a16_matmul(
        x, w, s, layout="n_pairs", b_layout="nk", platform="gpu", config=cfg
    )
    padded = "pad[" in str(jax.make_jaxpr(fn)(x, w, s))
    assert padded == (not (m < 8 and bm == 8))
