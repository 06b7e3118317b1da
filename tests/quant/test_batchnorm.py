"""fold_batchnorm: inference-form batch norms folded into the conv/dense kernels before them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.rules import leaves_with_paths, map_with_path

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
EPS = np.float32(1e-5)  # Flax's default, as traced (f32)


class ResBlock(nn.Module):
    """conv(no bias)+BN, relu, conv(bias)+BN, residual, depthwise+BN, pooled Dense+BN."""

    @nn.compact
    def __call__(self, x):
        bn = lambda name: nn.BatchNorm(use_running_average=True, name=name)
        h = nn.relu(bn("bn0")(nn.Conv(4, (3, 3), use_bias=False, name="c0")(x)))
        h = bn("bn1")(nn.Conv(4, (3, 3), name="c1")(h))
        h = nn.relu(h + nn.Conv(4, (1, 1), use_bias=False, name="proj")(x))
        h = bn("bn2")(nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(h))
        return bn("bn3")(nn.Dense(5, name="fc")(h.mean((1, 2))))


def randomize(tree, dtype=None):
    """Non-trivial running statistics, scales and biases (defaults are an identity)."""
    rng = np.random.default_rng(1)

    def visit(path, leaf):
        x = rng.uniform(0.5, 2.0, leaf.shape) if path.endswith("var") else rng.normal(size=leaf.shape)
        return jnp.asarray(x, dtype or leaf.dtype)

    return map_with_path(visit, tree)


def reference(v, bn, conv, conv_bias=None):
    """float64: (kernel * s, conv bias * s, beta - mean * s) of one pair."""
    f = lambda x: np.asarray(x, np.float64)
    s = f(v["params"][bn]["scale"]) / np.sqrt(f(v["batch_stats"][bn]["var"]) + np.float64(EPS))
    offset = f(v["params"][bn]["bias"]) - f(v["batch_stats"][bn]["mean"]) * s
    b = None if conv_bias is None else f(v["params"][conv]["bias"]) * s
    return f(v["params"][conv]["kernel"]) * s, b, offset


def test_resnet_block_folds_exactly():
    m = ResBlock()
    v = randomize(jax.eval_shape(m.init, jax.random.key(0), X))
    folded, report = qjax.fold_batchnorm(m.apply, v, X)
    assert report.folded == (
        ("params/c0/kernel", "batch_stats/bn0"),
        ("params/c1/kernel", "batch_stats/bn1"),
        ("params/dw/kernel", "batch_stats/bn2"),
        ("params/fc/kernel", "batch_stats/bn3"),
    )
    assert report.skipped == ()
    y, y_folded = m.apply(v, X), m.apply(folded, X)
    np.testing.assert_allclose(y_folded, y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
    for bn, conv, has_bias in (
        ("bn0", "c0", False),
        ("bn1", "c1", True),
        ("bn2", "dw", True),
        ("bn3", "fc", True),
    ):
        kernel, bias, offset = reference(v, bn, conv, has_bias or None)
        p, stats = folded["params"], folded["batch_stats"][bn]
        np.testing.assert_allclose(p[conv]["kernel"], kernel, rtol=1e-6, atol=1e-7)
        if has_bias:
            np.testing.assert_allclose(p[conv]["bias"], bias, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p[bn]["bias"], offset, rtol=1e-6, atol=1e-7)
        # the batch norm is an exact identity scale: rsqrt(var + eps) == 1 in float32
        assert (p[bn]["scale"] == 1).all() and (stats["mean"] == 0).all()
        assert (stats["var"] + EPS == np.float32(1)).all()
    assert jax.tree.structure(folded) == jax.tree.structure(v)
    for (pa, a), (_, b) in zip(leaves_with_paths(v), leaves_with_paths(folded)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), pa


def test_quantize_folded_equals_quantizing_kernel_times_s():
    """The integer weights are those of kernel * s (float64 reference), and the quantized
    model runs them: weight-only int8 per output channel on the Dense + BN pair."""
    m = ResBlock()
    v = randomize(jax.eval_shape(m.init, jax.random.key(0), X))
    folded, _ = qjax.fold_batchnorm(m.apply, v, X)
    int8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    q = qjax.quantize_params(folded, qjax.Policy([qjax.Rule(r"params/(c0|fc)/kernel", weight=int8)]))
    for conv, bn in (("c0", "bn0"), ("fc", "bn3")):
        kernel = reference(v, bn, conv)[0]
        amax = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(0)
        codes = np.round(kernel / (amax / 127))
        qa = q["params"][conv]["kernel"]
        np.testing.assert_array_equal(np.asarray(qa.values), codes)
        np.testing.assert_allclose(np.asarray(qa.scale).ravel(), amax / 127, rtol=1e-6)
    # served output of the last pair vs float64: pooled features @ dequantized codes + offsets
    feats = jax.jit(lambda v, x: m.apply(v, x, capture_intermediates=True)[1])(folded, X)
    h = np.asarray(feats["intermediates"]["bn2"]["__call__"][0], np.float64).mean((1, 2))
    policy = qjax.Policy([qjax.Rule(r"params/fc/kernel", weight=int8)])
    q = qjax.quantize_params(folded, policy)
    qa = q["params"]["fc"]["kernel"]
    _, fc_bias, offset = reference(v, "bn3", "fc", True)
    expect = h @ (np.asarray(qa.values, np.float64) * np.asarray(qa.scale, np.float64)) + fc_bias + offset
    got = qjax.quantized(m.apply, policy)(q, X)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def plain(v, x):
    """Hand-written inference batch norms after a conv and a shared kernel."""

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(h, p):
        return (h - p["mean"]) * (jax.lax.rsqrt(p["var"] + 1e-3) * p["scale"]) + p["bias"]

    a = conv(x, v["k"])
    res = bn(a + x.sum(-1, keepdims=True), v["bn_res"])  # residual before the BN
    cat = bn(jnp.concatenate([conv(x, v["k2"]), conv(x, v["k3"])], -1), v["bn_cat"])
    s1, s2 = bn(conv(x, v["shared"]), v["bn_s1"]), bn(conv(x, v["shared"]), v["bn_s2"])
    used = conv(x, v["k4"])
    return res, cat, s1 + s2, bn(used, v["bn_used"]) + used


def plain_vars(dtype=jnp.float32):
    def bn(c):
        return {"mean": np.zeros(c), "var": np.ones(c), "scale": np.ones(c), "bias": np.zeros(c)}

    tree = {f"bn_{n}": bn(4) for n in ("res", "s1", "s2", "used")} | {"bn_cat": bn(8)}
    tree |= {k: np.zeros((3, 3, 3, 4)) for k in ("k", "k2", "k3", "shared", "k4")}
    return randomize(tree, dtype)


def test_skipped_cases_are_reported_and_strict_names_them():
    v = plain_vars()
    x = X[:, :4, :4]
    folded, report = qjax.fold_batchnorm(plain, v, x)
    why = dict(report.skipped)
    assert report.folded == ()
    assert "'add'" in why["bn_res"] and "residual" in why["bn_res"]
    assert "'concatenate'" in why["bn_cat"]
    assert "'shared'" in why["bn_s1"] and "shared kernel" in why["bn_s2"]
    assert "also used elsewhere" in why["bn_used"]
    assert set(why) == {"bn_res", "bn_cat", "bn_s1", "bn_s2", "bn_used"}
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(folded)):
        assert a is b  # nothing changed
    with pytest.raises(ValueError, match=r"'bn_res'.*residual"):
        qjax.fold_batchnorm(plain, v, x, strict=True)


def test_training_mode_is_reported():
    class Train(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, name="bn")(nn.Conv(4, (3, 3), name="c")(x))

    t = Train()
    v = randomize(jax.eval_shape(t.init, jax.random.key(0), X))
    _, report = qjax.fold_batchnorm(t.apply, v, X, mutable=["batch_stats"])
    ((name, why),) = report.skipped
    assert name == "params/bn" and "training mode" in why
    with pytest.raises(ValueError, match=r"'params/bn'.*training mode"):
        qjax.fold_batchnorm(t.apply, v, X, strict=True, mutable=["batch_stats"])
    # a LayerNorm is not a batch norm: nothing reported
    ln = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
    assert qjax.fold_batchnorm(ln.apply, jax.eval_shape(ln.init, jax.random.key(0), X), X)[1].skipped == ()


def test_training_mode_without_scale_is_named_by_its_bias():
    # It was reported as 'a normalization (op N)'.
    class Train(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, use_scale=False, name="bn")(nn.Dense(4)(x))

    t, x = Train(), jnp.ones((3, 5))
    v = t.init(jax.random.key(0), x)
    _, report = qjax.fold_batchnorm(t.apply, v, x, mutable=["batch_stats"])
    assert [name for name, _ in report.skipped] == ["params/bn"]

    class NNXTrain(nnx.Module):
        def __init__(self):
            self.bn = nnx.BatchNorm(4, use_scale=False, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(x)

    graphdef, state = nnx.split(NNXTrain())
    _, report = qjax.fold_batchnorm(qjax.nnx_apply(graphdef), state, x[:, :4])
    assert [name for name, _ in report.skipped] == ["bn"]


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 5, rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.fc(nnx.relu(self.bn(self.conv(x))).mean((1, 2))))


def test_nnx_model_eval_and_train():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    state = randomize(state)
    folded, report = qjax.fold_batchnorm(qjax.nnx_apply(graphdef), state, X)
    assert report.folded == (("conv/kernel", "bn"), ("fc/kernel", "bn2")) and report.skipped == ()
    y = nnx.merge(graphdef, state)(X)
    np.testing.assert_allclose(
        nnx.merge(graphdef, folded)(X), y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max())
    )
    assert (np.asarray(folded["bn"]["var"][...]) + EPS == np.float32(1)).all()
    model.train()
    graphdef, state = nnx.split(model)
    _, report = qjax.fold_batchnorm(qjax.nnx_apply(graphdef), state, X)
    assert [name for name, _ in report.skipped] == ["bn", "bn2"] and report.folded == ()


def test_bf16_params_keep_dtype_and_identity_is_exact():
    """All-bf16 leaves and a bf16 eps (the program adds var + eps in bf16)."""
    v = {"k": np.zeros((3, 3, 3, 4)), "bn": {"mean": np.zeros(4), "var": np.ones(4), "scale": np.ones(4)}}
    v = randomize(v, jnp.bfloat16)

    def f(v, x):
        h = jax.lax.conv_general_dilated(
            x, v["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        p = v["bn"]
        return (h - p["mean"]) * (jax.lax.rsqrt(p["var"] + 1e-3) * p["scale"])  # no bias leaf

    x = X.astype(jnp.bfloat16)
    folded, report = qjax.fold_batchnorm(f, v, x)
    assert report.folded == (("k", "bn"),)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(folded))
    eps = np.asarray(1e-3, ml_dtypes.bfloat16)
    assert (np.asarray(folded["bn"]["var"]) + eps == 1).all() and (
        np.asarray(folded["bn"]["scale"]) == 1
    ).all()
    # no bias leaf: the offset lives in the mean, mean' = mean * s
    s = np.asarray(v["bn"]["scale"], np.float64) / np.sqrt(
        np.asarray(v["bn"]["var"], np.float64) + float(eps)
    )
    np.testing.assert_allclose(
        np.asarray(folded["bn"]["mean"], np.float64), np.asarray(v["bn"]["mean"], np.float64) * s, rtol=1e-2
    )
    y, y_folded = np.asarray(f(v, x), np.float32), np.asarray(f(folded, x), np.float32)
    np.testing.assert_allclose(y_folded, y, atol=0.05 * np.abs(y).max())


class Layouts(nn.Module):
    """NCHW batch norm after a transpose (no scale, no bias, eps 0.1), under jit and remat."""

    @nn.compact
    def __call__(self, x):
        h = jnp.transpose(nn.Conv(4, (3, 3))(x), (0, 3, 1, 2))
        h = nn.BatchNorm(use_running_average=True, axis=1, use_scale=False, use_bias=False, epsilon=0.1)(h)
        return nn.BatchNorm(use_running_average=True)(nn.remat(nn.Dense)(3)(h.reshape(2, -1)))


def test_layout_ops_jit_remat_and_missing_scale_bias():
    m = Layouts()
    v = randomize(jax.eval_shape(m.init, jax.random.key(0), X))
    folded, report = qjax.fold_batchnorm(jax.jit(m.apply), v, X)
    assert [k for k, _ in report.folded] == ["params/Conv_0/kernel", "params/CheckpointDense_0/kernel"]
    stats = folded["batch_stats"]["BatchNorm_0"]
    assert (stats["var"] + np.float32(0.1) == np.float32(1)).all()  # eps read from the program
    f = lambda x: np.asarray(x, np.float64)
    s = 1 / np.sqrt(f(v["batch_stats"]["BatchNorm_0"]["var"]) + f(np.float32(0.1)))
    np.testing.assert_allclose(stats["mean"], f(v["batch_stats"]["BatchNorm_0"]["mean"]) * s, rtol=1e-6)
    conv_bias = f(v["params"]["Conv_0"]["bias"]) * s
    np.testing.assert_allclose(folded["params"]["Conv_0"]["bias"], conv_bias, rtol=1e-6)
    y = m.apply(v, X)
    np.testing.assert_allclose(m.apply(folded, X), y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
