"""The Hopper W8A8 kernel (Pallas Mosaic GPU, ``wgmma``): bit-exact in JAX's GPU
interpreter, lowers for CUDA for every shipped config, rejects what it cannot run, and is
picked by dispatch only on Hopper and only where the tuning table measured it faster."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.kernels import BlockConfig, api, dispatch, gpu_wgmma, tuning
from qjax.kernels import _common as kc

from .mgpu_interpret import interpret_params, transposed_wgmma_operands

WG = dict(engine="wgmma", block_k=128)


def _operands(m, k, n, seed=0):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.integers(-128, 128, (m, k)), jnp.int8)
    b_nk = jnp.asarray(r.integers(-128, 128, (n, k)), jnp.int8)
    sa = jnp.asarray(r.uniform(0.5, 2.0, (m, 1)), jnp.float32)
    sb = jnp.asarray(r.uniform(0.5, 2.0, (1, n)), jnp.float32)
    return a, b_nk, sa, sb


def _run_interpreted(a, b_nk, sa, sb, cfg, out_dtype):
    with transposed_wgmma_operands():
        return api.int8_matmul(
            a,
            b_nk,
            sa,
            sb,
            b_layout="nk",
            platform="gpu",
            config=cfg,
            out_dtype=out_dtype,
            interpret=interpret_params(),
        )


@pytest.mark.parametrize(
    "m,k,n,bm,bn,stages",
    [
        (128, 256, 128, 128, 128, 2),  # one tile, two K steps
        (130, 384, 192, 128, 64, 3),  # M padded, three column tiles
        (1, 128, 64, 128, 64, 2),  # a single row
        (256, 512, 256, 256, 128, 2),  # 128-row warpgroups
        # (nine row tiles, where the grouped order's bands of 8 wrap, took 10 s interpreted: the
        # kernel maps each program through _common.grouped_tile, whose wrap
        # test_gpu_kernels.py::test_grouped_tile_order_visits_every_tile_once checks)
    ],
)
def test_interpreted_kernel_is_bit_exact(m, k, n, bm, bn, stages):
    a, b_nk, sa, sb = _operands(m, k, n, seed=m + n)
    cfg = BlockConfig(bm, bn, num_stages=stages, **WG)
    out = _run_interpreted(a, b_nk, sa, sb, cfg, jnp.float32)
    # the XLA formulation: int32 accumulator, then (acc * a_scale) * b_scale in float32
    ref = kc.xla_int8_matmul(a, b_nk, sa, sb, out_dtype=jnp.float32, b_layout="nk")
    assert out.shape == (m, n) and np.isfinite(np.asarray(out)).all()  # outputs start as NaN
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize(
    "m,k,n,bm,bn,stages,blocks",
    [
        (384, 256, 256, 128, 128, 2, 2),  # six tiles, three per block: buffers and barriers reused
        (1200, 384, 256, 256, 128, 3, 3),  # M padded; ten tiles over three blocks (uneven)
        (130, 256, 192, 128, 64, 2, 1),  # one block walks every tile
    ],
)
def test_persistent_kernel_is_bit_exact(m, k, n, bm, bn, stages, blocks):
    a, b_nk, sa, sb = _operands(m, k, n, seed=blocks)
    cfg = BlockConfig(bm, bn, num_stages=stages, persistent=True, **WG)
    api.check_config_gpu(cfg, "w8a8", m, k, n, None, "nk")
    with transposed_wgmma_operands():
        out = gpu_wgmma.int8_matmul_wgmma(
            a,
            b_nk,
            sa,
            sb,
            out_dtype=jnp.float32,
            config=cfg,
            interpret=interpret_params(),
            num_blocks=blocks,
        )
    ref = kc.xla_int8_matmul(a, b_nk, sa, sb, out_dtype=jnp.float32, b_layout="nk")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_interpreted_kernel_matches_integer_reference_in_bf16():
    a, b_nk, _, _ = _operands(128, 256, 128, seed=3)
    ones_a, ones_b = jnp.ones((128, 1), jnp.float32), jnp.ones((1, 128), jnp.float32)
    exact = np.asarray(a, np.int64) @ np.asarray(b_nk, np.int64).T
    cfg = BlockConfig(128, 128, num_stages=2, **WG)
    out32 = _run_interpreted(a, b_nk, ones_a, ones_b, cfg, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out32).astype(np.int64), exact)
    out16 = _run_interpreted(a, b_nk, ones_a, ones_b, cfg, jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out16), np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))
    )


def _lower_cuda(m, k, n, cfg, out_dtype=jnp.bfloat16):
    args = (
        jax.ShapeDtypeStruct((m, k), jnp.int8),
        jax.ShapeDtypeStruct((n, k), jnp.int8),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    f = lambda a, b, sa, sb: api.int8_matmul(
        a, b, sa, sb, b_layout="nk", platform="gpu", config=cfg, out_dtype=out_dtype
    )
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()  # no abstract mesh
    assert "mosaic_gpu" in text  # the Mosaic GPU custom call, already through Mosaic's passes
    return text


@pytest.mark.parametrize(
    "cfg", gpu_wgmma.CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}s{c.num_stages}{'p' * c.persistent}"
)
def test_every_shipped_config_lowers_for_cuda(cfg):
    _lower_cuda(4096, 4096, 4096, cfg)
    _lower_cuda(4096, 8192, 8192, cfg, jnp.float32)
    _lower_cuda(1000, 1536, 512, cfg)  # M padded to the tile


@pytest.mark.parametrize(
    "cfg,b_layout,match",
    [
        (BlockConfig(128, 128, num_stages=3, **WG), "kn", "K-major"),
        (BlockConfig(128, 128, 64, num_stages=3, engine="wgmma"), "nk", "block_k must be 128"),
        (BlockConfig(64, 128, num_stages=3, **WG), "nk", "block_m must be 128 or 256"),
        (BlockConfig(256, 256, num_stages=2, **WG), "nk", "block_n must be a multiple of 64"),
        (BlockConfig(128, 96, num_stages=2, **WG), "nk", "block_n must be a multiple of 64"),
        (BlockConfig(128, 256, num_stages=5, **WG), "nk", "shared memory"),
        (BlockConfig(128, 128, num_stages=1, **WG), "nk", "num_stages"),
        (BlockConfig(128, 128, split_k=2, num_stages=2, **WG), "nk", "split_k"),
        (BlockConfig(128, 128, 128, persistent=True), "nk", "persistent is a wgmma-engine option"),
    ],
)
def test_configs_the_kernel_cannot_run_are_rejected(cfg, b_layout, match):
    with pytest.raises(ValueError, match=match):
        api.check_config_gpu(cfg, "w8a8", 512, 512, 512, None, b_layout)


def test_bad_uses_of_the_engine_name_the_problem():
    a, b_nk, sa, sb = _operands(128, 256, 128)
    cfg = BlockConfig(128, 128, num_stages=2, **WG)
    call = lambda **kw: api.int8_matmul(a, b_nk, sa, sb, b_layout="nk", platform="gpu", **kw)
    with pytest.raises(ValueError, match="divide N"):
        api.int8_matmul(a, b_nk[:96], sa, sb[:, :96], b_layout="nk", platform="gpu", config=cfg)
    with pytest.raises(ValueError, match="interpret parameters"):
        call(config=cfg, interpret=True)
    with pytest.raises(ValueError, match="not int32"):
        call(config=cfg, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="engine must be one of"):
        call(config=dataclasses.replace(cfg, engine="cutlass"))
    with pytest.raises(ValueError, match="swap must be True"):  # the weight-only kernel's rules
        api.check_config_gpu(cfg, "w8a16", 128, 256, 128, None, "int8")
    with pytest.raises(ValueError, match="GPU kernel"):
        api.int8_matmul(a, b_nk, sa, sb, b_layout="nk", platform="tpu", config=cfg, interpret=True)


def test_smem_budget_covers_float32_output():
    for cfg in gpu_wgmma.CONFIGS:
        assert gpu_wgmma.smem_bytes(cfg) <= 227 * 1024
        assert cfg.block_m // 2 * cfg.block_n <= 64 * 256  # accumulator registers per warpgroup


def test_not_available_off_hopper():
    assert gpu_wgmma.available() is False  # the test machine is a CPU


W8A8_TOKENS = qjax.QuantSpec(qjax.int8, channel_axes=(0,))


@pytest.mark.parametrize("hopper", [True, False])
def test_auto_dispatch_takes_wgmma_only_on_hopper_and_when_faster(monkeypatch, hopper):
    triton = BlockConfig(16, 128, 128, 1, False, 4, 3)
    wgmma = BlockConfig(128, 128, num_stages=4, **WG)
    entries = (
        tuning.TunedEntry("w8a8_nk", 16, 256, 128, None, triton, 10.0, 12.0),
        tuning.TunedEntry("w8a8_nk_wgmma", 16, 256, 128, None, wgmma, 5.0, 12.0),
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    monkeypatch.setattr(gpu_wgmma, "available", lambda: hopper)
    w = qjax.quantize(
        jax.random.normal(jax.random.key(0), (256, 128)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    )
    x = jnp.ones((4, 256), jnp.bfloat16)
    plan, why = dispatch.plan(x, w, (((1,), (0,)), ((), ())), W8A8_TOKENS, None, None, "auto")
    assert plan is not None, why
    assert plan.layout == "nk" and plan.config == (wgmma if hopper else triton)
    # the same choice when int8_matmul picks its own config from the table
    assert api.choose_config("gpu", "w8a8", 4, 256, 128, None, "nk", None, None) == plan.config


def test_table_entries_keep_the_engine(tmp_path, monkeypatch):
    cfg = BlockConfig(128, 256, num_stages=3, **WG)
    e = tuning.TunedEntry(tuning.kernel_name("w8a8", "nk", "wgmma"), 4096, 4096, 4096, None, cfg, 1.0, 2.0)
    path = tmp_path / "tuning_gpu.json"
    tuning.write_table(path, "dev", "2026-11-26", [e])
    monkeypatch.setattr(tuning, "table_path", lambda platform: path)
    (back,) = tuning.load_table.__wrapped__("gpu")  # the loader, uncached
    assert back.kernel == "w8a8_nk_wgmma" and back.config == cfg
    # tables written before the engine field existed read as Triton configs
    assert BlockConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "engine"}).engine == "triton"


def test_a_non_hopper_gpu_is_refused_by_name(monkeypatch):
    a, b_nk, sa, sb = _operands(128, 256, 128)

    class Ampere:
        compute_capability = "8.0"

    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api.jax, "devices", lambda *a: [Ampere()])
    with pytest.raises(ValueError, match=r"needs a Hopper .* compute capability 8\.0"):
        api.int8_matmul(
            a, b_nk, sa, sb, b_layout="nk", platform="gpu", config=BlockConfig(128, 128, num_stages=2, **WG)
        )
