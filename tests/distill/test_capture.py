"""Feature capture by param-path pattern for Linen, NNX and plain functions, compared
with the layers computed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import distill

X = jax.random.normal(jax.random.key(0), (5, 6, 6, 1))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(3, name="head")(x)


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_linen_inputs_and_outputs_match_manual_computation():
    v = CNN().init(jax.random.key(1), X)
    p = v["params"]
    out, feats = jax.jit(distill.capture(CNN().apply, [r"params/conv/kernel", r"params/hidden/.*"]))(v, X)
    np.testing.assert_allclose(out, CNN().apply(v, X), rtol=1e-6)
    assert set(feats) == {"params/conv/kernel", "params/hidden/kernel"}
    conv_out = _conv(X, p["conv"]["kernel"])
    np.testing.assert_allclose(feats["params/conv/kernel"]["input"], X)
    np.testing.assert_allclose(feats["params/conv/kernel"]["output"], conv_out, rtol=1e-5, atol=1e-6)
    h_in = jax.nn.relu(conv_out + p["conv"]["bias"]).reshape(5, -1)
    np.testing.assert_allclose(feats["params/hidden/kernel"]["input"], h_in, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        feats["params/hidden/kernel"]["output"], h_in @ p["hidden"]["kernel"], rtol=1e-5, atol=1e-5
    )
    # with the bias: the Dense/Conv module outputs (what capture_linen reports)
    _, with_bias = distill.capture(CNN().apply, r"params/(conv|hidden)/kernel", add_bias=True)(v, X)
    _, modules = distill.capture_linen(CNN(), ["conv", "hidden"])(v, X)
    assert set(modules) == {"conv", "hidden"}
    conv = with_bias["params/conv/kernel"]["output"]
    np.testing.assert_allclose(conv, modules["conv"]["output"], atol=1e-5)
    np.testing.assert_allclose(
        with_bias["params/hidden/kernel"]["output"], modules["hidden"]["output"], rtol=1e-5, atol=1e-5
    )


def test_nnx_model_via_nnx_apply():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 12, rngs=rngs)
            self.b = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.gelu(self.a(x)))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (4, 8))
    graphdef, state = nnx.split(model)
    out, feats = distill.capture(qjax.nnx_apply(graphdef), r"a/kernel|b/kernel", add_bias=True)(state, x)
    np.testing.assert_allclose(out, model(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["a/kernel"]["input"], x)
    np.testing.assert_allclose(feats["a/kernel"]["output"], model.a(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["b/kernel"]["input"], nnx.gelu(model.a(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["b/kernel"]["output"], model(x), rtol=1e-5, atol=1e-6)


def test_plain_function_shared_weight_and_gradients():
    k3, k4 = jax.random.key(3), jax.random.key(4)
    p = {"w1": jax.random.normal(k3, (6, 7)), "w2": jax.random.normal(k4, (7, 7))}
    x = jax.random.normal(jax.random.key(5), (3, 6))

    def f(p, x):
        h = jnp.tanh(x @ p["w1"])
        return (h @ p["w2"]) @ p["w2"].T  # w2 read twice (once transposed)

    out, feats = distill.capture(f, "w.*")(p, x)
    h = jnp.tanh(x @ p["w1"])
    assert set(feats) == {"w1", "w2", "w2@1"}
    np.testing.assert_allclose(feats["w1"]["output"], x @ p["w1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["w2"]["input"], h, rtol=1e-6)
    np.testing.assert_allclose(feats["w2@1"]["input"], h @ p["w2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["w2@1"]["output"], out, rtol=1e-5, atol=1e-5)
    # gradients flow through captured features exactly as through the hand-written layers
    loss = lambda p: jnp.sum(distill.capture(f, "w1")(p, x)[1]["w1"]["output"] ** 2)
    manual = lambda p: jnp.sum((x @ p["w1"]) ** 2)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(p)["w1"], jax.grad(manual)(p)["w1"], rtol=1e-5)
    # under vmap (per-example capture)
    _, vfeats = jax.vmap(distill.capture(f, "w1"), in_axes=(None, 0))(p, x[:, None, :])
    np.testing.assert_allclose(vfeats["w1"]["output"][:, 0], x @ p["w1"], rtol=1e-5, atol=1e-6)
    # an unmatched pattern is an error; bad patterns name the rule
    with pytest.raises(ValueError, match=r"\['nothing'\] match no weight.*\['w1', 'w2'\]"):
        distill.capture(f, "nothing")(p, x)
    with pytest.raises(ValueError, match="regular expression"):
        distill.capture(f, "(")


def test_scan_stack_gives_per_layer_values():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, c, _):
            return jnp.tanh(nn.Dense(6, name="fc")(c)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="blocks")(x, None)[0]

    x = jax.random.normal(jax.random.key(6), (4, 6))
    v = Stack().init(jax.random.key(7), x)
    out, feats = distill.capture(Stack().apply, r".*/fc/kernel", add_bias=True)(v, x)
    k, b = v["params"]["blocks"]["fc"]["kernel"], v["params"]["blocks"]["fc"]["bias"]
    f = feats["params/blocks/fc/kernel"]
    assert f["input"].shape == (3, 4, 6) and f["output"].shape == (3, 4, 6)
    h = x
    for i in range(3):
        np.testing.assert_allclose(f["input"][i], h, rtol=1e-5, atol=1e-6)
        h_next = h @ k[i] + b[i]
        np.testing.assert_allclose(f["output"][i], h_next, rtol=1e-5, atol=1e-5)
        h = jnp.tanh(h_next)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def test_add_bias_for_vmapped_and_batched_dense():
    """An nn.vmap'd Dense (an ensemble) and DenseGeneral(batch_dims=...) hold a bias with
    the op's batch axes in front (it was refused as not channels-last); a bias that does not
    fit is refused naming what add_bias supports."""

    class Ens(nn.Module):
        @nn.compact
        def __call__(self, x):
            vd = nn.vmap(
                nn.Dense, in_axes=0, out_axes=0, variable_axes={"params": 0}, split_rngs={"params": True}
            )
            return vd(3, name="v")(x)

    x = jax.random.normal(jax.random.key(10), (2, 4, 5))
    v = Ens().init(jax.random.key(11), x)
    out, feats = distill.capture(Ens().apply, r".*kernel", add_bias=True)(v, x)
    k, b = v["params"]["v"]["kernel"], v["params"]["v"]["bias"]
    want = np.einsum("eni,eio->eno", np.float64(x), np.float64(k)) + np.float64(b)[:, None]
    np.testing.assert_allclose(feats["params/v/kernel"]["output"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    dg = nn.DenseGeneral(3, batch_dims=(0,), axis=-1)
    vg = dg.init(jax.random.key(12), x)
    out, feats = distill.capture(dg.apply, r".*kernel", add_bias=True)(vg, x)
    np.testing.assert_allclose(feats["params/kernel"]["output"], out, rtol=1e-6)
    bad = {"params": {"v": {"kernel": k, "bias": b[:, :2]}}}
    with pytest.raises(ValueError, match=r"first 1 axes .* lead the output"):
        distill.capture(
            lambda p, x: jnp.einsum("eni,eio->eno", x, p["params"]["v"]["kernel"]), ".*kernel", add_bias=True
        )(bad, x)


def test_composes_with_fake_quantized():
    v = CNN().init(jax.random.key(8), X)
    w4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=w4)])
    f = jax.jit(qjax.fake_quantized(distill.capture(CNN().apply, "params/hidden/kernel"), policy))
    out, feats = f(v, X)
    np.testing.assert_allclose(out, qjax.fake_quantized(CNN().apply, policy)(v, X), rtol=1e-6)
    h_in = feats["params/hidden/kernel"]["input"]
    want = h_in @ qjax.fake_quant(v["params"]["hidden"]["kernel"], w4)
    np.testing.assert_allclose(feats["params/hidden/kernel"]["output"], want, rtol=1e-5, atol=1e-5)
    float_feats = distill.capture(CNN().apply, "params/hidden/kernel")(v, X)[1]
    diff = feats["params/hidden/kernel"]["output"] - float_feats["params/hidden/kernel"]["output"]
    assert float(jnp.abs(diff).max()) > 1e-3


def test_pattern_matching_no_op_is_an_error_naming_it_and_the_weights_read():
    v = CNN().init(jax.random.key(9), X)
    want = r"\['params/hiden/kernel'\].*'params/conv/kernel', 'params/head/kernel'"
    with pytest.raises(ValueError, match=want):
        distill.capture(CNN().apply, [r"params/conv/kernel", r"params/hiden/kernel"])(v, X)
    # a pattern shadowed by an earlier one still captures: not an error
    feats = distill.capture(CNN().apply, [r"params/.*/kernel", r"params/head/kernel"])(v, X)[1]
    assert set(feats) == {"params/conv/kernel", "params/hidden/kernel", "params/head/kernel"}


def test_capture_around_fake_quantized_says_to_capture_inside():
    v = CNN().init(jax.random.key(10), X)
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)))])
    for wrapped in (qjax.fake_quantized(CNN().apply, policy), qjax.quantized(CNN().apply, policy)):
        with pytest.raises(ValueError, match=r"no matmul/conv reads them directly.*fake_quantized\(capture"):
            distill.capture(wrapped, "params/hidden/kernel")(v, X)
