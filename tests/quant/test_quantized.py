"""``quantized``: integer execution of whole functions, against integer references."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax

TOK8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


def _codes(x, spec):
    q = qjax.quantize(x, spec)
    return np.asarray(q.unpacked_values()).astype(np.int64), np.asarray(q.scale, np.float64)


def test_single_matmul_integer_part_is_exact():
    x = jax.random.normal(jax.random.key(0), (32, 64))
    w = jax.random.normal(jax.random.key(1), (64, 48)) * 0.1
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=TOK8)])
    qp = qjax.quantize_params({"w": w}, policy)
    y = np.asarray(jax.jit(qjax.quantized(lambda p, x: x @ p["w"], policy))(qp, x), np.float64)
    xq, sx = _codes(x, qjax.QuantSpec(qjax.int8, channel_axes=(0,)))
    wq, sw = _codes(w, W8)
    acc = xq @ wq  # the integer reference
    recovered = y / (sx * sw)
    np.testing.assert_array_equal(np.round(recovered), acc)
    np.testing.assert_allclose(recovered, acc, atol=2e-3 * np.abs(acc).max())


def test_int8_dot_in_the_program_and_no_float_weight():
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=TOK8)])
    qp = qjax.quantize_params({"w": jnp.ones((64, 48))}, policy)
    hlo = jax.jit(qjax.quantized(lambda p, x: x @ p["w"], policy)).lower(qp, jnp.ones((32, 64))).as_text()
    assert "xi8>" in hlo and "xi32>" in hlo
    assert "tensor<64x48xf32>" not in hlo  # the weight is never widened to a float matrix


def test_asymmetric_static_activation_zero_point_correction():
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (16, 32))) + 0.5
    w = jax.random.normal(jax.random.key(1), (32, 8))
    act = qjax.QuantSpec(qjax.uint8, symmetric=False)
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=act)])
    f = lambda p, x: x @ p["w"]
    stats = qjax.calibrate(f, policy, {"w": w}, [x])
    qp = qjax.quantize_params({"w": w}, policy, act_stats=stats)
    assert qp["w"].act_zero_point is not None
    y = np.asarray(qjax.quantized(f, policy)(qp, x), np.float64)
    s, zp = float(qp["w"].act_scale), int(qp["w"].act_zero_point)
    xq = np.clip(np.round(np.asarray(x, np.float64) / s) + zp, 0, 255).astype(np.int64)
    wq, sw = _codes(w, W8)
    ref = ((xq - zp) @ wq) * s * sw
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_grouped_int4_weights_split_the_contraction():
    x = jax.random.normal(jax.random.key(0), (8, 64))
    w = jax.random.normal(jax.random.key(1), (64, 16))
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0)
    for act in (None, TOK8):
        policy = qjax.Policy([qjax.Rule("w", weight=spec, act=act)])
        qp = qjax.quantize_params({"w": w}, policy)
        y = qjax.quantized(lambda p, x: x @ p["w"], policy)(qp, x)
        xr = x if act is None else qjax.fake_quant(x, qjax.QuantSpec(qjax.int8, channel_axes=(0,)))
        ref = np.asarray(xr, np.float64) @ np.asarray(qp["w"].dequantize(), np.float64)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=8)(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(32)(nn.gelu(nn.Dense(64)(h)))


@pytest.mark.parametrize(
    "model,shape",
    [(MLP(), (16, 20)), (CNN(), (4, 8, 8, 3)), (Block(), (2, 10, 32))],
    ids=["mlp", "cnn", "transformer_block"],
)
@pytest.mark.parametrize("mode", ["w8a8_dynamic", "w8a8_static", "w4a16"])
def test_models_match_fake_quant_reference(model, shape, mode):
    x = jax.random.normal(jax.random.key(0), shape)
    v = model.init(jax.random.key(1), x)
    if mode == "w4a16":
        rule = qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)))
    else:
        act = TOK8 if mode == "w8a8_dynamic" else qjax.QuantSpec(qjax.int8)
        rule = qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=act)
    policy = qjax.Policy([rule])
    stats = qjax.calibrate(model.apply, policy, v, [x]) if mode == "w8a8_static" else None
    qv = qjax.quantize_params(v, policy, act_stats=stats)
    y = jax.jit(qjax.quantized(model.apply, policy))(qv, x)
    yf = model.apply(v, x)
    rel = float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf))
    assert rel < (0.25 if mode == "w4a16" else 0.05), rel
    if mode != "w8a8_static":  # same quantized values as QAT's fake quantization
        ref = qjax.fake_quantized(model.apply, policy)(v, x)
        np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3 * float(jnp.abs(ref).max()))


def test_float_params_are_quantized_on_the_fly_identically():
    x = jax.random.normal(jax.random.key(0), (16, 20))
    v = MLP().init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=TOK8)])
    a = qjax.quantized(MLP().apply, policy)(v, x)
    b = qjax.quantized(MLP().apply, policy)(qjax.quantize_params(v, policy), x)
    np.testing.assert_array_equal(a, b)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(16)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
            x, None
        )
        return nn.remat(nn.Dense)(4)(jax.jit(jnp.tanh)(x))


def test_scan_stack_per_layer_scales_remat_and_jit():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    v = Stack().init(jax.random.key(1), x)
    act = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy(
        [
            qjax.Rule(".*ScanBlock.*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=act),
            qjax.Rule(".*kernel", weight=W8, act=act),
        ]
    )
    stats = qjax.calibrate(Stack().apply, policy, v, [x, 0.5 * x])
    qv = qjax.quantize_params(v, policy, act_stats=stats)
    stacked = qv["params"]["ScanScanBlock_0"]["Dense_0"]["kernel"]
    assert stacked.scale.shape == (3, 1, 16) and stacked.act_scale.shape == (3,)
    y = jax.jit(qjax.quantized(Stack().apply, policy))(qv, x)
    yf = Stack().apply(v, x)
    assert float(jnp.linalg.norm(y - yf) / jnp.linalg.norm(yf)) < 0.05
    hlo = jax.jit(qjax.quantized(Stack().apply, policy)).lower(qv, x).as_text()
    assert hlo.count("xi32>") >= 3


@pytest.mark.parametrize("axes", [(0, -1), (-1,)], ids=["per-layer", "shared-across-layers"])
def test_lsq_scales_inside_a_scan_are_sliced_per_layer(axes):
    """Learned scales of a stacked leaf read inside ``nn.scan``: each layer uses its slice
    (per-layer scales) or the shared one, exactly as fake-quantizing the stacked leaf
    outside the model does, forward and gradient; the exported model agrees."""
    x = jax.random.normal(jax.random.key(0), (8, 16))
    v = Stack().init(jax.random.key(1), x)
    lsq = qjax.QuantSpec(qjax.int4, channel_axes=axes, ste="lsq")
    policy = qjax.Policy([qjax.Rule(".*ScanBlock.*kernel", weight=lsq), qjax.Rule(".*kernel", weight=W8)])
    path = "params/ScanScanBlock_0/Dense_0/kernel"
    scales = qjax.lsq_scales(v, policy)
    assert scales[path].shape == ((3, 1, 16) if axes == (0, -1) else (1, 1, 16))

    def qat(s):
        return qjax.fake_quantized(Stack().apply, policy, scales=s)(v, x)

    def reference(s):  # no interpreter: the stacked leaf fake-quantized as a whole
        return Stack().apply(qjax.fake_quant_params(v, policy, scales=s), x)

    np.testing.assert_allclose(qat(scales), reference(scales), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda s: jnp.sum(qat(s) ** 2))(scales)[path]
    g_ref = jax.grad(lambda s: jnp.sum(reference(s) ** 2))(scales)[path]
    assert float(jnp.abs(g_ref).sum()) > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    exported = qjax.quantized(Stack().apply, policy)(qjax.quantize_params(v, policy, scales=scales), x)
    np.testing.assert_allclose(exported, qat(scales), rtol=1e-4, atol=1e-4)
    bad = {path: jnp.ones((2, 1, 16))}  # neither one per layer nor shared
    with pytest.raises(ValueError, match=r"ScanScanBlock_0/Dense_0/kernel.*leading axis must be 3"):
        qat(bad)


def test_nnx_model_one_line():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16))
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=TOK8)])
    graphdef, state = nnx.split(model)
    qstate = qjax.quantize_params(state, policy)
    y = qjax.quantized(qjax.nnx_apply(graphdef), policy)(qstate, x)
    assert float(jnp.linalg.norm(y - model(x)) / jnp.linalg.norm(model(x))) < 0.05


def test_unmatched_layers_stay_float_and_bad_layouts_fall_back():
    x = jax.random.normal(jax.random.key(0), (16, 20))
    v = MLP().init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.Rule("params/Dense_0/kernel", weight=W8, act=TOK8)])
    y = qjax.quantized(MLP().apply, policy)(v, x)
    dense0 = qjax.fake_quantized(MLP().apply, policy)(v, x)
    np.testing.assert_allclose(y, dense0, rtol=1e-4, atol=1e-5)
    assert policy.unused(v) == []
    # a layout the scales cannot follow (flattening a per-channel kernel) runs in float
    f = lambda p, x: x @ p["w"].reshape(-1)[: 20 * 4].reshape(20, 4)
    w = jax.random.normal(jax.random.key(2), (20, 4))
    qp = qjax.quantize_params({"w": w}, qjax.Policy([qjax.Rule("w", weight=W8)]))
    np.testing.assert_allclose(
        qjax.quantized(f, qjax.Policy([qjax.Rule("w", weight=W8)]))(qp, x),
        x @ qp["w"].dequantize(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_rule_names_the_path():
    x = jax.random.normal(jax.random.key(0), (16, 20))
    v = MLP().init(jax.random.key(1), x)
    policy = qjax.Policy(
        [qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0,)), act=TOK8)]
    )
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        qjax.quantized(MLP().apply, policy)(v, x)


def test_qat_with_fake_quantized_converges_and_exports():
    # 3-class problem, W4A8 QAT from a float init, then integer execution of the result
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    centers = jax.random.normal(k1, (3, 20)) * 2
    labels = jax.random.randint(k2, (512,), 0, 3)
    x = centers[labels] + jax.random.normal(k3, (512, 20))
    model = MLP()
    v = model.init(jax.random.key(4), x[:1])
    policy = qjax.Policy(
        [qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)), act=TOK8)]
    )
    import optax

    opt = optax.adam(3e-3)

    def loss_fn(p):
        logits = qjax.fake_quantized(model.apply, policy)(p, x)[:, :3]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss

    s = opt.init(v)
    first = None
    for _ in range(150):
        v, s, loss = step(v, s)
        first = float(loss) if first is None else first
    assert float(loss) < 0.2 * first
    served = qjax.quantized(model.apply, policy)(qjax.quantize_params(v, policy), x)[:, :3]
    assert float((served.argmax(-1) == labels).mean()) > 0.9


def test_jnp_split_of_a_fused_weight_is_followed():
    """``q, k, v = jnp.split(w, 3, axis=1)`` (a fused QKV projection; jax lowers it to the
    ``split`` primitive) quantizes like ``w[:, a:b]``: integer dots, calibration, QAT
    (before, the split hid the weight from every transform and the model ran in float)."""
    x = jax.random.normal(jax.random.key(0), (6, 8))
    w = jax.random.normal(jax.random.key(1), (8, 12))
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=TOK8)])

    def split(p, x):
        q, k, v = jnp.split(p["w"], 3, axis=1)
        return (x @ q) * (x @ k) + x @ v

    def sliced(p, x):
        q, k, v = p["w"][:, :4], p["w"][:, 4:8], p["w"][:, 8:]
        return (x @ q) * (x @ k) + x @ v

    qp = qjax.quantize_params({"w": w}, policy)
    for params in ({"w": w}, qp):
        np.testing.assert_array_equal(
            qjax.quantized(split, policy)(params, x), qjax.quantized(sliced, policy)(params, x)
        )
    np.testing.assert_array_equal(
        qjax.fake_quantized(split, policy)({"w": w}, x), qjax.fake_quantized(sliced, policy)({"w": w}, x)
    )
    assert not np.allclose(qjax.quantized(split, policy)(qp, x), split({"w": w}, x), atol=1e-3)
    hlo = jax.jit(qjax.quantized(split, policy)).lower(qp, x).as_text()
    assert "xi8>" in hlo and "xi32>" in hlo
    static = qjax.Policy([qjax.Rule("w", weight=W8, act=qjax.QuantSpec(qjax.int8))])
    assert set(qjax.calibrate(split, static, {"w": w}, [(x,)])) == {"w"}


def test_unfollowable_layout_of_a_float_weight_runs_on_its_quantized_value():
    """A layout the scales cannot follow (a slice cutting an int4 group) falls back to the
    float op on the dequantized weight for float params too, as for pre-quantized ones
    (before, float params ran on the raw float weight: no quantization, silently)."""
    x = jax.random.normal(jax.random.key(0), (3, 8))
    w = jax.random.normal(jax.random.key(1), (8, 4))
    spec = qjax.QuantSpec(qjax.int4, group_axis=0, group_size=4)
    policy = qjax.Policy([qjax.Rule("w", weight=spec)])
    f = lambda p, x: x[:, :6] @ p["w"][:6]
    want = np.asarray(x[:, :6], np.float64) @ np.asarray(qjax.quantize(w, spec).dequantize(), np.float64)[:6]
    for params in ({"w": w}, qjax.quantize_params({"w": w}, policy)):
        np.testing.assert_allclose(qjax.quantized(f, policy)(params, x), want, rtol=1e-5, atol=1e-5)


def test_a_range_from_an_op_that_never_ran_is_refused():
    """An untaken ``cond`` branch has a NaN calibration range; ``quantize_params`` refuses
    it naming the leaf, instead of storing a NaN activation scale (NaN outputs)."""
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}
    f = lambda p, x, flag: jax.lax.cond(flag, lambda: x @ p["a"], lambda: x @ p["b"])
    policy = qjax.Policy([qjax.Rule("a|b", weight=W8, act=qjax.QuantSpec(qjax.int8))])
    stats = qjax.calibrate(f, policy, params, [(x, True)])
    assert np.isnan(stats["b"].hi)
    with pytest.raises(ValueError, match=r"leaf 'b'.*never ran"):
        qjax.quantize_params(params, policy, act_stats=stats)
    del stats["b"]  # dynamic activation quantization for it instead
    qp = qjax.quantize_params(params, policy, act_stats=stats)
    assert np.all(np.isfinite(qjax.quantized(f, policy)(qp, x, False)))


def test_policy_type_and_short_leaf_names_in_errors():
    rules = [qjax.Rule("w", weight=W8)]
    for make in (qjax.quantized, qjax.fake_quantized, qjax.dispatch_report):
        with pytest.raises(TypeError, match=r"qjax.Policy\(\[...\]\)"):
            make(lambda p, x: x @ p["w"], rules)
    with pytest.raises(TypeError, match=r"must be a qjax\.Policy"):
        qjax.calibrate(lambda p, x: x @ p["w"], rules, {"w": jnp.ones((8, 4))}, [(jnp.ones((2, 8)),)])
    # a leaf named "w" is named although "w" occurs in every error message
    bad = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0,)))])
    with pytest.raises(ValueError, match=r"^leaf 'w' \(matched rule 0 'w'\)"):
        qjax.quantized(lambda p, x: x @ p["w"], bad)({"w": jnp.ones((8, 4))}, jnp.ones((3, 8)))


def test_a_quantized_embedding_lookup_reads_the_deployed_values():
    """An ``nn.Embed`` lookup (a gather, not a matmul) of a leaf the policy quantizes reads
    the quantized table under QAT and under ``quantized`` on float params, as the deployed
    model does; QAT's gradient is the straight-through one of ``fake_quant_params``."""

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(50)(nn.Embed(50, 16)(ids))

    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 50)
    model = LM()
    v = model.init(jax.random.key(0), ids)
    policy = qjax.Policy(
        [
            qjax.Rule(r"params/.*embedding", weight=qjax.QuantSpec(qjax.int4, channel_axes=(0,))),
            qjax.Rule(r"params/.*kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,))),
        ]
    )
    served = np.asarray(qjax.quantized(model.apply, policy)(qjax.quantize_params(v, policy), ids))
    reference = model.apply(qjax.fake_quant_params(v, policy), ids)
    np.testing.assert_allclose(served, reference, atol=1e-6)
    qat = qjax.fake_quantized(model.apply, policy)(v, ids)
    on_the_fly = qjax.quantized(model.apply, policy)(v, ids)
    np.testing.assert_allclose(np.asarray(qat), served, atol=1e-6)
    np.testing.assert_allclose(np.asarray(on_the_fly), served, atol=1e-6)
    assert np.abs(served - np.asarray(model.apply(v, ids))).max() > 1e-2  # int4 moves the output

    loss = lambda out: jnp.sum(out**2)
    g_qat = jax.grad(lambda p: loss(qjax.fake_quantized(model.apply, policy)(p, ids)))(v)
    g_ref = jax.grad(lambda p: loss(model.apply(qjax.fake_quant_params(p, policy), ids)))(v)
    for a, b in zip(jax.tree.leaves(g_qat), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_qat_refuses_what_deployment_refuses_and_checks_scale_paths():
    """A weight scale along the summed axis is refused by ``fake_quantized`` for every
    setting (before training), as ``quantized`` refuses it; a misspelt ``scales`` path is
    an error, as for ``fake_quant_params``."""
    p = {"w": jax.random.normal(jax.random.key(0), (16, 4))}
    x = jax.random.normal(jax.random.key(1), (2, 16))
    f = lambda p, x: x @ p["w"]
    per_input_row = qjax.QuantSpec(qjax.int4, channel_axes=(0,))
    for act in (None, TOK8):
        policy = qjax.Policy([qjax.Rule("w", weight=per_input_row, act=act)])
        with pytest.raises(ValueError, match="which the op sums over"):
            qjax.quantized(f, policy)(qjax.quantize_params(p, policy), x)
        for integer_forward in (True, False):
            with pytest.raises(ValueError, match=r"leaf 'w'.*which the op sums over"):
                qjax.fake_quantized(f, policy, integer_forward=integer_forward)(p, x)
    grouped = qjax.Policy(
        [qjax.Rule("w", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=8))]
    )
    np.testing.assert_allclose(  # per group along the summed axis deploys, and trains
        np.asarray(qjax.fake_quantized(f, grouped)(p, x)),
        np.asarray(qjax.quantized(f, grouped)(qjax.quantize_params(p, grouped), x)),
        atol=1e-5,
    )
    lsq = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq"))])
    scales = qjax.lsq_scales(p, lsq)
    with pytest.raises(ValueError, match=r"not leaves of params: \['W'\]"):
        qjax.fake_quantized(f, lsq, scales={"W": scales["w"]})(p, x)


def test_a_leaf_whose_activations_no_matmul_quantizes_is_reported():
    """A weight built at call time from several leaves (or padded) is no target, so its
    rule's ``act`` spec cannot apply: every transform warns, naming each leaf and its reader."""
    p = {n: jax.random.normal(jax.random.key(i), (8, 4)) for i, n in enumerate(("wq", "wk", "wv"))}
    x = jax.random.normal(jax.random.key(5), (3, 8))
    fused = lambda p, x: x @ jnp.concatenate([p["wq"], p["wk"], p["wv"]], 1)
    w8a8 = qjax.Policy([qjax.Rule("w.", weight=W8, act=TOK8)])
    runs = (
        lambda f, pol: qjax.quantized(f, pol)(p, x),
        lambda f, pol: qjax.fake_quantized(f, pol)(p, x),
        lambda f, pol: qjax.calibrate(f, pol, p, [(x,)]),
    )
    for run in runs:
        with pytest.warns(UserWarning, match=r"leaf 'w[qkv]' \(matched rule 0 'w\.'\).*'concatenate'") as rec:
            run(fused, w8a8)
        assert sorted(str(w.message).split("'")[1] for w in rec if "no matmul" in str(w.message)) == [
            "wk",
            "wq",
            "wv",
        ]
    padded = lambda p, x: (x @ jnp.pad(p["wq"], ((0, 0), (0, 4))))[:, :4]
    with pytest.warns(UserWarning, match=r"leaf 'wq'.*'pad'"):
        qjax.quantized(padded, w8a8)(p, x)
    # no warning: weight-only rules; a leaf also read as a matmul weight (as a tied embedding is)
    tied = lambda p, x: x @ p["wq"] + jnp.sum(p["wq"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qjax.quantized(fused, qjax.Policy([qjax.Rule("w.", weight=W8)]))(p, x)
        qjax.fake_quantized(tied, w8a8)(p, x)


def test_errors_of_weights_read_by_other_ops_name_the_leaf_and_rule():
    p = {"w": jnp.ones((8, 5)), "b": jnp.ones((5,)), "perm": jnp.arange(8)}
    f = lambda p, x: x[:, p["perm"]] @ p["w"] + p["b"]
    x = jnp.ones((2, 8))
    cases = [
        (qjax.Rule("b", weight=qjax.QuantSpec(qjax.int4, channel_axes=(1,))), ValueError, "'b'.*rule 0 'b'"),
        (qjax.Rule(".*", weight=qjax.QuantSpec(qjax.int8)), TypeError, r"'perm'.*rule 0 '\.\*'"),
    ]
    for rule, error, match in cases:
        for transform in (qjax.quantized, qjax.fake_quantized):
            with pytest.raises(error, match=r"^leaf " + match):
                transform(f, qjax.Policy([rule]))(p, x)


@pytest.mark.parametrize(
    "spec",
    [
        qjax.mx_spec(qjax.fp4_e2m1),
        qjax.mx_spec(qjax.fp8_e4m3),
        qjax.QuantSpec(qjax.fp4_e2m1, channel_axes=(-1,), pack=False),
        qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=64, group_axis=0),
    ],
    ids=["mxfp4", "mxfp8", "fp4", "nf4"],
)
def test_fp4_nf4_mx_weights_serve_on_xla_and_train(spec):
    """``quantized`` (XLA path) of fp4 / NF4 / MX weights equals ``x @ dequantize(w)`` in
    float64; ``fake_quantized`` has the same forward and a straight-through gradient."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(4, 128)), jnp.float32)
    pol = qjax.Policy([qjax.Rule("w", weight=spec)])
    f = lambda p, x: x @ p["w"]
    qp = qjax.quantize_params(params, pol)
    assert qp["w"].format == spec.format
    want = np.asarray(x, np.float64) @ np.asarray(qjax.dequantize(qp["w"]), np.float64)
    np.testing.assert_allclose(np.asarray(qjax.quantized(f, pol)(qp, x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(qjax.fake_quantized(f, pol)(params, x)), want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda p: qjax.fake_quantized(f, pol)(p, x).sum())(params)["w"]
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
