"""2-D tile scales (``QuantSpec(tile_size=, tile_axis=)``, DeepSeek-V3's 128 × 128 fp8
blocks) against float64 references of each tile's range, through quantize, fake_quant,
stacked leaves and serving; block-wise fp8 checkpoints in and out."""

import math
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_gptq import _scan_and_unrolled

import qjax
from qjax.numerics.spec import spec_from_dict

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def _tile_absmax(w, bk, bn):
    """``(ceil(K/bk), ceil(N/bn))`` absmax of each tile of a ``(K, N)`` array, float64."""
    w = np.abs(np.asarray(w, np.float64))
    k, n = w.shape
    out = np.zeros((math.ceil(k / bk), math.ceil(n / bn)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = w[i * bk : (i + 1) * bk, j * bn : (j + 1) * bn].max()
    return out


@pytest.mark.parametrize("shape, bk, bn", [((256, 384), 128, 128), ((200, 300), 128, 128), ((40, 36), 16, 8)])
def test_fp8_tile_scales_are_each_tiles_absmax(shape, bk, bn):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=shape) * np.linspace(0.05, 4, shape[1]), jnp.float32)
    spec = qjax.fp8_block_spec((bn, bk))
    q = qjax.quantize(w, spec)
    want = np.repeat(_tile_absmax(w, bk, bn) / FP8_MAX, bn, axis=1)[:, : shape[1]]
    np.testing.assert_allclose(np.asarray(q.scale), want, rtol=1e-6)
    # codes: the weight over its tile's scale, rounded to nearest even onto e4m3
    scale_full = np.repeat(np.asarray(q.scale), bk, axis=0)[: shape[0]]
    codes = (np.asarray(w) / scale_full).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), codes.view(np.uint8))
    # fake_quant (QAT) rounds exactly as quantize then dequantize
    fq = jax.jit(lambda x: qjax.numerics.fake_quant(x, spec))(w)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(q.dequantize()))


def test_int8_minmax_tiles_and_a_stacked_leaf():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3, 32, 24)) + rng.normal(size=(3, 1, 24)) * 2, jnp.float32)
    spec = qjax.QuantSpec(
        qjax.uint8,
        symmetric=False,
        channel_axes=(0, -1),
        group_size=16,
        group_axis=1,
        tile_size=8,
        tile_axis=-1,
    )
    q = qjax.quantize(w, spec)
    wn = np.asarray(w, np.float64)
    for layer in range(3):
        lo = np.zeros((2, 3))
        hi = np.zeros((2, 3))
        for i in range(2):
            for j in range(3):
                t = wn[layer, i * 16 : (i + 1) * 16, j * 8 : (j + 1) * 8]
                lo[i, j], hi[i, j] = min(t.min(), 0), max(t.max(), 0)
        want = np.repeat((hi - lo) / 255, 8, axis=1)
        np.testing.assert_allclose(np.asarray(q.scale)[layer], want, rtol=1e-5)
    err = np.abs(np.asarray(q.dequantize()) - wn).max()
    assert err <= float(np.asarray(q.scale).max()) * 0.51


def test_a_scanned_stack_serves_per_layer_tiles():
    stack, _ = _scan_and_unrolled()  # nn.scan of Dense(32) "fc" layers, stacked (2, 32, 32)
    Stack = lambda: stack
    x = jax.random.normal(jax.random.key(0), (4, 32))
    v = Stack().init(jax.random.key(1), x)
    spec = qjax.QuantSpec(
        qjax.fp8_e4m3, channel_axes=(0, 2), group_size=16, group_axis=1, tile_size=8, tile_axis=2
    )
    policy = qjax.Policy([qjax.Rule(r".*kernel", weight=spec)])
    q = qjax.quantize_params(v, policy)
    kernel = v["params"]["layers"]["fc"]["kernel"]
    scale = np.asarray(q["params"]["layers"]["fc"]["kernel"].scale)
    for layer in range(2):
        want = np.repeat(_tile_absmax(kernel[layer], 16, 8) / FP8_MAX, 8, axis=1)
        np.testing.assert_allclose(scale[layer], want, rtol=1e-6)
    deq = qjax.dequantize_params(q)
    np.testing.assert_allclose(qjax.quantized(Stack().apply, policy)(q, x), Stack().apply(deq, x), atol=1e-5)
    fq = qjax.fake_quantized(Stack().apply, policy)(v, x)  # QAT slices the stack: per-layer tiles
    np.testing.assert_allclose(fq, Stack().apply(deq, x), atol=1e-5)


def test_block_fp8_checkpoints_load_exactly_and_write_back():
    rng = np.random.default_rng(2)
    weight = (rng.normal(size=(300, 200)) * 60).astype(ml_dtypes.float8_e4m3fn)  # (out, in)
    scale_inv = rng.uniform(1e-3, 1e-2, size=(3, 2)).astype(np.float32)
    q = qjax.from_fp8_blocks(weight, scale_inv, dtype=jnp.float32)
    full = np.repeat(np.repeat(scale_inv.astype(np.float64), 128, 0)[:300], 128, 1)[:, :200]
    want = (weight.astype(np.float64) * full).T
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), want, rtol=1e-7)
    back = qjax.to_fp8_blocks(q)
    np.testing.assert_array_equal(back["weight"].view(np.uint8), weight.view(np.uint8))
    np.testing.assert_array_equal(back["weight_scale_inv"], scale_inv)
    nk = qjax.from_fp8_blocks(weight, scale_inv, dtype=jnp.float32, layout="nk")  # for x @ w.T
    np.testing.assert_allclose(np.asarray(nk.dequantize(), np.float64), want.T, rtol=1e-7)
    back_nk = qjax.to_fp8_blocks(nk)
    np.testing.assert_array_equal(back_nk["weight"].view(np.uint8), weight.view(np.uint8))
    np.testing.assert_array_equal(back_nk["weight_scale_inv"], scale_inv)
    xk = jnp.asarray(rng.normal(size=(3, 200)), jnp.float32)
    torch_style = qjax.quantized(
        lambda p, x: x @ p["w"].T, qjax.Policy([qjax.Rule("w", weight=qjax.fp8_block_spec())])
    )
    np.testing.assert_allclose(
        np.asarray(torch_style({"w": nk}, xk), np.float64),
        np.asarray(xk, np.float64) @ want,
        rtol=2e-5,
        atol=2e-4,
    )
    small = qjax.from_fp8_blocks(weight[:, :100], scale_inv[:, :1])  # K <= 128: one group, as quantize makes
    like = qjax.quantize(jnp.ones((100, 300)), qjax.fp8_block_spec())
    assert (small.group_axis, small.group_size, small.scale.shape) == (
        like.group_axis,
        like.group_size,
        like.scale.shape,
    )
    raw = qjax.from_fp8_blocks(weight.view(np.uint8), scale_inv, dtype=jnp.float32)  # bytes work too
    np.testing.assert_array_equal(np.asarray(raw.dequantize()), np.asarray(q.dequantize()))
    # a float weight quantized with the block spec writes the checkpoint's layout
    w = jnp.asarray(rng.normal(size=(200, 300)), jnp.float32)
    out = qjax.to_fp8_blocks(qjax.quantize(w, qjax.fp8_block_spec()))
    np.testing.assert_allclose(out["weight_scale_inv"], _tile_absmax(w, 128, 128).T / FP8_MAX, rtol=1e-6)
    # served in a Dense layer: x @ W in float64
    x = jnp.asarray(rng.normal(size=(5, 200)), jnp.float32)
    y = qjax.quantized(lambda p, x: x @ p["k"], qjax.Policy([qjax.Rule("k", weight=qjax.fp8_block_spec())]))(
        {"k": q}, x
    )
    np.testing.assert_allclose(
        np.asarray(y, np.float64), np.asarray(x, np.float64) @ want, rtol=2e-5, atol=2e-4
    )


def test_errors_name_the_problem():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(300, 200)).astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv must be \(3, 2\)"):
        qjax.from_fp8_blocks(weight, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="NaN, Inf or non-positive"):
        qjax.from_fp8_blocks(weight, np.full((3, 2), np.nan, np.float32))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        qjax.from_fp8_blocks(weight.astype(np.float32), np.ones((3, 2), np.float32))
    nan_codes = weight.copy()
    nan_codes.view(np.uint8)[5, 7] = 0x7F
    with pytest.raises(ValueError, match=r"1 NaN codes \(first at \(out, in\) \[5, 7\]\)"):
        qjax.from_fp8_blocks(nan_codes, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        qjax.from_fp8_blocks(weight, np.ones((3, 2), np.float32), block=(128,))
    per_channel = qjax.quantize(jnp.ones((256, 256)), qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,)))
    with pytest.raises(ValueError, match="grouped by 128 along K"):
        qjax.to_fp8_blocks(per_channel)
    grouped = qjax.quantize(
        jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
        qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,), group_size=128, group_axis=0),
    )
    with pytest.raises(ValueError, match=r"scales differ within block \(in 0, out 0\)"):
        qjax.to_fp8_blocks(grouped)
    with pytest.raises(ValueError, match="tile_axis=0 must be one of channel_axes"):
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,), tile_size=8, tile_axis=0)
    with pytest.raises(ValueError, match="tile_size and tile_axis go together"):
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,), tile_size=8)
    with pytest.raises(ValueError, match="absmax / minmax"):
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,), tile_size=8, tile_axis=-1, calibration=qjax.calib.mse())
    with pytest.raises(ValueError, match=r"tile scales .* are for weights"):
        qjax.Rule("k", weight=qjax.fp8_block_spec(), act=qjax.fp8_block_spec())
    spec = qjax.fp8_block_spec((64, 32))
    assert spec_from_dict(spec.to_dict()) == spec


def test_gptq_rounds_a_tiled_leaf_to_nearest_with_a_warning():
    spec = qjax.QuantSpec(
        qjax.int8, channel_axes=(-1,), group_size=16, group_axis=0, tile_size=8, tile_axis=-1
    )
    w = {"k": jax.random.normal(jax.random.key(0), (32, 24))}
    x = jax.random.normal(jax.random.key(1), (64, 32))
    policy = qjax.Policy([qjax.Rule("k", weight=spec)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = qjax.gptq(lambda p, x: x @ p["k"], w, [(x,)], policy)
    assert any("2-D tile scales" in str(c.message) for c in caught)
    np.testing.assert_array_equal(q["k"].values, qjax.quantize_params(w, policy)["k"].values)


def test_the_cli_config_takes_tiles():
    from qjax._cli_common import CLIError
    from qjax._compress_config import _spec

    d = {"format": "fp8_e4m3", "channel_axes": [-1], "group_size": 128, "group_axis": 0, "tile_size": 128}
    assert _spec({**d, "tile_axis": -1}, "w") == qjax.QuantSpec(
        qjax.fp8_e4m3, channel_axes=(-1,), group_size=128, group_axis=0, tile_size=128, tile_axis=-1
    )
    with pytest.raises(CLIError, match="tile_size and tile_axis go together"):
        _spec(d, "w")


def test_sharded_weights_get_the_whole_weights_tiles():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    w = jax.random.normal(jax.random.key(0), (256, 64)) * jnp.linspace(0.1, 3, 64)
    spec = qjax.QuantSpec(
        qjax.fp8_e4m3, channel_axes=(-1,), group_size=32, group_axis=0, tile_size=16, tile_axis=-1
    )
    want = qjax.quantize(w, spec)
    # an Explicit mesh sharding K (the groups, FSDP-style) or N (the tiles): it raised before
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    for sharding in (P("a", None), P(None, "a"), P("a", "b")):
        ws = jax.device_put(w, NamedSharding(mesh, sharding))
        got = jax.jit(lambda x: qjax.quantize(x, spec))(ws)
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale), err_msg=str(sharding))
        np.testing.assert_array_equal(
            np.asarray(got.values).view(np.uint8), np.asarray(want.values).view(np.uint8)
        )
        fq = jax.jit(lambda x: qjax.numerics.fake_quant(x, spec))(ws)
        np.testing.assert_array_equal(np.asarray(fq), np.asarray(want.dequantize()))
    padded = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=40, pad_groups=True)
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "a")))  # the edge pad raised on a sharded array
    got = jax.jit(lambda x: qjax.quantize(x, padded))(ws)
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(qjax.quantize(w, padded).scale))
    nf4 = qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=32, group_axis=0)  # a table lookup
    ws = jax.device_put(w, NamedSharding(mesh, P("a", None)))
    got = jax.jit(lambda x: qjax.quantize(x, nf4).dequantize())(ws)  # the lookup raised on Explicit meshes
    np.testing.assert_array_equal(np.asarray(got), np.asarray(qjax.quantize(w, nf4).dequantize()))
    # QAT inside shard_map: a column-parallel shard 8 wide holds half a 16-wide tile
    auto = jax.make_mesh((8,), ("m",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(1), (4, 256))
    f = lambda p, x: x @ p["w"]
    sharded = lambda p, x: jax.shard_map(
        lambda w, x: x @ w, mesh=auto, in_specs=(P(None, "m"), P()), out_specs=P(None, "m")
    )(p["w"], x)
    policy = qjax.Policy([qjax.Rule("w", weight=spec)])
    with jax.set_mesh(auto):
        got = jax.jit(qjax.fake_quantized(sharded, policy))({"w": w}, x)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(qjax.fake_quantized(f, policy)({"w": w}, x)), atol=1e-4
    )


def test_the_dynamic_fast_path_keeps_the_tiles():
    # an ungrouped integer tile spec quantized on the fly used to skip the tile ranges
    from qjax.quant import quantized_dot_general

    w = jax.random.normal(jax.random.key(2), (32, 48)) * jnp.linspace(0.1, 3, 48)
    x = jax.random.normal(jax.random.key(3), (5, 32))
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(-1,), tile_size=16, tile_axis=-1)
    dn = (((1,), (0,)), ((), ()))
    on_the_fly = quantized_dot_general(x, w, dn, rhs_spec=spec)
    stored = quantized_dot_general(x, qjax.quantize(w, spec), dn)
    np.testing.assert_array_equal(np.asarray(on_the_fly), np.asarray(stored))
    want = np.asarray(x, np.float64) @ np.asarray(qjax.quantize(w, spec).dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(on_the_fly), want, rtol=1e-5, atol=1e-5)
