"""Activation norms through the graph layer, and the Wanda pruner."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.prune.activations import activation_norms
from qjax.prune.pruners import Wanda
from qjax.prune.sparsity import Unstructured

RNG = np.random.default_rng(0)


def arr(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6)(x))
        return nn.Dense(3)(h)


def test_dense_norms_stream_over_batches_and_tokens():
    x = arr(4, 5, 8)  # (batch, tokens, features)
    model = MLP()
    v = model.init(jax.random.key(0), x[:1])
    norms = activation_norms(model.apply, v, [x[:1], (x[1:3],), x[3:]])
    assert set(norms) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}
    n0 = norms["params/Dense_0/kernel"]
    assert n0.shape == (8, 1)
    ref = np.sqrt((np.asarray(x, np.float64) ** 2).sum(axis=(0, 1)))
    np.testing.assert_allclose(n0[:, 0], ref, rtol=1e-5)
    d0 = v["params"]["Dense_0"]
    h = np.maximum(np.asarray(x) @ np.asarray(d0["kernel"]) + np.asarray(d0["bias"]), 0)
    ref1 = np.sqrt((h**2).sum(axis=(0, 1)))
    np.testing.assert_allclose(norms["params/Dense_1/kernel"][:, 0], ref1, rtol=1e-4)
    only = activation_norms(model.apply, v, [x], patterns=r".*Dense_1/kernel")
    assert list(only) == ["params/Dense_1/kernel"]
    with pytest.raises(ValueError, match="Dense_9"):
        activation_norms(model.apply, v, [x], patterns=[r".*Dense_9/kernel"])
    with pytest.raises(ValueError, match="at least one batch"):
        activation_norms(model.apply, v, [])


def test_conv_and_grouped_conv_norms():
    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3))(x), nn.Conv(6, (1, 1), feature_group_count=2)(x)

    x = arr(2, 5, 5, 4)
    m = C()
    v = m.init(jax.random.key(0), x)
    norms = activation_norms(m.apply, v, [x])
    per_feature = np.sqrt((np.asarray(x, np.float64) ** 2).sum(axis=(0, 1, 2)))  # (4,)
    n0 = norms["params/Conv_0/kernel"]
    assert n0.shape == (1, 1, 4, 1)  # per input feature over batch and spatial positions
    np.testing.assert_allclose(n0.ravel(), per_feature, rtol=1e-5)
    n1 = norms["params/Conv_1/kernel"]
    assert n1.shape == (1, 1, 2, 6)  # grouped: each output channel sees its group's features
    for o in range(6):
        g = o // 3
        np.testing.assert_allclose(n1[0, 0, :, o], per_feature[2 * g : 2 * g + 2], rtol=1e-5)


def test_dense_general_multi_axis_and_layout_ops():
    def f(p, x):
        h = jnp.einsum("bd,dhk->bhk", x, p["qkv"])  # contracts axis 0 of (d, h, k)
        o = jnp.einsum("bhk,hko->bo", h, p["out"])  # contracts axes 0, 1
        y = o @ p["w_t"].T  # (out, in) stored, transposed before the matmul
        return y @ p["flat"].reshape(4, 3)  # stored flat (2, 6), reshaped

    p = {"qkv": arr(5, 2, 3), "out": arr(2, 3, 7), "w_t": arr(4, 7), "flat": arr(2, 6)}
    x = arr(9, 5)
    norms = activation_norms(f, p, [x])
    assert norms["qkv"].shape == (5, 1, 1)
    np.testing.assert_allclose(norms["qkv"].ravel(), np.linalg.norm(np.asarray(x), axis=0), rtol=1e-5)
    h = np.einsum("bd,dhk->bhk", np.asarray(x), np.asarray(p["qkv"]))
    assert norms["out"].shape == (2, 3, 1)
    np.testing.assert_allclose(norms["out"][..., 0], np.sqrt((h**2).sum(0)), rtol=1e-4)
    o = np.einsum("bhk,hko->bo", h, np.asarray(p["out"]))
    assert norms["w_t"].shape == (1, 7)  # the contracted axis is the leaf's axis 1
    np.testing.assert_allclose(norms["w_t"][0], np.linalg.norm(o, axis=0), rtol=1e-4)
    y = o @ np.asarray(p["w_t"]).T
    ref = np.linalg.norm(y, axis=0)  # (4,) input features of the (4, 3) view
    got = np.broadcast_to(norms["flat"], (2, 6)).reshape(4, 3)
    np.testing.assert_allclose(got, np.broadcast_to(ref[:, None], (4, 3)), rtol=1e-4)
    # Wanda score uses them directly
    m = Wanda(sparsity=0.5).masks(p, act_norms=norms)
    assert m["qkv"].shape == (5, 2, 3)


def test_unsupported_layout_op_names_the_path():
    f = lambda p, x: x @ p["w"][:, :3]
    with pytest.raises(ValueError, match=r"'w'.*'slice'"):
        activation_norms(f, {"w": arr(4, 6)}, [arr(2, 4)])


def test_scan_stack_gets_per_layer_norms():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(4)(x)), None

    Stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x = arr(5, 4)
    m = Stack()
    v = m.init(jax.random.key(0), x, None)
    norms = activation_norms(lambda v, x: m.apply(v, x, None), v, [x])
    (path,) = norms
    assert norms[path].shape == (3, 4, 1)
    np.testing.assert_allclose(norms[path][0, :, 0], np.linalg.norm(np.asarray(x), axis=0), rtol=1e-5)
    k = np.asarray(v["params"]["Dense_0"]["kernel"])
    b = np.asarray(v["params"]["Dense_0"]["bias"])
    h1 = np.tanh(np.asarray(x) @ k[0] + b[0])
    np.testing.assert_allclose(norms[path][1, :, 0], np.linalg.norm(h1, axis=0), rtol=1e-4)


def test_nnx_model_and_wanda_reference():
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    x = arr(16, 6)
    norms = activation_norms(qjax.nnx_apply(graphdef), state, [x[:8], x[8:]])
    assert set(norms) == {"layers/0/kernel", "layers/1/kernel"}
    masks = Wanda(sparsity=0.5).masks(state, act_norms=norms)
    w = np.asarray(state["layers"][0]["kernel"][...])
    score = np.abs(w) * np.linalg.norm(np.asarray(x), axis=0)[:, None]
    keep = np.ones(w.size, bool)
    keep[np.argsort(score.ravel(), kind="stable")[: math.floor(0.5 * w.size + 0.5)]] = False
    np.testing.assert_array_equal(np.asarray(masks["layers"][0]["kernel"][...]).ravel(), keep)


def test_wanda_per_output_and_errors():
    model = MLP()
    x = arr(10, 8)
    v = model.init(jax.random.key(1), x)
    norms = activation_norms(model.apply, v, [x])
    pr = Wanda(sparsity=0.5, sparsity_type=Unstructured(per_slice=-1))
    m = np.asarray(pr.masks(v, act_norms=norms)["params"]["Dense_0"]["kernel"])
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    score = np.abs(w) * np.asarray(norms["params/Dense_0/kernel"])
    for j in range(w.shape[1]):  # the paper's comparison group: each output
        keep = np.ones(8, bool)
        keep[np.argsort(score[:, j], kind="stable")[:4]] = False
        np.testing.assert_array_equal(m[:, j], keep)
    # under jit with a traced sparsity
    f = jax.jit(lambda v, s, n: pr.masks(v, s, act_norms=n))
    np.testing.assert_array_equal(f(v, jnp.float32(0.5), norms)["params"]["Dense_0"]["kernel"], m)
    with pytest.raises(ValueError, match="Wanda needs act_norms"):
        Wanda().masks(v)
    partial = {"params/Dense_0/kernel": norms["params/Dense_0/kernel"]}
    with pytest.raises(ValueError, match="no activation norm for 'params/Dense_1/kernel'"):
        Wanda().masks(v, act_norms=partial)
    ok = Wanda(rules=[(r".*Dense_1.*", None)]).masks(v, state=partial)
    assert ok["params"]["Dense_1"]["kernel"] is None


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(16, use_bias=False, name="fc")(x)), None


class _Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(name="layers")(x, None)[0]


def _unrolled(p, x):
    for i in range(2):
        x = jax.nn.relu(x @ p[f"fc{i}"])
    return x


def test_wanda_on_an_nn_scan_stack_equals_the_unrolled_model():
    # The stack's layers used to be ranked together (0.36 / 0.64 kept with layer 1's
    # weights 3x larger); the norms now mark the stack and each layer is ranked alone.
    x = jax.random.normal(jax.random.key(0), (64, 16))
    v = _Stacked().init(jax.random.key(1), x)
    k = v["params"]["layers"]["fc"]["kernel"] * jnp.array([1.0, 3.0])[:, None, None]
    v = {"params": {"layers": {"fc": {"kernel": k}}}}
    flat = {"fc0": k[0], "fc1": k[1]}
    norms = activation_norms(_Stacked().apply, v, [(x,)])
    assert norms.stacks == {"params/layers/fc/kernel": 1}
    flat_norms = activation_norms(_unrolled, flat, [(x,)])
    for stype in (Unstructured(per_slice=-1), Unstructured()):
        got = Wanda(0.5, sparsity_type=stype).masks(v, act_norms=norms)["params"]["layers"]["fc"]["kernel"]
        want = Wanda(0.5, sparsity_type=stype).masks(flat, act_norms=flat_norms)
        np.testing.assert_array_equal(got, np.stack([want["fc0"], want["fc1"]]))
    # through sparsify's jitted state (the norms are a pytree keeping .stacks)
    tx = qjax.prune.sparsify(
        __import__("optax").sgd(0.0),
        Wanda(0.5, sparsity_type=Unstructured(per_slice=-1)),
        qjax.prune.one_shot(0),
        pruner_state=norms,
    )
    state = tx.init(v)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, v), state, v)
    m = np.asarray(qjax.prune.get_masks(state)["params"]["layers"]["fc"]["kernel"])
    np.testing.assert_array_equal(m.mean(1), 0.5)


class _BiasLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.LayerNorm()(nn.relu(nn.Dense(6)(x))) + x, None  # a bias and norm scales


class _BiasStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_BiasLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


class _BiasUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = _BiasLayer(name=f"l{i}")(x, None)[0]
        return x


def test_stacked_biases_and_norm_scales_are_skipped_as_in_the_unrolled_model():
    # A stacked bias (L, D) has ndim 2, so it was a default target: Wanda raised "no
    # activation norm for .../bias" and Magnitude pruned it, ranked across layers.
    x = jax.random.normal(jax.random.key(0), (8, 6))
    v = _BiasStack().init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape) % 0.7, v)  # no ties
    flat = {"params": {f"l{i}": jax.tree.map(lambda a, i=i: a[i], v["params"]["layers"]) for i in range(3)}}
    norms = activation_norms(_BiasStack().apply, v, [(x,)])
    assert norms.stacks["params/layers/Dense_0/bias"] == 1
    assert norms.stacks["params/layers/LayerNorm_0/scale"] == 1
    flat_norms = activation_norms(_BiasUnrolled().apply, flat, [(x,)])

    def check(got, want):
        got = got["params"]["layers"]
        assert got["Dense_0"]["bias"] is None and got["LayerNorm_0"] == {"bias": None, "scale": None}
        want = np.stack([want["params"][f"l{i}"]["Dense_0"]["kernel"] for i in range(3)])
        np.testing.assert_array_equal(got["Dense_0"]["kernel"], want)

    check(Wanda(0.5).masks(v, act_norms=norms), Wanda(0.5).masks(flat, act_norms=flat_norms))
    rules = [(r"params/layers/.*", qjax.prune.LeafConfig(stack=1))]
    check(qjax.prune.Magnitude(0.5, rules=rules).masks(v), qjax.prune.Magnitude(0.5).masks(flat))
    tx = qjax.prune.sparsify(
        __import__("optax").sgd(0.0), Wanda(0.5), qjax.prune.one_shot(0), pruner_state=norms
    )
    state = tx.init(v)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, v), state, v)
    check(qjax.prune.get_masks(state), Wanda(0.5).masks(flat, act_norms=flat_norms))
