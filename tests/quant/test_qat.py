"""``fake_quantized(..., act_stats=...)``: QAT with the static activation scales served
for static W8A8, against the served model and float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qjax

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(nn.relu(nn.Dense(32)(x)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x)))


def _policy(symmetric: bool, weight: qjax.QuantSpec = W8) -> qjax.Policy:
    act = qjax.QuantSpec(qjax.int8, symmetric=symmetric)
    return qjax.Policy([qjax.Rule(".*kernel", weight=weight, act=act)])


@pytest.mark.parametrize("model,shape", [(MLP(), (8, 16)), (CNN(), (2, 6, 6, 3))], ids=["mlp", "conv"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero_point"])
@pytest.mark.parametrize("integer_forward", [True, False], ids=["integer", "float"])
def test_static_act_qat_forward_is_the_served_model(model, shape, symmetric, integer_forward):
    x = jax.random.normal(jax.random.key(0), shape) + 0.3
    v = model.init(jax.random.key(1), x)
    policy = _policy(symmetric)
    stats = qjax.calibrate(model.apply, policy, v, [0.5 * x])  # a narrower range: x clips
    served = qjax.quantized(model.apply, policy, backend="xla")(
        qjax.quantize_params(v, policy, act_stats=stats), x
    )
    qat = qjax.fake_quantized(model.apply, policy, act_stats=stats, integer_forward=integer_forward)
    y = jax.jit(qat)(v, x)
    tol = 1e-5 * float(jnp.abs(served).max())
    np.testing.assert_allclose(y, served, rtol=1e-5, atol=tol)
    dynamic = qjax.fake_quantized(model.apply, policy, integer_forward=integer_forward)(v, x)
    assert float(jnp.abs(dynamic - served).max()) > 100 * tol  # what QAT trained before


def _reference_grads(x, w, c, lo, hi, symmetric):
    """float64: ``loss = sum(c * (fq(x) @ fq(w)))`` with ``fq(x)`` by the static range
    (clipped STE) and ``w`` per output channel (absmax: never clips)."""
    x, w, c = (np.asarray(a, np.float64) for a in (x, w, c))
    if symmetric:
        s, zp, qmin = max(abs(lo), abs(hi)) / 127, 0.0, -128
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / 255
        zp, qmin = np.clip(np.round(-128 - lo / s), -128, 127), -128
    r = np.round(x / s) + zp
    inside = (r >= qmin) & (r <= 127)
    xq = (np.clip(r, qmin, 127) - zp) * s
    sw = np.abs(w).max(0) / 127
    wq = np.round(w / sw) * sw
    return inside * (c @ wq.T), xq.T @ c


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero_point"])
@pytest.mark.parametrize("integer_forward", [True, False], ids=["integer", "float"])
def test_static_act_gradient_is_the_clipped_ste(symmetric, integer_forward):
    x = jnp.asarray([[0.1, -0.7, 1.9, -2.6], [0.45, 2.2, -0.3, 0.05], [-1.1, 0.6, 3.3, -0.2]], jnp.float32)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)), jnp.float32)
    lo, hi = -1.5, 1.25  # x has values outside on both sides
    stats = {"w": qjax.ActStats(jnp.float32(lo), jnp.float32(hi))}
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=qjax.QuantSpec(qjax.int8, symmetric=symmetric))])
    f = qjax.fake_quantized(lambda p, x: x @ p["w"], policy, act_stats=stats, integer_forward=integer_forward)
    gx, gw = jax.grad(lambda x, p: jnp.sum(c * f(p, x)), argnums=(0, 1))(x, {"w": w})
    rx, rw = _reference_grads(x, w, c, lo, hi, symmetric)
    assert (rx == 0).sum() >= 3  # the clipped elements get no gradient
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw["w"], rw, rtol=1e-5, atol=1e-6)


def test_static_act_int8_training_masks_the_activation_gradient():
    """``grad=`` (int8 training): the forward is the served one, the activation gradient
    gets the clip mask of the static range (the backward matmul itself is integer)."""
    x = jnp.asarray([[0.1, -0.7, 1.9, -2.6], [0.45, 2.2, -0.3, 0.05]], jnp.float32)
    w = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}
    stats = {"w": qjax.ActStats(jnp.float32(-1.5), jnp.float32(1.25))}
    grad = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=qjax.QuantSpec(qjax.int8), grad=grad)])
    f = lambda p, x: x @ p["w"]
    y = qjax.fake_quantized(f, policy, act_stats=stats)(w, x)
    served = qjax.quantized(f, policy, backend="xla")(qjax.quantize_params(w, policy, act_stats=stats), x)
    np.testing.assert_allclose(y, served, rtol=1e-6)
    gx = jax.grad(lambda x: jnp.sum(qjax.fake_quantized(f, policy, act_stats=stats)(w, x)))(x)
    outside = (x < -1.5) | (x > 1.26)
    assert bool(jnp.all(gx[outside] == 0)) and bool(jnp.all(gx[~outside] != 0))


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.scan(
            lambda m, h, _: (nn.Dense(16)(h), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return block(self, x, None)[0]


def test_static_act_scales_of_a_scan_stack_are_per_layer():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    v = Stack().init(jax.random.key(1), x)
    policy = _policy(True, W8.replace(channel_axes=(0, -1)))  # per layer, as QAT scales a stack
    stats = qjax.calibrate(Stack().apply, policy, v, [0.5 * x])
    (stat,) = stats.values()
    assert stat.lo.shape == (3,)
    served = qjax.quantized(Stack().apply, policy, backend="xla")(
        qjax.quantize_params(v, policy, act_stats=stats), x
    )
    y = qjax.fake_quantized(Stack().apply, policy, act_stats=stats)(v, x)
    np.testing.assert_allclose(y, served, rtol=1e-5, atol=1e-5 * float(jnp.abs(served).max()))


def test_lsq_weights_with_static_acts_export_exactly_and_lsq_acts_are_refused():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    v = Stack().init(jax.random.key(1), x)
    lsq = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")  # one scale shared by the layers
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=lsq, act=qjax.QuantSpec(qjax.int8))])
    (path,) = qjax.lsq_scales(v, policy)
    trained = qjax.lsq_params(v, policy)
    per_layer = {path: qjax.ActStats(jnp.full((3,), -1.0), jnp.full((3,), 1.0))}
    shared = {path: qjax.ActStats(jnp.float32(-1.0), jnp.float32(1.0))}

    def qat(t, stats):
        return qjax.fake_quantized(Stack().apply, policy, act_stats=stats)(t, x)

    served = qjax.quantized(Stack().apply, policy, backend="xla")(
        qjax.quantize_params(trained, policy, act_stats=per_layer), x
    )
    np.testing.assert_allclose(qat(trained, per_layer), served, rtol=1e-5, atol=1e-5)
    # the shared LSQ scale's gradient (1/sqrt of the elements over all layers) is the same
    # whether the static act scale travels per layer or shared
    g = [jax.grad(lambda t, s=s: jnp.sum(qat(t, s) ** 2))(trained).scales[path] for s in (per_layer, shared)]
    np.testing.assert_allclose(g[0], g[1], rtol=1e-6)
    act_lsq = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=qjax.QuantSpec(qjax.int8, ste="lsq"))])
    with pytest.raises(ValueError, match="ste='lsq' is not supported for activations"):
        qjax.fake_quantized(Stack().apply, act_lsq, act_stats=shared)(v, x)


def test_act_stats_that_fit_no_static_op_are_refused_naming_the_leaf():
    p = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    x = jnp.ones((2, 4))
    f = lambda p, x: x @ p["w"] + p["b"]
    stats = qjax.ActStats(jnp.float32(-1.0), jnp.float32(1.0))
    static = qjax.Policy([qjax.Rule("w|b", weight=W8, act=qjax.QuantSpec(qjax.int8))])
    with pytest.raises(ValueError, match=r"act_stats given for paths that are not leaves.*'v'"):
        qjax.fake_quantized(f, static, act_stats={"v": stats})(p, x)
    with (
        pytest.raises(ValueError, match=r"act_stats given for leaves \['b'\] that no matmul/conv reads"),
        pytest.warns(UserWarning, match="no matmul/conv reads it"),
    ):
        qjax.fake_quantized(f, static, act_stats={"b": stats})(p, x)
    tok = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    per_token = qjax.Policy([qjax.Rule("w", weight=W8, act=tok)])
    for transform in (
        lambda: qjax.fake_quantized(f, per_token, act_stats={"w": stats})(p, x),
        lambda: qjax.quantize_params(p, per_token, act_stats={"w": stats}),  # served per tensor before
    ):
        with pytest.raises(ValueError, match=r"leaf 'w' \(matched rule 0 'w'\).*not per-tensor"):
            transform()
    weight_only = qjax.Policy([qjax.Rule("w", weight=W8)])
    with pytest.raises(ValueError, match=r"leaf 'w' \(matched rule 0 'w'\).*no act spec"):
        qjax.fake_quantized(f, weight_only, act_stats={"w": stats})(p, x)
