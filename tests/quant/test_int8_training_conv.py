"""int8 training of convolutions: the forward conv and both backward convs are integer
convs whose results equal float64 convs of the same quantized codes times their scales."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qjax
from qjax.quant import int8_training_conv as mod
from qjax.quant.int8_training_conv import int8_conv_general_dilated

S8 = qjax.QuantSpec(qjax.int8)
TOK = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)  # per sample / output feature
STOCH = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")

# (dimension numbers, input shape, kernel shape, conv keyword arguments)
CASES = {
    "nhwc_stride2_same": (
        ("NHWC", "HWIO", "NHWC"),
        (3, 9, 9, 6),
        (3, 3, 6, 8),
        dict(window_strides=(2, 2), padding="SAME"),
    ),
    "nchw_explicit_rhs_dilation": (
        ("NCHW", "OIHW", "NCHW"),
        (3, 6, 10, 9),
        (8, 6, 3, 2),
        dict(window_strides=(1, 2), padding=((1, 2), (0, 1)), rhs_dilation=(2, 1)),
    ),
    "nhwc_depthwise_stride2": (
        ("NHWC", "HWIO", "NHWC"),
        (3, 9, 9, 6),
        (3, 3, 1, 12),
        dict(window_strides=(2, 2), padding="SAME", feature_group_count=6),
    ),
    "nchw_grouped_lhs_dilation": (
        ("NCHW", "OIHW", "NCHW"),
        (2, 6, 7, 7),
        (4, 3, 3, 3),
        dict(window_strides=(1, 1), padding=((2, 1), (1, 1)), lhs_dilation=(2, 1), feature_group_count=2),
    ),
}


def _operands(name, seed=0):
    dn, xs, ws, kw = CASES[name]
    rng = np.random.default_rng(seed)  # numpy draws: no PRNG kernel to compile per shape
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
    kw = dict(kw, dimension_numbers=dn)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, **kw)).shape
    g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    return x, w, g, kw


def _int8(x, w, kw, grad_spec=TOK, key=None):
    return int8_conv_general_dilated(x, w, **kw, lhs_spec=TOK, rhs_spec=TOK, grad_spec=grad_spec, key=key)


def _deq(x, axes):
    """float64 dequantized int8 values of ``x`` with one scale per index of ``axes``."""
    q = qjax.quantize(x, qjax.QuantSpec(qjax.int8, channel_axes=tuple(axes), pack=False))
    assert q.values.dtype == jnp.int8
    return np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)


def _deq_grouped_in(w, dn, groups):
    """The kernel with one scale per (feature group, input feature), as the input-gradient
    conv sums over output features within a group and over the window."""
    cdn = lax.conv_dimension_numbers((1,) * w.ndim, (1,) * w.ndim, dn)
    perm = cdn.rhs_spec
    wc = np.asarray(w).transpose(perm)  # O, I, spatial
    o = wc.shape[0]
    dq = _deq(jnp.asarray(wc.reshape(groups, o // groups, *wc.shape[1:])), (0, 2)).reshape(wc.shape)
    return dq.transpose(np.argsort(perm))


def _conv64(kw):
    def conv(a, b):
        return lax.conv_general_dilated(a, b, **kw, precision=lax.Precision.HIGHEST)

    return conv


def _axes(kw, w):
    cdn = lax.conv_dimension_numbers((1,) * w.ndim, (1,) * w.ndim, kw["dimension_numbers"])
    return cdn


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _y_and_grads(kw, x, w, g, grad_spec=TOK, key=None):
    def f(x, w, g, key):
        y, vjp = jax.vjp(lambda x, w: _int8(x, w, kw, grad_spec, key), x, w)
        return y, vjp(g)

    return jax.jit(f)(x, w, g, key)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_equal_float64_convs_of_the_codes(name):
    x, w, g, kw = _operands(name)
    cdn = _axes(kw, w)
    (n_l, c_l), (o_r, _), (n_o, c_o) = cdn.lhs_spec[:2], cdn.rhs_spec[:2], cdn.out_spec[:2]
    groups = kw.get("feature_group_count", 1)
    y, (dx, dw) = _y_and_grads(kw, x, w, g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    assert dx.shape == x.shape and dw.shape == w.shape
    # the same codes each conv claims to use
    x_fwd, w_fwd = _deq(x, (n_l,)), _deq(w, (o_r,))
    g_dx, w_dx = _deq(g, (n_o,)), _deq_grouped_in(w, kw["dimension_numbers"], groups)
    g_dw, x_dw = _deq(g, (c_o,)), _deq(x, (c_l,))
    with jax.enable_x64(True):
        conv = _conv64(kw)
        y_ref = conv(jnp.asarray(x_fwd), jnp.asarray(w_fwd))
        dx_ref = jax.vjp(lambda a: conv(a, jnp.asarray(w_dx)), jnp.asarray(x_fwd))[1](jnp.asarray(g_dx))[0]
        dw_ref = jax.vjp(lambda b: conv(jnp.asarray(x_dw), b), jnp.asarray(w_fwd))[1](jnp.asarray(g_dw))[0]
        assert y_ref.dtype == jnp.float64
        y_ref, dx_ref, dw_ref = map(np.asarray, (y_ref, dx_ref, dw_ref))
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # ... and close to the unquantized float conv and gradients (int8 error level)
    y_f, vjp_f = jax.vjp(_conv64(kw), x, w)
    dx_f, dw_f = vjp_f(g)
    assert _rel(y, y_f) < 0.02 and _rel(dx, dx_f) < 0.02 and _rel(dw, dw_f) < 0.02


@pytest.mark.parametrize("name", ["nchw_explicit_rhs_dilation", "nhwc_depthwise_stride2"])
def test_fallback_without_jax_transpose_rules_and_int32_chunks(name, monkeypatch):
    x, w, g, kw = _operands(name, seed=1)
    dx, dw = _y_and_grads(kw, x, w, g)[1]
    # chunked int32 accumulations (contractions split, partials summed in float32)
    monkeypatch.setattr(mod, "INT32_LIMIT", 128 * 128 * 9)  # one feature / sample per chunk
    calls = []
    backward_conv = mod._backward_conv
    monkeypatch.setattr(mod, "_backward_conv", lambda *a: calls.append(1) or backward_conv(*a))
    chunked = _y_and_grads(kw, x, w, g)[1]
    assert len(calls) >= 2 + x.shape[0]  # two or more chunks of output features, one per sample
    # a JAX without the private transpose rules: a float32 conv of the codes, transposed
    monkeypatch.setattr(mod, "_transpose_lhs", None)
    monkeypatch.setattr(mod, "_transpose_rhs", None)
    fallback = _y_and_grads(kw, x, w, g)[1]
    for got in (chunked, fallback):
        np.testing.assert_allclose(got[0], dx, rtol=1e-5, atol=1e-5 * float(jnp.abs(dx).max()))
        np.testing.assert_allclose(got[1], dw, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw).max()))


def test_stochastic_gradient_is_unbiased_and_needs_a_key():
    x, w, g, kw = _operands("nhwc_depthwise_stride2", seed=2)
    cdn = _axes(kw, w)

    def grads(key):
        return jax.vjp(lambda x, w: _int8(x, w, kw, STOCH, key), x, w)[1](g)

    n = 300
    dxs, dws = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(7), n))
    # E[stochastic_round(g)] = g: the mean tends to the conv of the unrounded g with the
    # (deterministically rounded) other operand
    w_dx = _deq_grouped_in(w, kw["dimension_numbers"], 6)
    x_dw = _deq(x, (cdn.lhs_spec[1],))
    conv = _conv64(kw)
    dx_exact = jax.vjp(lambda a: conv(a, jnp.asarray(w_dx, jnp.float32)), x)[1](g)[0]
    dw_exact = jax.vjp(lambda b: conv(jnp.asarray(x_dw, jnp.float32), b), w)[1](g)[0]
    for samples, exact in ((dxs, dx_exact), (dws, dw_exact)):
        spread = samples.std(0)
        assert float(spread.max()) > 0  # different keys, different gradients
        np.testing.assert_array_less(jnp.abs(samples.mean(0) - exact), 5 * spread / np.sqrt(n) + 1e-5)
    with pytest.raises(ValueError, match="PRNG key"):
        jax.grad(lambda x: _int8(x, w, kw, STOCH).sum())(x)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_fake_quantized_cnn_trains_in_int8():
    model = _CNN()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 8, 8, 1)), jnp.float32)
    labels = jnp.argmax(x.reshape(32, 4, 16).sum(-1), -1)  # a learnable digit-like target
    # LeCun-normal kernels drawn by numpy (Flax's initializers take seconds to compile)
    params = jax.tree.map(
        lambda s: (
            jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), jnp.float32)
            if len(s.shape) > 1
            else jnp.zeros(s.shape)
        ),
        jax.eval_shape(model.init, jax.random.key(0), x),
    )
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=S8, act=S8, grad=STOCH)])

    def loss(p, key, quant=True):
        apply = qjax.fake_quantized(model.apply, policy, key=key) if quant else model.apply
        logits = apply(p, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), labels])

    grad = jax.jit(jax.value_and_grad(loss))
    _, g_int = grad(params, jax.random.key(1))
    g_float = jax.jit(jax.grad(lambda p: loss(p, None, quant=False)))(params)
    kernels = {
        k: v for k, v in jax.tree_util.tree_leaves_with_path(g_int) if "kernel" in jax.tree_util.keystr(k)
    }
    assert len(kernels) == 3
    for (path, gi), gf in zip(jax.tree_util.tree_leaves_with_path(g_int), jax.tree.leaves(g_float)):
        assert bool(jnp.all(jnp.isfinite(gi))) and float(jnp.abs(gi).max()) > 0, path
        cos = float(jnp.vdot(gi, gf) / (jnp.linalg.norm(gi) * jnp.linalg.norm(gf)))
        assert cos > 0.9, (jax.tree_util.keystr(path), cos)
    p, losses = params, []
    for i in range(15):
        value, g = grad(p, jax.random.key(100 + i))
        losses.append(float(value))
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    assert losses[-1] < 0.8 * losses[0], losses


def test_unsupported_configurations_raise():
    x = jnp.ones((4, 6, 5, 5))
    w = jnp.ones((4, 6, 3, 3))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    with pytest.raises(ValueError, match="batch_group_count=2 is not supported"):
        int8_conv_general_dilated(x, w, **kw, batch_group_count=2, lhs_spec=S8, rhs_spec=S8, grad_spec=S8)
    with pytest.raises(ValueError, match="signed integer format"):
        int8_conv_general_dilated(
            x, w, **kw, lhs_spec=S8, rhs_spec=S8, grad_spec=qjax.QuantSpec(qjax.fp8_e4m3)
        )
    with pytest.raises(ValueError, match="string padding with lhs_dilation"):
        int8_conv_general_dilated(x, w, **kw, lhs_dilation=(2, 2), lhs_spec=S8, rhs_spec=S8, grad_spec=S8)
    # through fake_quantized: the weight must be the conv's kernel
    policy = qjax.Policy([qjax.Rule("w", weight=S8, act=S8, grad=S8)])
    f = lambda p, k: lax.conv_general_dilated(p["w"], k, **kw)
    with pytest.raises(ValueError, match="weight as the kernel"):
        qjax.fake_quantized(f, policy)({"w": x}, w)


@pytest.mark.parametrize("grad", [TOK, S8], ids=["grad_per_token", "grad_per_tensor"])
def test_fake_quantized_forward_is_the_served_conv(grad):
    # a per-tensor kernel and input spec: the trained forward is the served one (it used
    # to be per output feature / per sample whatever the specs said)
    x, w, g, kw = _operands("nhwc_stride2_same", seed=3)
    f = lambda p, x: lax.conv_general_dilated(x, p["w"], **kw)
    serve = qjax.Policy([qjax.Rule("w", weight=S8, act=S8)])
    train = qjax.Policy([qjax.Rule("w", weight=S8, act=S8, grad=grad)])
    served = qjax.quantized(f, serve, backend="xla")(qjax.quantize_params({"w": w}, serve), x)
    y, vjp = jax.vjp(lambda p: qjax.fake_quantized(f, train)(p, x), {"w": w})
    np.testing.assert_allclose(y, served, rtol=1e-6, atol=1e-6 * float(jnp.abs(served).max()))
    # the weight gradient: x re-quantized per input feature, g per output feature or per tensor
    cdn = _axes(kw, w)
    g_dw = _deq(g, (cdn.out_spec[1],) if grad is TOK else ())
    x_dw = _deq(x, (cdn.lhs_spec[1],))
    with jax.enable_x64(True):
        conv = _conv64(kw)
        _, vjp64 = jax.vjp(lambda b: conv(jnp.asarray(x_dw), b), jnp.asarray(w, jnp.float64))
        dw_ref = vjp64(jnp.asarray(g_dw))[0]
    dw = vjp(g)[0]["w"]
    np.testing.assert_allclose(dw, np.asarray(dw_ref), rtol=1e-5, atol=1e-5 * float(np.abs(dw_ref).max()))
