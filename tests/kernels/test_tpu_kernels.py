"""Pallas TPU kernels of :mod:`qjax.kernels.tpu`, checked on CPU.

* interpret mode (``interpret=True`` and ``pltpu.InterpretParams``) against numpy
  references built independently from the codes and scales: the int8 kernel bit-exact,
  the weight-only kernels within a proven bf16 error bound;
* unwritten output tiles: ``InterpretParams(uninitialized_memory="nan")`` fills output
  buffers with NaN before the kernel runs (shown below on a kernel that skips tiles), so
  every output of the ``InterpretParams`` runs must be finite;
* lowering to Mosaic for a TPU target (``lower(lowering_platforms=("tpu",))``) for the
  default configurations and a few others. This runs the Pallas -> Mosaic lowering and its
  block-shape checks, not the Mosaic compiler itself (that needs a TPU);
* the configuration rules, as ``ValueError`` s.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.kernels import tpu
from qjax.kernels._common import BlockConfig, k_perm_pairs_to_halves, pack_int4, xla_weight_only

NAN_PARAMS = pltpu.InterpretParams(uninitialized_memory="nan")
C = BlockConfig


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def test_interpret_params_poison_unwritten_tiles():
    """The NaN fill the finiteness checks rely on. Output blocks and scratch buffers start
    as NaN: a kernel that never writes an output tile (a wrong epilogue condition) or
    accumulates into a scratch it never zeroed leaves NaN. (A tile skipped *after* one was
    written inherits that tile's values from the reused VMEM buffer, as on hardware: the
    comparisons with the references catch that.)"""
    assert "uninitialized_memory" in {f.name for f in dataclasses.fields(pltpu.InterpretParams)}

    def kernel(x_ref, o_ref, acc_ref):
        @pl.when(pl.program_id(0) == 1)  # tile 0 is never written
        def _():
            o_ref[...] = x_ref[...]

        @pl.when(pl.program_id(0) == 2)  # accumulates into an unzeroed scratch
        def _():
            acc_ref[...] += x_ref[...]
            o_ref[...] = acc_ref[...]

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((24, 128), jnp.float32),
        grid=(3,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)],
        interpret=NAN_PARAMS,
    )(jnp.ones((24, 128), jnp.float32))
    out = np.asarray(out)
    assert np.all(np.isnan(out[:8])) and np.all(out[8:16] == 1) and np.all(np.isnan(out[16:]))


# -- int8 x int8 ------------------------------------------------------------------------------------

INT8_CASES = [
    # M, K, N, config, interpret
    (3, 384, 256, C(32, 128, 128), True),
    (130, 200, 384, C(64, 128, 128), True),  # M, K and N padded
    (130, 384, 256, None, NAN_PARAMS),
    (64, 1024, 384, C(32, 384, 512), NAN_PARAMS),
]


def _int8_operands(rng, m, k, n, unit_scales):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    a[0, :] = -128  # extremes: the largest accumulator, the sign of the minimum code
    b[:, 0] = -128
    if unit_scales:
        return a, b, np.ones((m, 1), np.float32), np.ones((1, n), np.float32)
    return (
        a,
        b,
        rng.uniform(1e-3, 1e-1, (m, 1)).astype(np.float32),
        rng.uniform(1e-3, 1e-1, (1, n)).astype(np.float32),
    )


@pytest.mark.parametrize("b_layout", ["kn", "nk"])
@pytest.mark.parametrize("m,k,n,config,interpret", INT8_CASES)
def test_int8_accumulator_bit_exact(rng, m, k, n, config, interpret, b_layout):
    a, b, sa, sb = _int8_operands(rng, m, k, n, unit_scales=True)
    ref = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(ref).max() <= 2**24  # exact in float32 (K = 1024: the -128 row x column reaches it)
    if b_layout == "nk":
        b = np.ascontiguousarray(b.T)
    out = tpu.int8_matmul_tpu(
        a, b, sa, sb, out_dtype=jnp.float32, config=config, b_layout=b_layout, interpret=interpret
    )
    assert out.shape == (m, n) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out).astype(np.int64), ref)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,config,interpret", INT8_CASES[1:3])
def test_int8_scaled_output(rng, m, k, n, config, interpret, out_dtype):
    a, b, sa, sb = _int8_operands(rng, m, k, n, unit_scales=False)
    acc = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32)
    ref = (acc * sa * sb).astype(np.float32)  # float32 products, same order as the kernel
    out = tpu.int8_matmul_tpu(a, b, sa, sb, out_dtype=out_dtype, config=config, interpret=interpret)
    assert out.dtype == out_dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    if out_dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(out, ref.astype(ml_dtypes.bfloat16).astype(np.float32))


# -- weight only ------------------------------------------------------------------------------------


def _pack_pairs(codes, axis):
    lo, hi = (codes[0::2], codes[1::2]) if axis == 0 else (codes[:, 0::2], codes[:, 1::2])
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8)


def _weight(rng, layout, k, n, group_size, pack_block):
    """Codes and scales drawn with numpy, the weight in ``layout`` and the float64
    dequantized weight computed from codes and scales alone."""
    hi = 128 if layout == "int8" else 8
    codes = rng.integers(-hi, hi, (k, n)).astype(np.int64)
    codes[0, :3] = -hi  # the sign nibble
    groups = 1 if group_size is None else k // group_size
    scales = rng.uniform(0.5, 2.0, (groups, n)).astype(np.float32)
    rows = k if group_size is None else group_size
    dense = (codes.reshape(groups, rows, n) * scales[:, None, :].astype(np.float64)).reshape(k, n)
    if layout == "int8":
        w = codes.astype(np.int8)
    elif layout == "k_halves":
        w = np.asarray(pack_int4(codes, pack_block=pack_block))
    else:
        w = _pack_pairs(codes, 0 if layout == "k_pairs" else 1)
    return w, scales, dense


def _assert_within_bf16_bound(out, x, dense, out_dtype):
    """``|out - x @ W| <= (2^-8 + K 2^-24) (|x| @ |W|)``: bf16 rounding of both MXU
    operands (2^-9 each) plus float32 accumulation; one more bf16 rounding of the result."""
    ref = x.astype(np.float64) @ dense
    bound = (2.0**-8 * 1.01 + x.shape[1] * 2.0**-24) * (np.abs(x).astype(np.float64) @ np.abs(dense))
    if out_dtype == jnp.bfloat16:
        bound += 2.0**-8 * np.abs(ref)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.isfinite(out).all()
    excess = np.abs(out - ref) - bound
    assert excess.max() <= 0, (
        f"bound exceeded by {excess.max()} at {np.unravel_index(excess.argmax(), ref.shape)}"
    )


WO_CASES = [
    # layout, group_size, pack_block, M, K, N, config, interpret
    ("int8", None, None, 1, 256, 256, None, True),
    ("int8", 128, None, 5, 512, 256, C(8, 128, 256), True),  # 2 groups per K tile
    ("int8", 256, None, 17, 512, 256, C(16, 128, 128), NAN_PARAMS),  # a group over 2 K tiles
    ("int8", 64, None, 130, 384, 384, C(64, 256, 256), True),  # K padded (zero groups), N padded
    ("k_halves", None, 256, 5, 512, 256, None, True),
    ("k_halves", 64, 256, 1, 512, 256, None, NAN_PARAMS),  # 2 groups per nibble half
    ("k_halves", 128, 256, 17, 512, 384, C(16, 128, 256), True),  # 1 group per nibble half
    ("k_halves", 512, 256, 130, 1024, 256, None, True),  # a group over 2 K tiles
    ("k_halves", 128, 512, 5, 1024, 128, None, True),
    ("k_pairs", None, None, 5, 512, 256, C(8, 256, 256), True),
    ("k_pairs", 64, None, 17, 512, 256, None, NAN_PARAMS),
    ("k_pairs", 128, None, 1, 768, 256, C(8, 128, 512), True),  # K padded
    ("k_pairs", 256, None, 130, 512, 128, C(32, 128, 256), True),  # one group per K tile
    ("n_pairs", None, None, 1, 256, 512, None, True),
    ("n_pairs", 64, None, 5, 512, 256, None, True),
    ("n_pairs", 128, None, 17, 512, 768, C(16, 512, 256), NAN_PARAMS),  # N padded
    ("n_pairs", 256, None, 130, 512, 256, C(32, 256, 128), True),
]


@pytest.mark.parametrize("layout,group_size,pack_block,m,k,n,config,interpret", WO_CASES)
def test_weight_only(rng, layout, group_size, pack_block, m, k, n, config, interpret):
    w, scales, dense = _weight(rng, layout, k, n, group_size, pack_block)
    x = rng.normal(size=(m, k)).astype(np.float32)
    kw = dict(layout=layout, group_size=group_size, pack_block=pack_block)
    out = tpu.weight_only_matmul_tpu(
        x, w, scales, out_dtype=jnp.float32, config=config, interpret=interpret, **kw
    )
    assert out.shape == (m, n) and out.dtype == jnp.float32
    _assert_within_bf16_bound(out, x, dense, jnp.float32)
    # and the XLA formulation, within twice the bound (both err from the exact product)
    xla = np.asarray(xla_weight_only(x, w, scales, out_dtype=jnp.float32, **kw), np.float64)
    bound = (2.0**-7 * 1.01 + k * 2.0**-23) * (np.abs(x).astype(np.float64) @ np.abs(dense))
    assert np.all(np.abs(np.asarray(out, np.float64) - xla) <= bound)


NK_CASES = [
    # layout (a weight stored (N, K)), group_size, M, K, N, config, interpret
    ("int8_nk", None, 1, 256, 256, None, True),
    ("int8_nk", 128, 5, 512, 256, C(8, 128, 128), NAN_PARAMS),
    ("int8_nk", 256, 17, 512, 384, C(16, 128, 128), True),  # a group over 2 K tiles, N padded
    ("k_pairs_nk", None, 5, 512, 256, C(8, 256, 256), True),
    ("k_pairs_nk", 256, 130, 768, 256, C(32, 128, 256), NAN_PARAMS),  # K padded
    ("k_pairs_nk", 512, 1, 1024, 128, None, True),
    ("n_pairs_nk", None, 1, 256, 512, None, True),
    ("n_pairs_nk", 128, 17, 512, 768, C(16, 512, 128), NAN_PARAMS),  # N padded
    ("n_pairs_nk", 256, 130, 512, 256, C(32, 256, 256), True),
]


@pytest.mark.parametrize("layout,group_size,m,k,n,config,interpret", NK_CASES)
def test_weight_only_nk(rng, layout, group_size, m, k, n, config, interpret):
    """The weight stored (N, K) (PyTorch's (out, in)): int8, or int4 packed along K or N,
    scales (N, K // group) in its orientation."""
    base = layout.removesuffix("_nk")
    w_kn, scales, dense = _weight(rng, "int8", k, n, group_size, None)
    codes = np.asarray(w_kn, np.int64) if base == "int8" else None
    if base != "int8":  # redraw int4 codes: the same dense reference from codes and scales
        hi = 8
        codes = rng.integers(-hi, hi, (k, n)).astype(np.int64)
        rows = k if group_size is None else group_size
        dense = (codes.reshape(-1, rows, n) * scales[:, None, :].astype(np.float64)).reshape(k, n)
    stored = codes.T  # (N, K)
    w = {
        "int8": stored.astype(np.int8),
        "k_pairs": _pack_pairs(stored, 1),
        "n_pairs": _pack_pairs(stored, 0),
    }[base]
    x = rng.normal(size=(m, k)).astype(np.float32)
    out = tpu.weight_only_matmul_tpu(
        x,
        w,
        scales.T,
        layout=layout,
        group_size=group_size,
        pack_block=None,
        out_dtype=jnp.float32,
        config=config,
        interpret=interpret,
    )
    assert out.shape == (m, n)
    _assert_within_bf16_bound(out, x, dense, jnp.float32)


def test_weight_only_nk_errors():
    x = jnp.ones((8, 512), jnp.bfloat16)
    w = jnp.zeros((256, 512), jnp.int8)
    with pytest.raises(ValueError, match=r"group_size=64 must be a multiple of config\.block_k=128"):
        tpu.weight_only_matmul_tpu(
            x,
            w,
            jnp.ones((256, 8)),
            layout="int8_nk",
            group_size=64,
            pack_block=None,
            out_dtype=jnp.float32,
            config=C(8, 128, 128),
            interpret=True,
        )
    with pytest.raises(ValueError, match="multiple of 256 for an \\(N, K\\) weight packed along K"):
        tpu.weight_only_matmul_tpu(
            x,
            jnp.zeros((256, 256), jnp.uint8),
            jnp.ones((256, 1)),
            layout="k_pairs_nk",
            group_size=None,
            pack_block=None,
            out_dtype=jnp.float32,
            config=C(8, 128, 128),
            interpret=True,
        )


@pytest.mark.parametrize("layout", ["int8_nk", "k_pairs_nk", "n_pairs_nk"])
def test_lowering_weight_only_nk(layout):
    base = layout.removesuffix("_nk")
    k, n = 2048, 512
    w_shape = {"int8": (n, k), "k_pairs": (n, k // 2), "n_pairs": (n // 2, k)}[base]
    for m, g in ((1, None), (16, 128), (130, 256), (600, 1024)):
        if base == "k_pairs" and g == 128:
            continue  # packed along K: 256-wide K tiles, so groups of at least 256
        args = (
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct(w_shape, jnp.int8 if base == "int8" else jnp.uint8),
            jax.ShapeDtypeStruct((n, 1 if g is None else k // g), jnp.float32),
        )
        f = lambda x, w, s, g=g: tpu.weight_only_matmul_tpu(
            x, w, s, layout=layout, group_size=g, pack_block=None, out_dtype=jnp.bfloat16
        )
        _lower_tpu(f, *args)


@pytest.mark.parametrize("layout,pack_block", [("int8", None), ("k_halves", 256), ("n_pairs", None)])
def test_weight_only_bf16_in_out(rng, layout, pack_block):
    m, k, n, g = 5, 512, 256, 128
    w, scales, dense = _weight(rng, layout, k, n, g, pack_block)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    out = tpu.weight_only_matmul_tpu(
        x,
        w,
        scales,
        layout=layout,
        group_size=g,
        pack_block=pack_block,
        out_dtype=jnp.bfloat16,
        interpret=True,
    )
    assert out.dtype == jnp.bfloat16
    _assert_within_bf16_bound(out, np.asarray(x, np.float32), dense, jnp.bfloat16)


def test_pairs_to_halves_is_the_common_permutation(rng):
    x = rng.normal(size=(3, 1024)).astype(np.float32)
    for bk in (256, 512):
        np.testing.assert_array_equal(tpu._pairs_to_halves(x, bk), x[:, k_perm_pairs_to_halves(1024, bk)])


# -- lowering for TPU ---------------------------------------------------------------------------------


def _lower_tpu(f, *args):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("m", [1, 130, 600])
def test_lowering_int8_defaults(m):
    for k, n in ((256, 256), (512, 384), (200, 130)):
        args = (
            jax.ShapeDtypeStruct((m, k), jnp.int8),
            jax.ShapeDtypeStruct((k, n), jnp.int8),
            jax.ShapeDtypeStruct((m, 1), jnp.float32),
            jax.ShapeDtypeStruct((1, n), jnp.float32),
        )
        _lower_tpu(lambda *a: tpu.int8_matmul_tpu(*a, out_dtype=jnp.bfloat16), *args)
        nk = (args[0], jax.ShapeDtypeStruct((n, k), jnp.int8), *args[2:])
        _lower_tpu(lambda *a: tpu.int8_matmul_tpu(*a, out_dtype=jnp.bfloat16, b_layout="nk"), *nk)


def _wo_args(layout, m, k, n, group_size, x_dtype=jnp.bfloat16):
    w_shape = {"int8": (k, n), "n_pairs": (k, n // 2)}.get(layout, (k // 2, n))
    return (
        jax.ShapeDtypeStruct((m, k), x_dtype),
        jax.ShapeDtypeStruct(w_shape, jnp.int8 if layout == "int8" else jnp.uint8),
        jax.ShapeDtypeStruct((1 if group_size is None else k // group_size, n), jnp.float32),
    )


@pytest.mark.parametrize("layout", ["int8", "k_halves", "k_pairs", "n_pairs"])
def test_lowering_weight_only_defaults(layout):
    pack_block = 256 if layout == "k_halves" else None
    for m, g in ((1, None), (16, 32), (130, 64), (1, 128), (600, 256), (5, 1024)):
        k, n = 2048, 512
        f = lambda x, w, s, g=g: tpu.weight_only_matmul_tpu(
            x, w, s, layout=layout, group_size=g, pack_block=pack_block, out_dtype=jnp.bfloat16
        )
        _lower_tpu(f, *_wo_args(layout, m, k, n, g))


@pytest.mark.parametrize(
    "layout,group_size,pack_block,config",
    [
        ("int8", 128, None, C(8, 512, 1024)),
        ("int8", 8, None, C(8, 128, 128)),
        ("k_halves", 128, 512, C(256, 256, 512)),
        ("k_pairs", 16, None, C(32, 128, 256)),
        ("n_pairs", None, None, C(64, 1024, 128)),
    ],
)
def test_lowering_weight_only_configs(layout, group_size, pack_block, config):
    f = lambda x, w, s: tpu.weight_only_matmul_tpu(
        x,
        w,
        s,
        layout=layout,
        group_size=group_size,
        pack_block=pack_block,
        out_dtype=jnp.float32,
        config=config,
    )
    _lower_tpu(f, *_wo_args(layout, 40, 1024, 1024, group_size, jnp.float32))


# -- configuration rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,match",
    [
        (C(16, 128, 128), r"block_m=16 must be a multiple of 32"),
        (C(32, 200, 128), r"block_n=200 must be a multiple of 128"),
        (C(32, 128, 64), r"block_k=64 must be a multiple of 128"),
        (C(32, 128, 128, split_k=2), r"split_k=2 is not supported.*must be 1"),
        (C(32, 128, 128, split_reduce="kernel"), r"split_reduce='kernel' is a GPU option"),
        (C(32, 128, 128, split_reduce="Kernel"), r"split_reduce='Kernel' must be one of \('xla', 'kernel'\)"),
        (C(0, 128, 128), r"block_m=0 must be a positive int"),
    ],
)
def test_int8_config_errors(config, match):
    a, b = jnp.zeros((4, 256), jnp.int8), jnp.zeros((256, 128), jnp.int8)
    with pytest.raises(ValueError, match=match):
        tpu.int8_matmul_tpu(a, b, jnp.ones((4, 1)), jnp.ones((1, 128)), out_dtype=jnp.float32, config=config)


@pytest.mark.parametrize(
    "layout,group_size,pack_block,config,match",
    [
        ("int8", None, None, C(4, 128, 128), r"block_m=4 must be a multiple of 8"),
        ("int8", None, None, C(8, 64, 128), r"block_n=64 must be a multiple of 128"),
        (
            "n_pairs",
            None,
            None,
            C(8, 128, 128),
            r"block_n=128 must be a multiple of 256 for layout 'n_pairs'",
        ),
        ("int8", None, None, C(8, 128, 192), r"block_k=192 must be a multiple of 128"),
        (
            "k_pairs",
            None,
            None,
            C(8, 128, 128),
            r"block_k=128 must be a multiple of 256 for layout 'k_pairs'",
        ),
        ("k_halves", None, 256, C(8, 128, 512), r"block_k=512 must equal pack_block=256"),
        (
            "int8",
            384,
            None,
            C(8, 128, 256),
            r"block_k=256 must be a multiple of group_size=384, or group_size a",
        ),
        ("int8", 4, None, C(8, 128, 128), r"group_size=4 must be a multiple of 8"),
        ("k_pairs", 8, None, C(8, 128, 256), r"group_size / 2=4 must be a multiple of 8"),
        ("k_halves", 256, 768, C(8, 128, 768), r"group_size=256 must divide block_k / 2=384"),
    ],
)
def test_weight_only_config_errors(layout, group_size, pack_block, config, match):
    k, n = 1536, 512
    args = [jnp.zeros(s.shape, s.dtype) for s in _wo_args(layout, 8, k, n, group_size)]
    with pytest.raises(ValueError, match=match):
        tpu.weight_only_matmul_tpu(
            *args,
            layout=layout,
            group_size=group_size,
            pack_block=pack_block,
            out_dtype=jnp.float32,
            config=config,
        )


def test_default_configs_follow_the_rules():
    assert tpu.default_config_tpu("weight_only", 1, 4096, 4096, 128, "k_halves", 512).block_k == 512
    cfg = tpu.default_config_tpu("int8_matmul", 3, 384, 256, None, "int8", None)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (32, 256, 128)
    cfg = tpu.default_config_tpu("weight_only", 1, 960, 512, 96, "int8", None)
    assert cfg.block_k % 96 == 0 and cfg.block_k % 128 == 0
    with pytest.raises(ValueError, match="kind="):
        tpu.default_config_tpu("gemm", 1, 256, 256, None, "int8", None)
