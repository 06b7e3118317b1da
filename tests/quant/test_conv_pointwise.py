"""Pointwise (1x1) convs run as a quantized dot_general: the same sums as the conv,
checked against float64 references of the dequantized operands, with gradients, kernel
dispatch and the groups along input features that only the dot form can take."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_ops import normal

import qjax
from qjax.quant.ops import quantized_conv_general_dilated as qconv

Q = qjax.QuantSpec
A8 = Q(qjax.int8)
DN = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}


def _ref(x, w, layout, strides):
    """float64 1x1 conv: a matmul over features at every strided pixel, in NHWC."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if layout == "NCHW":
        x, w = np.transpose(x, (0, 2, 3, 1)), np.transpose(w, (2, 3, 1, 0))
    y = x[:, :: strides[0], :: strides[1]] @ w[0, 0]
    return y if layout == "NHWC" else np.transpose(y, (0, 3, 1, 2))


def _has_conv(f, *args) -> bool:
    return "conv_general_dilated" in str(jax.make_jaxpr(f)(*args))


WEIGHTS = {
    "int8 per channel": lambda o: Q(qjax.int8, channel_axes=(o,)),
    "int4 packed along I, groups of 8 along I": lambda o: Q(
        qjax.int4,
        channel_axes=(o,),
        group_axis=-2 if o == -1 else 1,
        group_size=8,
        pack_axis=-2 if o == -1 else 1,
    ),
    "int4 groups of 2 along O": lambda o: Q(qjax.int4, group_axis=o, group_size=2),
    "int4 groups of 5 along I (padded)": lambda o: Q(
        qjax.int4, channel_axes=(o,), group_axis=-2 if o == -1 else 1, group_size=5, pad_groups=True
    ),
}


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 3), "VALID"), ((2, 1), ((0, 0), (0, 0)))])
@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_only_pointwise_matches_float64(layout, strides, padding, wname, dtype):
    cin, cout = 16, 6
    xs = (2, 7, 9, cin) if layout == "NHWC" else (2, cin, 7, 9)
    ws = (1, 1, cin, cout) if layout == "NHWC" else (cout, cin, 1, 1)
    x, w = normal(xs, 0, dtype), normal(ws, 1)
    qw = qjax.quantize(w, WEIGHTS[wname](-1 if layout == "NHWC" else 0))
    f = jax.jit(
        lambda x, qw: qconv(x, qw, window_strides=strides, padding=padding, dimension_numbers=DN[layout])
    )
    y = f(x, qw)
    assert y.dtype == jnp.result_type(dtype, qw.dtype) and not _has_conv(f, x, qw)
    want = _ref(x, qw.dequantize(), layout, strides)
    mag = _ref(np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(qw.dequantize())), layout, strides)
    tol = 2**-7 if dtype == jnp.bfloat16 else 2**-20
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - want), tol * mag + 1e-30)


def test_strided_per_tensor_scale_covers_skipped_pixels():
    """The dynamic activation scale is the whole input's, as the conv computes it."""
    x = normal((1, 4, 4, 8), 0).at[0, 1, 1, 0].set(40.0)  # a pixel the stride skips sets the scale
    qw = qjax.quantize(normal((1, 1, 8, 3), 1), Q(qjax.int8, channel_axes=(-1,)))
    y = qconv(x, qw, window_strides=(2, 2), padding="VALID", dimension_numbers=DN["NHWC"], lhs_spec=A8)
    xq = qjax.quantize(x, A8)
    assert float(xq.scale.max()) == pytest.approx(40.0 / 127)
    want = _ref(xq.dequantize(), qw.dequantize(), "NHWC", (2, 2))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("axes", [(), (0,)])
def test_strided_quantized_input(axes):
    """A QArray input is sliced with its scales (per tensor or per batch element)."""
    xq = qjax.quantize(normal((3, 6, 5, 8), 0), Q(qjax.int8, channel_axes=axes))
    qw = qjax.quantize(normal((1, 1, 8, 3), 1), Q(qjax.int8, channel_axes=(-1,)))
    f = jax.jit(
        lambda a, b: qconv(a, b, window_strides=(2, 2), padding="VALID", dimension_numbers=DN["NHWC"])
    )
    assert not _has_conv(f, xq, qw)
    want = _ref(xq.dequantize(), qw.dequantize(), "NHWC", (2, 2))
    np.testing.assert_allclose(f(xq, qw), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_empty_batch_and_other_ranks():
    w1 = qjax.quantize(normal((1, 8, 3), 1), Q(qjax.int8, channel_axes=(-1,)))
    kw1 = dict(window_strides=(2,), padding="VALID", dimension_numbers=("NWC", "WIO", "NWC"), lhs_spec=A8)
    assert qconv(jnp.zeros((0, 5, 8)), w1, **kw1).shape == (0, 3, 3)
    w3 = qjax.quantize(normal((1, 1, 1, 8, 3), 1), Q(qjax.int8, channel_axes=(-1,)))
    x3 = normal((2, 3, 4, 5, 8), 0)
    y = qconv(x3, w3, window_strides=(1, 2, 1), padding="SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    want = np.asarray(x3, np.float64)[:, :, ::2] @ np.asarray(w3.dequantize(), np.float64)[0, 0, 0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_strided_stochastic_rounding_uses_the_whole_input_scale():
    x = normal((2, 6, 6, 8), 0)
    qw = qjax.quantize(normal((1, 1, 8, 3), 1), Q(qjax.int8, channel_axes=(-1,)))
    spec = Q(qjax.int8, rounding="stochastic")
    kw = dict(window_strides=(2, 2), padding="VALID", dimension_numbers=DN["NHWC"], lhs_spec=spec)
    ys = [qconv(x, qw, key=jax.random.key(i), **kw) for i in range(2)]
    assert not np.array_equal(ys[0], ys[1])  # the key is used
    step = float(jnp.max(jnp.abs(x))) / 127  # the whole input's scale
    err = np.abs(np.asarray(ys[0], np.float64) - _ref(x, qw.dequantize(), "NHWC", (2, 2)))
    bound = step * _ref(np.ones_like(x), np.abs(np.asarray(qw.dequantize())), "NHWC", (2, 2))
    np.testing.assert_array_less(err, bound + 1e-5)  # each code within one step of its input


def test_gradients_are_the_straight_through_ones():
    """d/dx and d/dw of a pointwise conv with on-the-fly A8/W8 equal those of the float conv
    of the fake-quantized operands (straight-through estimator)."""
    x, w = normal((2, 5, 5, 8), 0), normal((1, 1, 8, 4), 1)
    wspec = Q(qjax.int8, channel_axes=(-1,))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN["NHWC"])
    t = normal((2, 5, 5, 4), 2)

    def loss_q(x, w):
        return jnp.sum(t * qconv(x, w, lhs_spec=A8, rhs_spec=wspec, **kw))

    def loss_fq(x, w):
        return jnp.sum(t * lax.conv_general_dilated(qjax.fake_quant(x, A8), qjax.fake_quant(w, wspec), **kw))

    assert not _has_conv(loss_q, x, w)
    for got, want in zip(jax.grad(loss_q, (0, 1))(x, w), jax.grad(loss_fq, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_errors_name_why_the_conv_cannot_be_a_dot():
    x = normal((2, 6, 6, 16), 0)
    grouped = Q(qjax.int4, channel_axes=(-1,), group_axis=-2, group_size=8)
    kw = dict(padding="SAME", dimension_numbers=DN["NHWC"])
    # a 3x3 kernel grouped along its input features has no exact conv form
    w3 = qjax.quantize(normal((3, 3, 16, 4), 1), grouped)
    with pytest.raises(
        ValueError, match=r"axis 2 of rhs.*cannot be factored.*pointwise 1x1 kernel also per group"
    ):
        qconv(x, w3, window_strides=(1, 1), **kw)
    # strided, activation quantized per batch element on the fly: stays a conv, which cannot
    w1 = qjax.quantize(normal((1, 1, 16, 4), 1), grouped)
    per_batch = Q(qjax.int8, channel_axes=qjax.PER_TOKEN)
    with pytest.raises(ValueError, match=r"grouped along its input features.*per batch element"):
        qconv(x, w1, window_strides=(2, 2), lhs_spec=per_batch, **kw)
    # without the stride it is a dot, per-batch scales included
    y = qconv(x, w1, window_strides=(1, 1), lhs_spec=per_batch, **kw)
    xq = qjax.quantize(x, Q(qjax.int8, channel_axes=(0,)))
    want = _ref(xq.dequantize(), w1.dequantize(), "NHWC", (1, 1))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a conv that is not pointwise has no kernel: XLA under any backend
    w8 = qjax.quantize(normal((3, 3, 16, 4), 1), Q(qjax.int8, channel_axes=(-1,)))
    np.testing.assert_array_equal(
        qconv(x, w8, window_strides=(1, 1), backend="interpret-gpu", **kw),
        qconv(x, w8, window_strides=(1, 1), backend="xla", **kw),
    )
    # a forced kernel that cannot run a pointwise conv says why (channels not last: NCHW)
    x_nchw = normal((2, 16, 6, 6), 0, jnp.bfloat16)
    w_oihw = qjax.quantize(normal((4, 16, 1, 1), 1), Q(qjax.int8, channel_axes=(0,)))
    with pytest.raises(
        ValueError, match=r"backend='interpret-gpu' cannot run this dot_general.*dimension numbers"
    ):
        qconv(
            x_nchw,
            w_oihw,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=DN["NCHW"],
            backend="interpret-gpu",
        )
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        qconv(x, w8, window_strides=(1, 1), backend="cuda", **kw)


class _PointwiseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(256, (3, 3))(x)  # stays a conv
        return nn.Conv(128, (1, 1))(nn.relu(x))


@pytest.mark.parametrize("backend", ["interpret-gpu", "interpret-tpu"])
def test_quantized_model_sends_1x1_convs_to_the_kernels(backend):
    """W4A16 with groups of 128 along the input features: the 1x1 conv runs the Pallas
    kernel (a grouped 3x3 kernel could not run at all, so the 3x3 conv is per channel)."""
    m = _PointwiseNet()
    x = normal((2, 4, 4, 32), 0, jnp.bfloat16)
    v = m.init(jax.random.key(1), x)
    g128 = Q(qjax.int4, channel_axes=(-1,), group_axis=-2, group_size=128, pack_axis=-2)
    pol = qjax.Policy(
        [
            qjax.Rule(r".*Conv_1/kernel", weight=g128),
            qjax.Rule(r".*Conv_0/kernel", weight=Q(qjax.int8, channel_axes=(-1,))),
        ]
    )
    qp = qjax.quantize_params(v, pol)
    f = jax.jit(qjax.quantized(m.apply, pol, backend="auto"))
    g = jax.jit(qjax.quantized(m.apply, pol, backend=backend))
    jaxpr = str(jax.make_jaxpr(g)(qp, x))
    assert "pallas_call" in jaxpr and jaxpr.count("conv_general_dilated") == 1
    ref = f(qp, x).astype(jnp.float32)  # XLA on CPU
    out = g(qp, x).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(jnp.max(jnp.abs(ref))))
    # and the float64 reference of the dequantized weights
    h = np.maximum(
        np.asarray(
            lax.conv_general_dilated(
                np.asarray(x, np.float64),
                np.asarray(qp["params"]["Conv_0"]["kernel"].dequantize(), np.float64),
                (1, 1),
                "SAME",
                dimension_numbers=DN["NHWC"],
            )
        )
        + np.asarray(v["params"]["Conv_0"]["bias"], np.float64),
        0,
    )
    want = h @ np.asarray(qp["params"]["Conv_1"]["kernel"].dequantize(), np.float64)[0, 0]
    want = want + np.asarray(v["params"]["Conv_1"]["bias"], np.float64)
    np.testing.assert_allclose(out, want, atol=3e-2 * np.abs(want).max())
