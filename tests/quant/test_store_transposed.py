"""``qjax.store_transposed``: quantized weights stored ``(N, K)`` behind ``(K, N)`` models.

The model (a Flax ``Dense``, an ``nn.scan`` stack, a ``shard_map`` body) still reads a
``(K, N)`` kernel; ``qjax.quantized`` folds the stored swap into the matmul, so the result
equals the untransposed weights' and the program moves no weight codes."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import qjax
from qjax.graph.trace import abstract_params
from qjax.numerics import TransposedQArray

TOK8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
W4G = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=32)


class MLP(nn.Module):
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(96, dtype=self.dtype)(x))
        return nn.Dense(32, dtype=self.dtype)(x)


def _code_moves(jaxpr: str) -> list[str]:
    """Transposes of integer arrays (weight codes) in a printed jaxpr."""
    return re.findall(r"[ui](?:4|8)\[[\d,]+\] = transpose", jaxpr)


def _setup(spec, act, dtype=None, x_dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (6, 64)).astype(x_dtype)
    model = MLP(dtype)
    v = model.init(jax.random.key(1), x)
    pol = qjax.Policy([qjax.Rule(".*kernel", weight=spec, act=act)])
    qp = qjax.quantize_params(v, pol)
    return model, x, pol, qp, qjax.store_transposed(qp, r".*/kernel")


CASES = {
    "w8a8": (W8, TOK8),
    "w8a16": (W8, None),
    "w4a16-g32": (W4G, None),
    "w4a16-packed-k": (qjax.QuantSpec(qjax.int4, channel_axes=(-1,), pack_axis=0), None),
}


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["f32", "bf16-dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_dense_serves_the_same_values_without_moving_codes(case, dtype):
    spec, act = CASES[case]
    model, x, pol, qp, tp = _setup(spec, act, dtype)
    kernel = tp["params"]["Dense_0"]["kernel"]
    assert isinstance(kernel, TransposedQArray) and kernel.shape == (64, 96)
    assert kernel.stored.shape == (96, 64)
    f = jax.jit(qjax.quantized(model.apply, pol, backend="xla"))
    want, got = np.asarray(f(qp, x), np.float32), np.asarray(f(tp, x), np.float32)
    if act is not None:  # int8 x int8 -> int32 sums are exact in any order
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-2 if dtype else 1e-5, atol=1e-5)
    # the swap is folded into the dot, also behind the bf16 cast of Dense(dtype=bf16)
    assert _code_moves(str(jax.make_jaxpr(f)(tp, x))) == []
    np.testing.assert_array_equal(
        np.asarray(qjax.dequantize_params(tp)["params"]["Dense_0"]["kernel"]),
        np.asarray(qjax.dequantize_params(qp)["params"]["Dense_0"]["kernel"]),
    )
    assert qjax.footprint(tp).total == qjax.footprint(qp).total


@pytest.mark.parametrize(
    "case,backend", [("w8a8", "interpret-gpu"), ("w4a16-g32", "interpret-gpu"), ("w8a8", "interpret-tpu")]
)
def test_kernels_read_the_stored_weight_in_place(case, backend):
    """With the interpreted kernels, W8A8 on a stored (N, K) weight takes the kernel's
    (N, K) operand as it is (no transpose in the program), W4A16 its ``_nk`` layouts."""
    spec, act = CASES[case]
    model, x, pol, qp, tp = _setup(spec, act, x_dtype=jnp.bfloat16)
    f = qjax.quantized(model.apply, pol, backend=backend)
    jaxpr = str(jax.make_jaxpr(f)(tp, x))
    assert "pallas_call" in jaxpr and _code_moves(jaxpr) == []
    ref = qjax.quantized(model.apply, pol, backend="xla")(qp, x)
    got = f(tp, x)
    np.testing.assert_allclose(
        np.asarray(got, np.float32),
        np.asarray(ref, np.float32),
        rtol=2e-2,
        atol=2e-2 * float(jnp.max(jnp.abs(ref))),
    )


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(32)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
            x, None
        )
        return x


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-act", "static-act-per-layer"])
def test_stacked_scan_weights_slice_per_layer_without_moving_codes(static):
    x = jax.random.normal(jax.random.key(0), (5, 32))
    v = Stack().init(jax.random.key(1), x)
    act = qjax.QuantSpec(qjax.int8) if static else TOK8
    pol = qjax.Policy(
        [qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=act)]
    )
    stats = qjax.calibrate(Stack().apply, pol, v, [x]) if static else None
    qp = qjax.quantize_params(v, pol, act_stats=stats)
    tp = qjax.store_transposed(qp, ".*kernel")
    stacked = tp["params"]["ScanScanBlock_0"]["Dense_0"]["kernel"]
    assert stacked.shape == (3, 32, 32) and stacked.stored.scale.shape == (3, 32, 1)
    if static:  # one calibrated activation scale per layer, sliced with the layer
        assert stacked.stored.act_scale.shape == (3,)
    f = jax.jit(qjax.quantized(Stack().apply, pol))
    np.testing.assert_array_equal(np.asarray(f(tp, x)), np.asarray(f(qp, x)))
    jaxpr = str(jax.make_jaxpr(f)(tp, x))
    assert _code_moves(jaxpr) == [] and "f32[3,32,32]" not in jaxpr  # no float copy of the stack


@pytest.mark.parametrize("mode", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_inside_shard_map_the_stored_weight_is_split_along_its_stored_axes(mode):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k[0], (16, 32)), "w2": jax.random.normal(k[1], (32, 8))}
    x = jax.random.normal(k[2], (8, 16))
    specs = (P(None, "model"), P("model", None), P("data", None))

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    def sharded(p, x):
        body = lambda w1, w2, x: jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "model")
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("data", None))(p["w1"], p["w2"], x)

    pol = qjax.Policy([qjax.Rule("w.*", weight=W8, act=qjax.QuantSpec(qjax.int8))])
    qp = qjax.quantize_params(params, pol)
    tp = qjax.store_transposed(qp, "w.*")
    # partition rules name the logical (K, N) axes, as the shard_map's in_specs do
    tps = jax.device_put(tp, qjax.parallel.shardings(tp, [("w1", specs[0]), ("w2", specs[1])], mesh))
    assert tuple(tps["w1"].stored.values.sharding.spec) == ("model", None)
    put = lambda a, s: jax.device_put(a, jax.NamedSharding(mesh, s))
    qps = jax.device_put(qp, qjax.parallel.shardings(qp, [("w1", specs[0]), ("w2", specs[1])], mesh))
    with jax.set_mesh(mesh):
        serve = jax.jit(qjax.quantized(sharded, pol))
        y, want = serve(tps, put(x, specs[2])), serve(qps, put(x, specs[2]))
        jaxpr = str(jax.make_jaxpr(serve)(tps, put(x, specs[2])))
    # the same per-shard program (dynamic activation scales are per shard in both)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert _code_moves(jaxpr) == []
    unsharded = qjax.quantized(mlp, pol)(tp, x)
    scale = float(jnp.max(jnp.abs(unsharded)))
    np.testing.assert_allclose(np.asarray(y), unsharded, rtol=0.05, atol=0.05 * scale)


def test_partition_rules_name_the_logical_axes():
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model, x, pol, qp, tp = _setup(W4G, None)
    rules = [(r".*Dense_0/kernel", P("tensor", None)), (r".*Dense_1/kernel", P(None, "tensor"))]
    sh = qjax.parallel.shardings(tp, rules, mesh)
    plain = qjax.parallel.shardings(qp, rules, mesh)
    for name in ("Dense_0", "Dense_1"):
        got, want = sh["params"][name]["kernel"], plain["params"][name]["kernel"]
        assert isinstance(got, TransposedQArray)
        for part in ("values", "scale"):
            swapped = tuple(getattr(want, part).spec) + (None,) * 2
            assert tuple(getattr(got.stored, part).spec) == (swapped[1], swapped[0])
    placed = jax.device_put(tp, sh)
    with jax.set_mesh(mesh):
        y = jax.jit(qjax.quantized(model.apply, pol))(placed, x)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(qjax.quantized(model.apply, pol)(qp, x)), rtol=1e-5, atol=1e-5
    )


def test_traced_as_the_logical_array_with_its_sharding_in_explicit_mode():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    t = qjax.transpose_storage(qjax.quantize(jnp.ones((8, 16)), W8))  # stored (16, 8)
    t = jax.tree.map(lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("tensor", None))), t)
    sds = abstract_params({"w": t})["w"]
    assert sds.shape == (8, 16) and tuple(sds.sharding.spec) == (None, "tensor")


def test_checkpoint_round_trip_and_mismatch_message(tmp_path):
    _, _, _, qp, tp = _setup(W4G, None)
    qjax.checkpoint.save(tmp_path / "t", tp)
    for restored in (qjax.checkpoint.restore(tmp_path / "t"), qjax.checkpoint.restore(tmp_path / "t", tp)):
        kernel = restored["params"]["Dense_0"]["kernel"]
        assert isinstance(kernel, TransposedQArray)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tp)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="'params/Dense_0/kernel' differs in transposed"):
        qjax.checkpoint.restore(tmp_path / "t", qp)


def test_store_transposed_rules_and_errors():
    _, _, _, qp, tp = _setup(W8, None)
    again = qjax.store_transposed(tp, r".*/kernel")  # idempotent
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(tp)):
        assert a is b
    only_first = qjax.store_transposed(qp, [r".*Dense_0/kernel", r"nothing-here-.*"][:1])
    assert isinstance(only_first["params"]["Dense_0"]["kernel"], TransposedQArray)
    assert isinstance(only_first["params"]["Dense_1"]["kernel"], qjax.QArray)
    with pytest.raises(ValueError, match=r"patterns \['typo/.\*'\] match no leaf"):
        qjax.store_transposed(qp, [r".*/kernel", r"typo/.*"])
    with pytest.raises(
        ValueError, match=r"leaf 'params/Dense_0/bias' \(matched pattern '.\*/bias'\) is a Array"
    ):
        qjax.store_transposed(qp, r".*/bias")
    with pytest.raises(ValueError, match="rank >= 2"):
        qjax.store_transposed({"b": qjax.quantize(jnp.ones(4), W8)}, "b")
    with pytest.raises(ValueError, match="already quantized"):
        qjax.quantize_params(tp, qjax.Policy([qjax.Rule(".*kernel", weight=W8)]))
    with pytest.raises(
        TypeError, match="'params/Dense_0/kernel' is quantized: apply masks before quantizing"
    ):
        qjax.prune.apply_masks(tp, {"params/Dense_0/kernel": jnp.ones((64, 96), bool)})


def test_fake_quantized_and_calibrate_read_the_logical_weight():
    """Handlers that apply a rule's spec to the float weight see it in the model's layout."""
    model, x, pol, qp, tp = _setup(W8, TOK8)
    for fn in (
        lambda p: qjax.fake_quantized(model.apply, pol)(p, x),
        lambda p: qjax.fake_quantized(model.apply, pol, integer_forward=False)(p, x),
        lambda p: qjax.distill.capture(model.apply, [r".*Dense_0/kernel"])(p, x)[1],
    ):
        for a, b in zip(jax.tree.leaves(fn(tp)), jax.tree.leaves(fn(qp))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gptq", "awq", "awq_factors", "smoothquant", "smoothquant_factors"])
def test_transforms_of_float_weights_refuse_quantized_ones(name):
    model, x, pol, qp, tp = _setup(W8, None)
    call = {
        "gptq": lambda p: qjax.gptq(model.apply, p, [x], pol),
        "awq": lambda p: qjax.awq(model.apply, p, [x], pol),
        "awq_factors": lambda p: qjax.quant.awq_factors(model.apply, p, [x], pol),
        "smoothquant": lambda p: qjax.smoothquant(model.apply, p, [x]),
        "smoothquant_factors": lambda p: qjax.quant.smoothquant_factors(model.apply, p, [x]),
    }[name]
    for params in (qp, tp):
        with pytest.raises(
            ValueError, match=r"leaf 'params/Dense_0/kernel' is already quantized; pass the float"
        ):
            call(params)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.Conv(32, (1, 1))(x)  # pointwise: run as a dot
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("case", ["w8a8", "w4a16-packed-k"])
def test_conv_kernels_stored_transposed_serve_the_same_values(case):
    """A rule that also matches conv kernels: their swap is replayed on the codes (correct;
    store_transposed is meant for matmul weights)."""
    spec, act = CASES[case]
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    v = CNN().init(jax.random.key(1), x)
    pol = qjax.Policy([qjax.Rule(".*kernel", weight=spec, act=act)])
    qp = qjax.quantize_params(v, pol)
    f = jax.jit(qjax.quantized(CNN().apply, pol))
    want, got = f(qp, x), f(qjax.store_transposed(qp, ".*kernel"), x)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want)))
    )
