"""quantize_params / dequantize_params / fake_quant_params / footprint on Linen, NNX
and plain pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import qjax

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
W4G = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def linen_vars():
    return MLP().init(jax.random.key(0), jnp.ones((1, 16)))


def test_quantize_params_linen(linen_vars):
    policy = qjax.Policy(
        [
            qjax.Rule(r"params/Dense_2/.*", None),
            qjax.Rule(r"params/Dense_0/kernel", weight=W4G),
            qjax.Rule(r".*/kernel", weight=W8),
        ]
    )
    q = qjax.quantize_params(linen_vars, policy)
    d = q["params"]
    assert isinstance(d["Dense_0"]["kernel"], qjax.QArray) and d["Dense_0"]["kernel"].format == qjax.int4
    assert isinstance(d["Dense_1"]["kernel"], qjax.QArray) and d["Dense_1"]["kernel"].format == qjax.int8
    assert d["Dense_2"]["kernel"] is linen_vars["params"]["Dense_2"]["kernel"]
    assert d["Dense_0"]["bias"] is linen_vars["params"]["Dense_0"]["bias"]
    # Each quantized leaf equals quantize() of that leaf on its own.
    ref = qjax.quantize(linen_vars["params"]["Dense_1"]["kernel"], W8)
    np.testing.assert_array_equal(d["Dense_1"]["kernel"].values, ref.values)
    # The dequantized model runs and stays close to the float one.
    x = jax.random.normal(jax.random.key(1), (8, 16))
    y = MLP().apply(linen_vars, x)
    yq = MLP().apply(qjax.dequantize_params(q), x)
    assert float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y)) < 0.1


def test_quantize_params_nnx_state_round_trip():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 24, rngs=rngs)
            self.b = nnx.Linear(24, 8, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=W4G)])
    qstate = qjax.quantize_params(state, policy)
    assert isinstance(qstate["a"]["kernel"], nnx.Param)
    assert isinstance(qstate["a"]["kernel"].get_value(), qjax.QArray)
    model = nnx.merge(graphdef, qjax.dequantize_params(qstate))
    x = jax.random.normal(jax.random.key(1), (4, 16))
    ref = nnx.merge(graphdef, state)(x)
    assert model(x).shape == (4, 8)
    assert float(jnp.linalg.norm(model(x) - ref) / jnp.linalg.norm(ref)) < 0.2


def test_quantize_params_under_jit(linen_vars):
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8)])
    eager = qjax.quantize_params(linen_vars, policy)
    jitted = jax.jit(lambda p: qjax.quantize_params(p, policy))(linen_vars)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_errors_name_leaf_and_rule(linen_vars):
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(1,))
    policy = qjax.Policy([qjax.Rule(r"params/Dense_0/.*", weight=spec)])
    msg = r"leaf 'params/Dense_0/bias' \(matched rule 0 'params/Dense_0/\.\*'\).*out of range"
    with pytest.raises(ValueError, match=msg):
        qjax.quantize_params(linen_vars, policy)
    spec = qjax.QuantSpec(qjax.int4, group_size=5, group_axis=0)
    grouped = qjax.Policy([qjax.Rule(r".*/kernel", weight=spec)])
    with pytest.raises(ValueError, match=r"leaf 'params/Dense_0/kernel'.*group_size=5 does not divide"):
        qjax.quantize_params(linen_vars, grouped)
    ints = {"step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"leaf 'step'.*floating-point"):
        qjax.quantize_params(ints, qjax.Policy([qjax.Rule(".*", weight=W8)]))
    with pytest.raises(TypeError, match=r"policy must be a qjax\.Policy"):
        qjax.quantize_params(linen_vars, [qjax.Rule(".*", weight=W8)])


def test_quantizing_twice_is_an_error(linen_vars):
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8)])
    q = qjax.quantize_params(linen_vars, policy)
    with pytest.raises(ValueError, match="already quantized"):
        qjax.quantize_params(q, policy)


def test_stochastic_rounding_keys_are_per_leaf_and_reproducible():
    spec = qjax.QuantSpec(qjax.int4, rounding="stochastic")
    policy = qjax.Policy([qjax.Rule(".*", weight=spec)])
    w = jax.random.normal(jax.random.key(0), (64, 64))
    params = {"a": w, "b": w}
    with pytest.raises(ValueError, match="needs a PRNG key"):
        qjax.quantize_params(params, policy)
    q1 = qjax.quantize_params(params, policy, key=jax.random.key(3))
    q2 = qjax.quantize_params(params, policy, key=jax.random.key(3))
    np.testing.assert_array_equal(q1["a"].values, q2["a"].values)
    assert not np.array_equal(q1["a"].values, q1["b"].values)  # independent noise per leaf


def test_fake_quant_params_forward_and_gradient(linen_vars):
    fixed = qjax.QuantSpec(qjax.int4, calibration=qjax.calib.fixed(-0.2, 0.2))
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=fixed)])
    params = linen_vars
    fq = qjax.fake_quant_params(params, policy)
    k = params["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(fq["params"]["Dense_0"]["kernel"], qjax.dequantize(qjax.quantize(k, fixed)))
    # Clipped STE: d/dW sum(fq(W) * c) = c where the rounded code was not clipped, else 0.
    c = jax.random.normal(jax.random.key(2), k.shape)
    kernel = lambda p: qjax.fake_quant_params(p, policy)["params"]["Dense_0"]["kernel"]
    g = jax.grad(lambda p: jnp.sum(kernel(p) * c))(params)
    code = np.round(np.asarray(k) * np.float32(1 / np.float32(np.float32(0.2) * np.float32(1 / 7))))
    inside = (code >= -8) & (code <= 7)
    assert not bool(inside.all())
    np.testing.assert_allclose(g["params"]["Dense_0"]["kernel"], jnp.where(inside, c, 0.0), rtol=0, atol=0)
    np.testing.assert_array_equal(g["params"]["Dense_0"]["bias"], 0.0)


def test_lsq_scales_are_learned():
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    policy = qjax.Policy([qjax.Rule(r"w", weight=spec)])
    key1, key2 = jax.random.split(jax.random.key(0))
    w_true = jax.random.normal(key1, (16, 8))
    x = jax.random.normal(key2, (256, 16))
    y = x @ w_true
    params = {"w": w_true * 0.5, "b": jnp.zeros(8)}
    scales = qjax.lsq_scales(params, policy)
    assert set(scales) == {"w"} and scales["w"].shape == (1, 8)
    with pytest.raises(ValueError, match="needs a learnable scale"):
        qjax.fake_quant_params(params, policy)
    with pytest.raises(ValueError, match="not leaves of params"):
        qjax.fake_quant_params(params, policy, scales={"nope": jnp.ones(())})

    def loss(trainable):
        p, s = trainable
        fq = qjax.fake_quant_params(p, policy, scales=s)
        return jnp.mean((x @ fq["w"] + fq["b"] - y) ** 2)

    opt = optax.adam(3e-2)
    state = (params, scales)
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state):
        loss_value, g = jax.value_and_grad(loss)(state)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(state, updates), opt_state, loss_value, g

    _, _, l0, g0 = step(state, opt_state)
    assert float(jnp.abs(g0[1]["w"]).sum()) > 0  # gradient reaches the scales
    for _ in range(300):
        state, opt_state, loss_value, _ = step(state, opt_state)
    assert float(loss_value) < 0.05 * float(l0)
    assert not np.allclose(state[1]["w"], scales["w"])


def test_footprint_counts_bytes(linen_vars):
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=W4G)])
    q = qjax.quantize_params(linen_vars, policy)
    fp = qjax.footprint(q)
    by_path = {leaf.path: leaf for leaf in fp.leaves}
    k = by_path["params/Dense_1/kernel"]  # (32, 32) int4, packed, scales (4, 32) f32
    assert k.nbytes == 32 * 32 // 2 + 4 * 32 * 4 and k.float_nbytes == 32 * 32 * 4 and k.kind == "int4"
    assert by_path["params/Dense_1/bias"].nbytes == 32 * 4
    assert fp.total == sum(leaf.nbytes for leaf in fp.leaves)
    assert fp.float_total == qjax.footprint(linen_vars).total
    assert fp.ratio == pytest.approx(fp.float_total / fp.total) and fp.ratio > 2
    assert "total" in fp.table() and "params/Dense_1/kernel" in fp.table()


def test_quantize_params_uses_learned_lsq_scales():
    spec = qjax.QuantSpec(qjax.int2, channel_axes=(-1,), ste="lsq")
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=spec)])
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (64, 16)) * 0.05}}
    scales = {k: v * 0.7 for k, v in qjax.lsq_scales(params, policy).items()}
    with pytest.raises(ValueError, match="trained scales"):
        qjax.quantize_params(params, policy)
    exported = qjax.dequantize_params(qjax.quantize_params(params, policy, scales=scales))
    trained = qjax.fake_quant_params(params, policy, scales=scales)
    np.testing.assert_array_equal(exported["d"]["kernel"], trained["d"]["kernel"])


def test_footprint_quantized_total_counts_only_qarrays():
    params = {"w": jnp.ones((64, 64)), "step": jnp.zeros((), jnp.int32)}
    params["count"] = jnp.zeros((100,), jnp.int32)
    q = qjax.quantize_params(params, qjax.Policy([qjax.Rule("w", weight=W8)]))
    fp = qjax.footprint(q)
    assert fp.quantized_total == 64 * 64 + 64 * 4
    assert fp.total == fp.quantized_total + 4 + 400


def test_given_scales_need_a_symmetric_spec():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    p = {"w": jnp.asarray(w), "b": jnp.asarray(w)}
    asym = qjax.QuantSpec(qjax.uint8, symmetric=False, channel_axes=(-1,))
    pol = qjax.Policy([qjax.Rule("w", weight=asym), qjax.Rule("b", weight=W8)])
    s, _ = qjax.compute_scale(p["w"], asym)
    for fn in (qjax.quantize_params, qjax.fake_quant_params):
        with pytest.raises(
            ValueError, match=r"leaf 'w' \(matched rule 0 'w'\).*given scales need a symmetric spec"
        ):
            fn(p, pol, scales={"w": s})
    # a symmetric leaf with a given scale is quantized with it (float64 reference)
    sb = np.abs(w.astype(np.float64)).max(0, keepdims=True) / 127 * 1.5
    out = qjax.dequantize_params(qjax.quantize_params(p, pol, scales={"b": jnp.asarray(sb, jnp.float32)}))
    ref = np.clip(np.round(w / sb), -128, 127) * sb
    np.testing.assert_allclose(np.asarray(out["b"], np.float64), ref, rtol=1e-6, atol=1e-6)


def test_lsq_params_keep_leaf_paths_and_carry_scales():
    """LSQParams: its params keep their paths (policies, pruning and partition rules match
    as before), fake_quantized / quantize_params read its scales, and fake_quantized's
    error for a missing LSQ scale names its own argument (scales=), not fake_quant's scale=."""
    lsq = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    pol = qjax.Policy([qjax.Rule(r"w", weight=lsq)])
    params = {"w": jax.random.normal(jax.random.key(0), (6, 4)), "b": jnp.zeros(4)}
    f = lambda p, x: x @ p["w"] + p["b"]
    x = jax.random.normal(jax.random.key(1), (3, 6))
    t = qjax.lsq_params(params, pol)
    assert [p for p, _ in qjax.rules.leaves_with_paths(t)] == ["b", "w", "lsq_scales/w"]
    s = {"w": t.scales["w"] * 1.5}
    want = x @ qjax.fake_quant(params["w"], lsq, scale=s["w"]) + params["b"]
    np.testing.assert_allclose(qjax.fake_quantized(f, pol)(qjax.LSQParams(params, s), x), want, rtol=1e-6)
    q = qjax.quantize_params(qjax.LSQParams(params, s), pol)
    np.testing.assert_allclose(q["w"].scale, s["w"])
    with pytest.raises(ValueError, match=r"'w'.*pass scales=\{path: scale\} to fake_quantized"):
        qjax.fake_quantized(f, pol)(params, x)
    with pytest.raises(ValueError, match="already holds"):
        qjax.fake_quantized(f, pol, scales=s)(t, x)


def test_transforms_that_take_plain_params_refuse_lsq_params_by_name():
    """quantized / calibrate / GPTQ / AWQ / SmoothQuant given an LSQParams: an error naming
    the transform and the call to make (before: "argument of type 'LSQParams' is not
    iterable" from inside the model); jax's keystr shows no part for the params child."""
    m = nn.Dense(4)
    x = jnp.ones((2, 8))
    v = m.init(jax.random.key(1), x)
    lsq = qjax.QuantSpec(qjax.int8, channel_axes=(-1,), ste="lsq")
    pol = qjax.Policy([qjax.Rule(r".*kernel", weight=lsq, act=qjax.QuantSpec(qjax.int8))])
    t = qjax.lsq_params(v, pol)
    calls = {
        "quantized": (lambda: qjax.quantized(m.apply, pol)(t, x), r"qjax.quantize_params\(trained, policy\)"),
        "calibrate": (lambda: qjax.calibrate(m.apply, pol, t, [(x,)]), r"trained.params"),
        "awq": (lambda: qjax.awq(m.apply, t, [(x,)], pol), r"sets its own weight scales"),
        "gptq": (lambda: qjax.gptq(m.apply, t, [(x,)], pol), r"sets its own weight scales"),
        "smoothquant": (lambda: qjax.smoothquant(m.apply, t, [(x,)]), r"sets its own weight scales"),
    }
    for name, (call, hint) in calls.items():
        with pytest.raises(TypeError, match=rf"^{name} got a qjax.LSQParams .*{hint}"):
            call()
    assert qjax.calibrate(m.apply, pol, t.params, [(x,)])  # the advised call works
    path = jax.tree_util.tree_flatten_with_path(t)[0][0][0]
    assert jax.tree_util.keystr(path) == "['params']['bias']"
