"""Quantized ``lax.ragged_dot`` (mixture-of-experts grouped matmuls): the op against a
float64 per-group reference, and ``quantized`` / ``fake_quantized`` / ``calibrate`` on a
function whose expert weight a rule matches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from jax import lax

import qjax
from qjax.quant import quantized_ragged_dot

PT = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
PER_EXPERT = qjax.QuantSpec(qjax.int8, channel_axes=(0, 2))


def _data(g=4, k=32, n=8, sizes=(3, 0, 5, 4), extra=0, seed=0):
    r = np.random.default_rng(seed)
    m = sum(sizes) + extra
    return (
        jnp.asarray(r.normal(size=(m, k)), jnp.float32),
        jnp.asarray(r.normal(size=(g, k, n)), jnp.float32),
        jnp.asarray(sizes, jnp.int32),
    )


def _reference(x, w, sizes):
    """float64, one matmul per group; rows past the groups are zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for g, size in enumerate(np.asarray(sizes)):
        out[start : start + size] = x[start : start + size] @ w[g]
        start += size
    return out


def _per_row_fq(x):
    x = np.asarray(x, np.float64)
    s = np.abs(x).max(1, keepdims=True) / 127.0
    s = np.where(s == 0, 1.0, s)
    return np.clip(np.round(x / s), -127, 127) * s


@pytest.mark.parametrize("extra", [0, 3])  # rows past the last group give zeros
def test_w8a8_runs_an_int8_ragged_dot_equal_to_the_float64_reference(extra, integer_ops):
    x, w, sizes = _data(extra=extra)
    wq = qjax.quantize(w, PER_EXPERT)
    y = quantized_ragged_dot(x, wq, sizes, lhs_spec=PT)
    ref = _reference(_per_row_fq(x), wq.dequantize(), sizes)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
    assert (
        integer_ops(
            jax.make_jaxpr(lambda x: quantized_ragged_dot(x, wq, sizes, lhs_spec=PT))(x), "ragged_dot_general"
        )
        == 1
    )
    assert not np.any(np.asarray(y)[sum(np.asarray(sizes)) :])


@pytest.mark.parametrize(
    "spec",
    [
        PER_EXPERT,
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),  # one scale per output channel, all experts
        qjax.QuantSpec(qjax.int8, channel_axes=()),
        qjax.QuantSpec(qjax.int4, channel_axes=(0, 2)),  # packed int4
        qjax.QuantSpec(qjax.uint8, channel_axes=(0, 2), symmetric=False),  # zero points
        qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(0, 2)),
    ],
    ids=["per-expert", "per-channel", "per-tensor", "int4", "uint8-asym", "fp8"],
)
def test_weight_only_formats_match_the_dequantized_weight(spec):
    x, w, sizes = _data(seed=1)
    wq = qjax.quantize(w, spec)
    y = quantized_ragged_dot(x, wq, sizes)
    ref = _reference(x, wq.dequantize(), sizes)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@settings(max_examples=examples(8), deadline=None)  # each example compiles new shapes
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5),
    extra=st.integers(0, 2),
    k=st.sampled_from([1, 3, 16]),
)
def test_any_grouping_matches_the_reference(sizes, extra, k):
    x, w, gs = _data(g=len(sizes), k=k, n=3, sizes=tuple(sizes), extra=extra, seed=len(sizes) + k)
    wq = qjax.quantize(w, PER_EXPERT)
    y = jax.jit(lambda x, wq, gs: quantized_ragged_dot(x, wq, gs, lhs_spec=PT))(x, wq, gs)  # one compile
    ref = _reference(_per_row_fq(x), wq.dequantize(), gs)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)


def test_gradient_is_straight_through_and_bf16_keeps_its_dtype():
    x, w, sizes = _data()
    wq = qjax.quantize(w, PER_EXPERT)
    got = jax.grad(lambda x: jnp.sum(quantized_ragged_dot(x, wq, sizes, lhs_spec=PT) ** 2))(x)
    fqx = jnp.asarray(_per_row_fq(x), x.dtype)
    fq = lambda v: v + lax.stop_gradient(fqx - v)  # straight through the quantizer
    want = jax.grad(lambda x: jnp.sum(lax.ragged_dot(fq(x), wq.dequantize(), sizes) ** 2))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    y = quantized_ragged_dot(x.astype(jnp.bfloat16), wq, sizes, lhs_spec=PT)
    assert y.dtype == jnp.bfloat16


def test_bad_inputs_are_refused_by_name():
    x, w, sizes = _data()
    with pytest.raises(TypeError, match=r"rhs must be a qjax\.QArray"):
        quantized_ragged_dot(x, w, sizes)
    grouped = qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(0, 2), group_axis=1, group_size=16))
    with pytest.raises(ValueError, match="vary along K"):
        quantized_ragged_dot(x, grouped, sizes)
    wq = qjax.quantize(w, PER_EXPERT)
    with pytest.raises(ValueError, match=r"lhs must be \(M, 32\)"):
        quantized_ragged_dot(x[:, :5], wq, sizes)
    with pytest.raises(ValueError, match=r"group_sizes must be \(4,\) integers"):
        quantized_ragged_dot(x, wq, sizes[:3])
    with pytest.raises(ValueError, match="varies its scale along K"):
        quantized_ragged_dot(x, wq, sizes, lhs_spec=qjax.QuantSpec(qjax.int8, channel_axes=(1,)))


def moe(params, x, sizes):
    return lax.ragged_dot(x, params["experts"], sizes)


def test_quantized_fake_quantized_and_calibrate_on_an_expert_weight(integer_ops):
    x, w, sizes = _data(seed=2)
    params = {"experts": w}
    policy = qjax.Policy([qjax.Rule("experts", weight=PER_EXPERT, act=PT)])
    qp = qjax.quantize_params(params, policy)
    served = qjax.quantized(moe, policy)(qp, x, sizes)
    ref = _reference(_per_row_fq(x), qp["experts"].dequantize(), sizes)
    np.testing.assert_allclose(np.asarray(served, np.float64), ref, rtol=1e-5, atol=1e-5)
    assert integer_ops(jax.make_jaxpr(qjax.quantized(moe, policy))(qp, x, sizes), "ragged_dot_general") == 1
    np.testing.assert_allclose(
        qjax.fake_quantized(moe, policy)(params, x, sizes), served, rtol=1e-5, atol=1e-5
    )
    (op,) = qjax.dispatch_report(moe, policy)(qp, x, sizes)
    assert op.path == "experts" and op.runs == ("xla:ragged_dot_general int8xint8 -> int32",)
    # static per-tensor activation scale: calibrated, stored, served, trained alike
    static = qjax.Policy([qjax.Rule("experts", weight=PER_EXPERT, act=qjax.QuantSpec(qjax.int8))])
    stats = qjax.calibrate(moe, static, params, [(x, sizes)])
    assert float(stats["experts"].hi) == pytest.approx(float(jnp.abs(x).max()))
    qp2 = qjax.quantize_params(params, static, act_stats=stats)
    y2 = qjax.quantized(moe, static)(qp2, x, sizes)
    s = float(jnp.abs(x).max()) / 127
    ref2 = _reference(
        np.clip(np.round(np.asarray(x, np.float64) / s), -127, 127) * s, qp2["experts"].dequantize(), sizes
    )
    np.testing.assert_allclose(np.asarray(y2, np.float64), ref2, rtol=1e-5, atol=1e-5)
    y2_fake = qjax.fake_quantized(moe, static, act_stats=stats)(params, x, sizes)
    np.testing.assert_allclose(y2_fake, y2, rtol=1e-5, atol=1e-5)


def test_a_weight_grouped_along_k_runs_dequantized_with_float_activations():
    """As other ops whose scales cannot follow: served on the dequantized weight, and QAT
    then leaves the activation float too, so training and serving agree."""
    x, w, sizes = _data(seed=3)
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(0, 2), group_axis=1, group_size=16)
    policy = qjax.Policy([qjax.Rule("experts", weight=spec, act=PT)])
    qp = qjax.quantize_params({"experts": w}, policy)
    with pytest.warns(UserWarning, match="no matmul/conv reads it"):
        served = qjax.quantized(moe, policy)(qp, x, sizes)
    np.testing.assert_allclose(served, _reference(x, qp["experts"].dequantize(), sizes), rtol=1e-5, atol=1e-5)
    fake = qjax.fake_quantized(moe, policy)({"experts": w}, x, sizes)
    np.testing.assert_allclose(fake, served, rtol=1e-5, atol=1e-5)


def test_a_transposed_stored_weight_trains_as_it_is_served():
    """Stored ``(G, N, K)``, read through ``swapaxes``: ``fake_quantized`` decides on the
    weight as the op reads it, as ``quantized`` does (found by review: it checked the
    stored spec against the read shape and left the activation float)."""
    x, w, sizes = _data(seed=4)
    params = {"experts": jnp.swapaxes(w, 1, 2)}
    f = lambda p, x, s: lax.ragged_dot(x, jnp.swapaxes(p["experts"], 1, 2), s)
    policy = qjax.Policy(
        [qjax.Rule("experts", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, 1)), act=PT)]
    )
    served = qjax.quantized(f, policy)(qjax.quantize_params(params, policy), x, sizes)
    fake = qjax.fake_quantized(f, policy)(params, x, sizes)
    wq = jnp.swapaxes(qjax.quantize(params["experts"], policy.rules[0].weight).dequantize(), 1, 2)
    ref = _reference(_per_row_fq(x), wq, sizes)
    np.testing.assert_allclose(np.asarray(served, np.float64), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fake, np.float64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [1e4, np.nan])
def test_rows_past_the_groups_do_not_set_a_shared_scale(pad):
    """Padding rows (``sum(group_sizes) < M``) give zeros in ``lax.ragged_dot``; they must
    not set a per-tensor activation scale or a calibrated range (found by review)."""
    x, w, sizes = _data(extra=4, seed=5)
    real = int(np.sum(np.asarray(sizes)))
    x = x.at[real:].set(pad)
    params = {"experts": w}
    tensor = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy([qjax.Rule("experts", weight=PER_EXPERT, act=tensor)])
    qp = qjax.quantize_params(params, policy)
    s = float(jnp.abs(x[:real]).max()) / 127
    xq = np.clip(np.round(np.asarray(x, np.float64) / s), -127, 127) * s
    ref = _reference(
        np.where(np.arange(x.shape[0])[:, None] < real, xq, 0.0), qp["experts"].dequantize(), sizes
    )
    for y in (qjax.quantized(moe, policy)(qp, x, sizes), qjax.fake_quantized(moe, policy)(params, x, sizes)):
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
    stats = qjax.calibrate(moe, policy, params, [(x, sizes)])
    assert float(stats["experts"].hi) == pytest.approx(float(jnp.abs(x[:real]).max()))
    y = quantized_ragged_dot(x, qp["experts"], sizes, lhs_spec=PT)
    assert not np.any(np.asarray(y)[real:])  # per row: padding rows are zeros, not NaN


def test_int8_training_rules_and_user_derivatives_train_as_served(integer_ops):
    """A ``grad=`` rule trains the forward that is served (STE backward; found by review:
    the activation stayed float in training only), and a ragged dot inside a user's
    ``custom_vjp`` is quantized like a matmul there."""
    x, w, sizes = _data(seed=6)
    params = {"experts": w}
    grad = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    policy = qjax.Policy([qjax.Rule("experts", weight=PER_EXPERT, act=PT, grad=grad)])
    served = qjax.quantized(moe, policy)(qjax.quantize_params(params, policy), x, sizes)
    np.testing.assert_allclose(
        qjax.fake_quantized(moe, policy)(params, x, sizes), served, rtol=1e-5, atol=1e-5
    )

    @jax.custom_vjp
    def grouped(x, w, s):
        return lax.ragged_dot(x, w, s)

    grouped.defvjp(lambda x, w, s: (grouped(x, w, s), (x, w, s)), lambda r, g: (None, None, None))
    f = lambda p, x, s: grouped(x, p["experts"], s)
    plain = qjax.Policy([qjax.Rule("experts", weight=PER_EXPERT, act=PT)])
    qp = qjax.quantize_params(params, plain)
    assert integer_ops(jax.make_jaxpr(qjax.quantized(f, plain))(qp, x, sizes), "ragged_dot_general") == 1


def test_fake_quantized_errors_name_the_leaf():
    x, w, sizes = _data()
    lsq = qjax.Policy([qjax.Rule("exp.*", weight=PER_EXPERT, act=qjax.QuantSpec(qjax.int8, ste="lsq"))])
    with pytest.raises(ValueError, match=r"leaf 'experts'.*ste='lsq' is not supported for activations"):
        qjax.fake_quantized(moe, lsq)({"experts": w}, x, sizes)
