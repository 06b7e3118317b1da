"""Integer-only inference (HAWQ-V3): bit-exact against a NumPy int64 reference of the same
integer program, close to ``qjax.quantized`` (which rescales in float), integer from the
input's quantization to the output's dequantization, and clear refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.quant.dyadic import dyadic

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8)  # one static scale per tensor
U8 = qjax.QuantSpec(qjax.uint8)  # post-ReLU inputs: symmetric unsigned, codes 0..255


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x))  # Dense_0, then Dense_1
        return nn.Dense(5)(h)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x + nn.relu(nn.Conv(8, (3, 3), name="branch")(x))  # a residual add
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _quantized_model(net, x, policy, batch_stats=None):
    variables = dict(net.init(jax.random.key(1), x))
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    stats = qjax.calibrate(net.apply, policy, variables, [(x,)])
    return variables, qjax.quantize_params(variables, policy, act_stats=stats)


def _reference_mlp(qp, x, policy):
    """The integer program by hand: NumPy int64, the multipliers from qjax's dyadic()."""
    p = qp["params"]
    out = np.asarray(x, np.float32)
    acc = scale = None
    for i, layer in enumerate(("Dense_0", "Dense_1")):
        q = p[layer]["kernel"]
        fmt = policy.act_spec(f"params/{layer}/kernel").format
        s_act = float(np.asarray(q.act_scale, np.float64))
        s_w = np.asarray(q.scale, np.float64)
        if i == 0:
            codes = np.clip(np.round(out / np.float32(s_act)), fmt.qmin, fmt.qmax).astype(np.int64)
        else:
            b, c = dyadic(scale / s_act)
            b, c = b.astype(np.int64), c.astype(np.int64)
            codes = np.clip(
                (acc * b + np.where(c > 0, 1 << np.maximum(c - 1, 0), 0)) >> c, fmt.qmin, fmt.qmax
            )
        acc = codes @ np.asarray(q.values, np.int64)
        scale = s_act * s_w
        acc = acc + np.round(np.asarray(p[layer]["bias"], np.float64) / scale).astype(np.int64)
        if i == 0:
            acc = np.maximum(acc, 0)  # ReLU
    return acc.astype(np.float32) * scale.astype(np.float32)


@pytest.mark.parametrize("act", [A8, U8])
def test_mlp_is_bit_exact_against_an_integer_reference(act):
    net = _MLP()
    x = jax.random.normal(jax.random.key(0), (32, 12))
    # the first layer reads the signed input; the second its ReLU output (unsigned works)
    policy = qjax.Policy(
        [qjax.Rule("params/Dense_0/kernel", weight=W8, act=A8), qjax.Rule(".*kernel", weight=W8, act=act)]
    )
    _, qp = _quantized_model(net, x, policy)
    got = qjax.integer_only(net.apply, policy, qp)(x)
    np.testing.assert_array_equal(np.asarray(got), _reference_mlp(qp, x, policy))


def _integer_ops_only(jaxpr):
    """Every arithmetic op between the input's quantization and the output's dequantization
    is on integers: matmuls, adds, maxima, reductions and pooling."""
    checked = (
        "dot_general",
        "conv_general_dilated",
        "add",
        "sub",
        "reduce_window_max",
        "reduce_window_sum",
        "reduce_sum",
        "reduce_max",
    )
    seen = set()

    def walk(j):
        for e in j.eqns:
            for v in e.params.values():
                if hasattr(v, "jaxpr"):
                    walk(v.jaxpr if hasattr(v.jaxpr, "eqns") else v)
            if e.primitive.name in checked:
                seen.add(e.primitive.name)
                assert all(jnp.issubdtype(v.aval.dtype, jnp.integer) for v in e.invars), e

    walk(jaxpr)
    return seen


def test_cnn_with_batch_norm_residual_and_pooling_runs_on_integers():
    net = _CNN()
    x = jax.random.normal(jax.random.key(2), (16, 8, 8, 3))
    bn = {"BatchNorm_0": {"mean": jnp.linspace(-0.3, 0.3, 8), "var": jnp.linspace(0.5, 2.0, 8)}}
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=A8)])
    variables, qp = _quantized_model(net, x, policy, batch_stats=bn)
    program = qjax.integer_only(net.apply, policy, qp)
    got, served, ref = program(x), qjax.quantized(net.apply, policy)(qp, x), net.apply(variables, x)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel(got, served) < 5e-3  # the same quantization, rescaled in integers instead of float
    assert rel(got, ref) < 3e-2
    seen = _integer_ops_only(jax.make_jaxpr(program)(x).jaxpr)
    assert {"conv_general_dilated", "dot_general", "reduce_window_max", "reduce_window_sum", "add"} <= seen


def test_int4_weights_and_argmax_stay_integer():
    net = _MLP()
    x = jax.random.normal(jax.random.key(3), (32, 12))
    w4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=w4, act=A8)])
    _, qp = _quantized_model(net, x, policy)
    f = lambda v, x: jnp.argmax(net.apply(v, x), axis=-1)
    labels = qjax.integer_only(f, policy, qp)(x)
    assert jnp.issubdtype(labels.dtype, jnp.integer)
    served = jnp.argmax(qjax.integer_only(net.apply, policy, qp)(x), axis=-1)
    np.testing.assert_array_equal(labels, served)


def test_refusals_name_the_op_and_the_leaf():
    x = jax.random.normal(jax.random.key(4), (4, 12))
    net = _MLP()
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=A8)])
    variables, qp = _quantized_model(net, x, policy)
    running = lambda v, x: jnp.cumsum(net.apply(v, x), axis=-1)  # no integer form (yet)
    with pytest.raises(ValueError, match=r"'cumsum' at .* has no integer form"):
        qjax.integer_only(running, policy, qp)(x)
    # no static act scale stored (quantize_params without act_stats)
    bare = qjax.quantize_params(variables, policy)
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel'.*no static activation scale"):
        qjax.integer_only(net.apply, policy, bare)(x)
    # dynamic per-token activations are not static scales
    per_token = qjax.Policy(
        [qjax.Rule(".*kernel", weight=W8, act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN))]
    )
    with pytest.raises(ValueError, match="one static scale"):
        qjax.integer_only(net.apply, per_token, qjax.quantize_params(variables, per_token))(x)
    # groups along an output axis: the scale varies along the contraction (per input row)
    rows = qjax.QuantSpec(qjax.int8, channel_axes=(0,), group_size=4, group_axis=1)
    g = qjax.Policy(
        [qjax.Rule(".*Dense_0/kernel", weight=rows, act=A8), qjax.Rule(".*kernel", weight=W8, act=A8)]
    )
    stats = qjax.calibrate(net.apply, g, variables, [(x,)])
    with pytest.raises(ValueError, match="scale varies along the contracted axes"):
        qjax.integer_only(net.apply, g, qjax.quantize_params(variables, g, act_stats=stats))(x)
    # a matmul whose weight stays float
    half = qjax.Policy([qjax.Rule("params/Dense_0/kernel", weight=W8, act=A8)])
    stats = qjax.calibrate(net.apply, half, variables, [(x,)])
    with pytest.raises(ValueError, match="reads no quantized weight"):
        qjax.integer_only(net.apply, half, qjax.quantize_params(variables, half, act_stats=stats))(x)
    with pytest.raises(TypeError, match=r"qjax\.Policy"):
        qjax.integer_only(net.apply, [qjax.Rule(".*", weight=W8)], qp)


@pytest.mark.parametrize(
    "fmt, group, symmetric", [(qjax.int4, 32, True), (qjax.int8, 64, True), (qjax.int4, 32, False)]
)
def test_weights_grouped_along_k_split_the_contraction(fmt, group, symmetric):
    # GPTQ / AWQ-style weights (a scale, and zero point, per group of K rows and output):
    # one int32 partial per group, each rescaled onto one scale; against float64 applied to
    # the same activation codes and the dequantized weight
    x = jax.random.normal(jax.random.key(0), (2, 3, 128))
    params = {"w": jax.random.normal(jax.random.key(1), (128, 24)) / 8}
    spec = qjax.QuantSpec(fmt, channel_axes=(-1,), group_size=group, group_axis=-2, symmetric=symmetric)
    policy = qjax.Policy([qjax.Rule("w", weight=spec, act=A8)])
    f = lambda p, x: x @ p["w"]
    qp = qjax.quantize_params(params, policy, act_stats=qjax.calibrate(f, policy, params, [(x,)]))
    got = np.asarray(qjax.integer_only(f, policy, qp)(x), np.float64)
    s_act = float(qp["w"].act_scale)
    codes = np.clip(np.round(np.asarray(x, np.float64) / np.float32(s_act)), -127, 127)
    want = (codes * s_act) @ np.asarray(qp["w"].dequantize(), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # stored (N, K), as qjax.store_transposed (and the Pallas kernels) keep it: the same program
    transposed = qjax.store_transposed(qp, "w")
    np.testing.assert_array_equal(qjax.integer_only(f, policy, transposed)(x), got.astype(np.float32))
    _assert_close_to_served(lambda p, x: jax.nn.relu(f(p, x)), params, x, policy, rtol=1e-5)


def test_repeated_ops_merge_only_equal_operands_and_rows_of_quantized_leaves():
    # integer_only returns one value for the same op on the same operands (a mask broadcast
    # twice); constants of two fp8 formats with equal bytes, and a typed PRNG key, are
    # neither merged nor compared as bytes
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = jax.random.normal(jax.random.key(3), (6, 32))
    params = {
        "w": jax.random.normal(jax.random.key(1), (32, 16)) / 4,
        "e": jax.random.normal(jax.random.key(4), (8, 16)),
    }
    byte = np.full((16,), 0x3C, np.uint8)  # 1.5 as e4m3fn, 0.75 as e4m3fnuz
    c1 = jnp.asarray(byte.view(ml_dtypes.float8_e4m3fn))
    c2 = jnp.asarray(byte.view(ml_dtypes.float8_e4m3fnuz))

    def f(p, x):
        z = x @ p["w"]
        noise = jax.random.normal(jax.random.split(jax.random.key(0))[1], (16,)) * 0.01
        return z * c1.astype(jnp.float32), z * c2.astype(jnp.float32), z + noise

    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    qp = qjax.quantize_params(params, policy, act_stats=qjax.calibrate(f, policy, params, [(x,)]))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    got = qjax.integer_only(f, policy, qp)(x)
    assert [rel(g, s) < 1e-4 for g, s in zip(got, qjax.quantized(f, policy)(qp, x))] == [True] * 3
    np.testing.assert_allclose(got[1], got[0] / 2, rtol=1e-6)  # 0.75 against 1.5: not merged
    # a row of a quantized table (not a layer stack), packed or grouped along its rows too:
    # its dequantized values, as before
    for spec in (W8, qjax.QuantSpec(qjax.int4, channel_axes=(-1,), pack=True, pack_axis=0)):
        rows = qjax.Policy([qjax.Rule("w", weight=W8, act=A8), qjax.Rule("e", weight=spec)])
        g = lambda p, x: x @ p["w"] + p["e"][0] + p["e"][:1]
        qp = qjax.quantize_params(params, rows, act_stats=qjax.calibrate(g, rows, params, [(x,)]))
        assert rel(qjax.integer_only(g, rows, qp)(x), qjax.quantized(g, rows)(qp, x)) < 1e-4


# -- the review's cases ---------------------------------------------------------------------


def _assert_close_to_served(f, variables, x, policy, rtol=5e-3):
    stats = qjax.calibrate(f, policy, variables, [(x,)])
    qp = qjax.quantize_params(variables, policy, act_stats=stats)
    got, served = qjax.integer_only(f, policy, qp)(x), qjax.quantized(f, policy)(qp, x)
    err = float(jnp.linalg.norm(got - served) / jnp.linalg.norm(served))
    assert err < rtol, err
    return qp


def test_sums_that_would_pass_int32_move_to_a_coarser_scale():
    # 1024 tokens of accumulators near 127 * 127 * 256: their sum (a mean over tokens)
    # needs 33 bits; it was computed in int32 and wrapped
    x = jnp.ones((1, 1024, 256))
    params = {"w": jnp.ones((256, 4))}
    f = lambda p, x: jnp.mean(x @ p["w"], axis=1)
    _assert_close_to_served(f, params, x, qjax.Policy([qjax.Rule("w", weight=W8, act=A8)]), rtol=1e-5)


def test_wide_formats_use_wide_operands_or_are_refused():
    x = jax.random.uniform(jax.random.key(5), (4, 64))
    params = {"w": jax.random.uniform(jax.random.key(6), (64, 8))}  # non-negative: uint8 codes
    f = lambda p, x: x @ p["w"]
    u8 = qjax.QuantSpec(qjax.uint8, channel_axes=(-1,))
    _assert_close_to_served(f, params, x, qjax.Policy([qjax.Rule("w", weight=u8, act=A8)]))
    w16 = qjax.QuantSpec(qjax.int16, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule("w", weight=w16, act=qjax.QuantSpec(qjax.int16))])
    stats = qjax.calibrate(f, policy, params, [(x,)])
    with pytest.raises(ValueError, match="int32 accumulator can overflow"):
        qjax.integer_only(f, policy, qjax.quantize_params(params, policy, act_stats=stats))(x)


def test_weights_stored_transposed_or_reversed():
    x = jax.random.normal(jax.random.key(7), (4, 12))
    params = {"w": jax.random.normal(jax.random.key(8), (12, 6))}
    f = lambda p, x: x @ p["w"]
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    stats = qjax.calibrate(f, policy, params, [(x,)])
    stored = qjax.store_transposed(qjax.quantize_params(params, policy, act_stats=stats), "w")
    np.testing.assert_allclose(
        qjax.integer_only(f, policy, stored)(x), qjax.quantized(f, policy)(stored, x), rtol=1e-5, atol=1e-5
    )
    net = nn.ConvTranspose(4, (3, 3), transpose_kernel=True)  # reads the kernel reversed
    x4 = jax.random.normal(jax.random.key(9), (2, 6, 6, 3))
    per_tensor = qjax.Policy([qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int8), act=A8)])
    _assert_close_to_served(net.apply, net.init(jax.random.key(10), x4), x4, per_tensor)


def policy_all():
    return qjax.Policy([qjax.Rule(".*kernel", weight=W8, act=A8)])


def test_static_factors_on_either_side_infinite_identities_and_softmax():
    x = jax.random.normal(jax.random.key(11), (4, 12))
    params = {
        "w": jax.random.normal(jax.random.key(12), (12, 6)),
        "v": jax.random.normal(jax.random.key(13), (6, 3)),
    }
    policy = qjax.Policy([qjax.Rule(".*", weight=W8, act=A8)])
    f = lambda p, x: (0.5 * jnp.maximum(x @ p["w"], -jnp.inf)) @ p["v"]
    _assert_close_to_served(f, params, x, policy)
    g = lambda p, x: jax.nn.softmax(x @ p["w"]) @ p["v"]  # on integers too (test_integer_transformer)
    _assert_close_to_served(g, params, x, policy)


class _Pools(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        # per-position scales (padding excluded from the count), then a pool that strides an
        # axis its window does not span
        x = nn.avg_pool(x, (3, 3), (1, 1), padding="SAME", count_include_pad=False)
        x = nn.max_pool(x, (1, 2), (2, 2))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class _TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(nn.relu(x).reshape(x.shape[0], -1))


def test_strided_pools_tiny_batch_norm_factors_and_dead_layers():
    x4 = jax.random.normal(jax.random.key(16), (2, 8, 8, 3))
    net = _Pools()
    _assert_close_to_served(net.apply, net.init(jax.random.key(17), x4), x4, policy_all())
    bn = _TinyBN()
    v = dict(bn.init(jax.random.key(18), x4))
    v["params"] = {
        **v["params"],
        "BatchNorm_0": {"scale": jnp.ones(8).at[0].set(1e-7), "bias": jnp.full(8, 0.5)},
    }
    _assert_close_to_served(bn.apply, v, x4, policy_all())
    # the next layer's range is below one step of the layer before: its codes saturate
    params = {
        "w": jax.random.normal(jax.random.key(19), (12, 6)),
        "v": jax.random.normal(jax.random.key(20), (6, 3)),
    }
    f = lambda p, x: (1e-9 * jax.nn.relu(x @ p["w"])) @ p["v"]
    _assert_close_to_served(
        f,
        params,
        jax.random.normal(jax.random.key(21), (4, 12)),
        qjax.Policy([qjax.Rule(".*", weight=W8, act=A8)]),
    )


class _PaddedCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))  # padded positions: real 0
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="c2")(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_zero_points_of_activations_and_weights():
    # TFLite-style asymmetric uint8 activations and asymmetric weights (GPTQ-style): both
    # operands enter centred, so a conv's zero padding still stands for 0
    x = jax.random.uniform(jax.random.key(22), (2, 6, 6, 3))  # non-negative input
    net = _PaddedCNN()
    variables = net.init(jax.random.key(23), x)
    for weight in (W8, qjax.QuantSpec(qjax.uint8, channel_axes=(-1,), symmetric=False)):
        act = qjax.QuantSpec(qjax.uint8, symmetric=False)
        qp = _assert_close_to_served(
            net.apply, variables, x, qjax.Policy([qjax.Rule(".*kernel", weight=weight, act=act)])
        )
        assert qp["params"]["c2"]["kernel"].act_zero_point is not None


def test_codes_wider_than_int16_take_int32_operands():
    # centred int16 activation codes (with a zero point) reach 32767 + |zp|
    x = jax.random.normal(jax.random.key(24), (4, 16)) + 0.5
    params = {"w": jax.random.normal(jax.random.key(25), (16, 4))}
    f = lambda p, x: x @ p["w"]
    a16 = qjax.QuantSpec(qjax.int16, symmetric=False)
    w4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    _assert_close_to_served(f, params, x, qjax.Policy([qjax.Rule("w", weight=w4, act=a16)]), rtol=1e-5)
