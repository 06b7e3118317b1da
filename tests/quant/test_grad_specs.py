"""Int8 training with a gradient format per backward matmul (``qjax.GradSpecs``, AQT's
``dlhs_bits`` / ``drhs_bits``): the integer side equals full int8 training's, the float
side equals the straight-through gradient of the fake-quantized op, and a float64
reference checks that float side independently."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax.quant.int8_training import int8_dot_general
from qjax.quant.int8_training_conv import int8_conv_general_dilated

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
G8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
G8S = G8.replace(rounding="stochastic")
DN = (((1,), (0,)), ((), ()))


def _rows_fq(x, axis):
    """float64 symmetric int8 fake quantization with one absmax scale per index of ``axis``."""
    x = np.asarray(x, np.float64)
    s = np.abs(x).max(axis=1 - axis, keepdims=True) / 127
    s = np.where(s == 0, 1, s)
    return np.clip(np.round(x / s), -127, 127) * s


@pytest.fixture(scope="module")
def operands():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (16, 32))
    w = jax.random.normal(k[1], (32, 8))
    g = jax.random.normal(k[2], (16, 8))
    return x, w, g


def _grads(x, w, g, grad_spec, key=None):
    f = lambda x, w: int8_dot_general(x, w, DN, lhs_spec=A8, rhs_spec=W8, grad_spec=grad_spec, key=key)
    return jax.vjp(f, x, w)[1](g)


def test_int8_dot_general_per_matmul_formats(operands):
    x, w, g = operands
    dx8, dw8 = _grads(x, w, g, G8)
    dx, dw = _grads(x, w, g, (G8, None))  # AQT drhs_bits=None: float weight gradient
    np.testing.assert_array_equal(dx, dx8)
    np.testing.assert_allclose(dw, _rows_fq(x, 0).T @ np.asarray(g, np.float64), rtol=1e-5, atol=1e-5)
    dx, dw = _grads(x, w, g, (None, G8))  # float activation gradient
    np.testing.assert_array_equal(dw, dw8)
    np.testing.assert_allclose(dx, np.asarray(g, np.float64) @ _rows_fq(w, 1).T, rtol=1e-5, atol=1e-5)
    assert not np.allclose(dx, dx8)  # the float side is not the integer one


def test_int8_conv_per_matmul_formats():
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (2, 6, 6, 3))
    w = jax.random.normal(k[1], (3, 3, 3, 4))
    geometry = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    s8 = qjax.QuantSpec(qjax.int8)

    def grads(grad_spec):
        f = lambda x, w: int8_conv_general_dilated(
            x, w, **geometry, lhs_spec=s8, rhs_spec=s8, grad_spec=grad_spec
        )
        y, vjp = jax.vjp(f, x, w)
        return vjp(jax.random.normal(k[2], y.shape))

    dx8, dw8 = grads(G8)
    dx, dw = grads((G8, None))
    np.testing.assert_array_equal(dx, dx8)
    fq = lambda v: qjax.fake_quant(v, s8)
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, **geometry)
    y, vjp = jax.vjp(conv, fq(x), fq(w))
    np.testing.assert_allclose(dw, vjp(jax.random.normal(k[2], y.shape))[1], rtol=1e-5, atol=1e-5)
    dx, dw = grads((None, G8))
    np.testing.assert_array_equal(dw, dw8)


class _Net(nn.Module):
    conv: bool = False

    @nn.compact
    def __call__(self, x):
        if self.conv:
            x = nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(16)(x))  # Dense_0, then the output layer Dense_1
        return nn.Dense(8)(h)


@pytest.mark.parametrize("conv", [False, True])
def test_rule_grad_specs_mix_int8_and_straight_through_gradients(conv):
    net = _Net(conv)
    x = jax.random.normal(jax.random.key(2), (8, 5, 5, 3) if conv else (8, 12))
    variables = net.init(jax.random.key(3), x)
    signed_act = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)

    def grads(grad):
        policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=signed_act, grad=grad)])
        loss = lambda v, x: jnp.sum(qjax.fake_quantized(net.apply, policy)(v, x) ** 2)
        return jax.grad(loss, argnums=(0, 1))(variables, x)

    (p8, x8), (pste, xste) = grads(G8), grads(None)
    (pa, xa), (pw, xw) = grads(qjax.GradSpecs(activation=G8)), grads(qjax.GradSpecs(weight=G8))
    kernels = lambda p: [a for path, a in jax.tree_util.tree_leaves_with_path(p) if "kernel" in str(path)]
    # GradSpecs(activation=g8): int8 activation gradients, float (straight-through) weight
    # ones; the last layer's weight gradient reads the output gradient directly (earlier
    # layers' read the int8 activation gradients, so they differ from both runs)
    np.testing.assert_allclose(xa, x8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernels(pa)[-1], kernels(pste)[-1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(kernels(pa)[-1], kernels(p8)[-1], rtol=1e-4, atol=1e-5)
    # GradSpecs(weight=g8): the other way round (the last layer's weight gradient reads the
    # output gradient directly, the same in both runs)
    np.testing.assert_allclose(xw, xste, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kernels(pw)[-1], kernels(p8)[-1], rtol=1e-5, atol=1e-6)


def test_float_weight_gradient_uses_the_static_activation_scale():
    net = _Net()
    x = jax.random.normal(jax.random.key(4), (8, 12))
    variables = net.init(jax.random.key(5), x)
    a8 = qjax.QuantSpec(qjax.int8)  # per tensor: static from calibration

    def policy(grad):
        return qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=a8, grad=grad)])

    stats = qjax.calibrate(net.apply, policy(None), variables, [(0.5 * x,)])  # clips x
    grad = lambda gr: jax.grad(
        lambda v: jnp.sum(qjax.fake_quantized(net.apply, policy(gr), act_stats=stats)(v, x) ** 2)
    )(variables)
    mixed, ste = grad(qjax.GradSpecs(activation=G8)), grad(None)
    last = lambda p: p["params"]["Dense_1"]["kernel"]  # reads the output gradient directly
    np.testing.assert_allclose(last(mixed), last(ste), rtol=1e-4, atol=1e-5)


def test_bad_grad_specs():
    with pytest.raises(ValueError, match="both backward matmuls are float"):
        qjax.GradSpecs()
    with pytest.raises(TypeError, match=r"GradSpecs: weight must be a qjax\.QuantSpec or None"):
        qjax.GradSpecs(activation=G8, weight=qjax.int8)
    with pytest.raises(TypeError, match=r"OpRule '.*': grad must be a qjax\.QuantSpec"):
        qjax.OpRule(".*", lhs=A8, rhs=A8, grad=qjax.GradSpecs(activation=G8))
    with pytest.raises(ValueError, match="tile scales"):
        qjax.Rule(
            "w",
            weight=W8,
            act=A8,
            grad=qjax.GradSpecs(weight=G8.replace(channel_axes=(-1,), tile_size=8, tile_axis=-1)),
        )
    with pytest.raises(ValueError, match="both backward matmuls are float"):
        int8_dot_general(
            jnp.ones((2, 4)), jnp.ones((4, 3)), DN, lhs_spec=A8, rhs_spec=W8, grad_spec=(None, None)
        )
    with pytest.raises(TypeError, match="pair"):
        int8_dot_general(jnp.ones((2, 4)), jnp.ones((4, 3)), DN, lhs_spec=A8, rhs_spec=W8, grad_spec=(G8,))
    # a granularity the backward cannot honour, named with the leaf
    policy = qjax.Policy(
        [qjax.Rule("w", weight=W8, act=A8, grad=qjax.GradSpecs(weight=G8.replace(channel_axes=(0,))))]
    )
    f = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match=r"'w'.*GradSpecs\.weight has channel_axes=\(0,\)"):
        jax.grad(lambda p: qjax.fake_quantized(f, policy)(p, jnp.ones((2, 4))).sum())({"w": jnp.ones((4, 3))})
    # a stochastic side needs a key, at the backward pass
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8, grad=qjax.GradSpecs(activation=G8S))])
    with pytest.raises(ValueError, match="pass key="):
        jax.grad(lambda p: qjax.fake_quantized(f, policy)(p, jnp.ones((2, 4))).sum())({"w": jnp.ones((4, 3))})


def test_grad_specs_in_the_policy_dict():
    rule = qjax.Rule("w", weight=W8, act=A8, grad=qjax.GradSpecs(activation=G8))
    assert rule.to_dict()["grad"] == {"activation": G8.to_dict(), "weight": None}


def test_float_weight_gradient_keeps_the_weights_clip_mask():
    # a weight spec that clips (absmax at half the range): the straight-through gradient is
    # 0 outside the range, and the float side of GradSpecs is that gradient (review finding)
    x = jax.random.normal(jax.random.key(6), (6, 16))
    w = jax.random.normal(jax.random.key(7), (16, 8))
    clipped = qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=qjax.calib.absmax(clip=0.5))
    f = lambda p, x: x @ p["w"]
    probe = jnp.cos(jnp.arange(48.0).reshape(6, 8))

    def grad(g):
        policy = qjax.Policy([qjax.Rule("w", weight=clipped, act=A8, grad=g)])
        return jax.grad(lambda p: jnp.sum(qjax.fake_quantized(f, policy)(p, x) * probe))({"w": w})["w"]

    mixed, ste = grad(qjax.GradSpecs(activation=G8)), grad(None)
    np.testing.assert_allclose(mixed, ste, rtol=1e-5, atol=1e-6)
    assert int(jnp.sum(ste == 0)) > 0  # the mask is there to keep


def test_per_token_operands_of_the_float_side_are_resolved_like_the_forward():
    # lhs stored (K, M), contracted on axis 0: PER_TOKEN means one scale per column m
    xt = jax.random.normal(jax.random.key(8), (16, 6)) * jnp.linspace(0.1, 3, 6)
    w = jax.random.normal(jax.random.key(9), (16, 8))
    g = jax.random.normal(jax.random.key(10), (6, 8))
    dn = (((0,), (0,)), ((), ()))
    f = lambda a, b: int8_dot_general(a, b, dn, lhs_spec=A8, rhs_spec=W8, grad_spec=(G8, None))
    _, dw = jax.vjp(f, xt, w)[1](g)
    np.testing.assert_allclose(
        dw, _rows_fq(np.asarray(xt).T, 0).T @ np.asarray(g, np.float64), rtol=1e-5, atol=1e-5
    )


def test_grad_specs_on_an_explicit_mesh():
    mesh = jax.make_mesh((4, 2), ("k", "d"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x = jax.random.normal(jax.random.key(11), (8, 32))
    params = {"w": jax.random.normal(jax.random.key(12), (32, 8))}
    f = lambda p, x: jnp.einsum("bk,kn->bn", x, p["w"], out_sharding=P())
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8, grad=qjax.GradSpecs(activation=G8))])
    loss = lambda p, x: jnp.sum(qjax.fake_quantized(f, policy)(p, x) ** 2)
    with jax.set_mesh(mesh):
        expected = jax.grad(loss, argnums=(0, 1))(params, x)
        ps = jax.device_put(params, NamedSharding(mesh, P("k", None)))
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "k")))
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(ps, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_grad_specs_round_trip_through_json():
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8, grad=qjax.GradSpecs(activation=G8S))])
    assert qjax.Policy.from_json(policy.to_json()).rules == policy.rules
