"""Static (calibrated) scales for the matmuls between two activations that an ``OpRule``
quantizes: ``calibrate`` records them, ``quantized(op_stats=)`` and
``fake_quantized(act_stats=)`` use them; against a float64 integer reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qjax

A8 = qjax.QuantSpec(qjax.int8)
W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
R = np.random.default_rng(0)
P = {
    "wq": jnp.asarray(R.normal(size=(8, 16)), jnp.float32),
    "wk": jnp.asarray(R.normal(size=(8, 16)), jnp.float32),
}
X = jnp.asarray(R.normal(size=(5, 8)), jnp.float32)
CALIB = [0.5 * X, 0.7 * X]  # narrower than X: the static scales clip it


def scores(p, x):
    q, k = x @ p["wq"], x @ p["wk"]
    with jax.named_scope("attn"):
        return jnp.einsum("sd,td->st", q, k)


def _fq(v, lo, hi, symmetric):
    """float64 int8 fake quantization by a calibrated range (as scale_from_range maps it)."""
    if symmetric:
        s = max(abs(lo), abs(hi)) / 127
        return np.clip(np.round(v / s), -128, 127) * s
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / 255
    zp = np.clip(-128 - np.round(lo / s), -128, 127)
    return (np.clip(np.round(v / s) + zp, -128, 127) - zp) * s


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero_point"])
def test_static_operand_scales_against_a_float64_reference(symmetric):
    spec = qjax.QuantSpec(qjax.int8, symmetric=symmetric)
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=spec, rhs=A8)])
    stats = qjax.calibrate(scores, policy, P, CALIB)
    assert sorted(stats) == ["op:attn/sd,td->st:lhs", "op:attn/sd,td->st:rhs"]
    p64 = {k: np.asarray(v, np.float64) for k, v in P.items()}
    qs = [np.asarray(c, np.float64) @ p64["wq"] for c in CALIB]
    ks = [np.asarray(c, np.float64) @ p64["wk"] for c in CALIB]
    lo_q = min(v.min() for v in qs) if not symmetric else -max(np.abs(v).max() for v in qs)
    hi_q = max(v.max() for v in qs) if not symmetric else max(np.abs(v).max() for v in qs)
    a_k = max(np.abs(v).max() for v in ks)
    assert float(stats["op:attn/sd,td->st:lhs"].hi) == pytest.approx(hi_q, rel=1e-6)
    x64 = np.asarray(X, np.float64)
    want = _fq(x64 @ p64["wq"], lo_q, hi_q, symmetric) @ _fq(x64 @ p64["wk"], -a_k, a_k, True).T
    y = jax.jit(qjax.quantized(scores, policy, op_stats=stats))(P, X)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    fake = qjax.fake_quantized(scores, policy, act_stats=stats)(P, X)
    np.testing.assert_allclose(fake, y, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    dynamic = qjax.quantized(scores, policy)(P, X)
    assert float(jnp.abs(dynamic - y).max()) > 1e-2 * np.abs(want).max()  # the static scales clip X


def test_weight_rules_and_op_rules_share_one_calibration():
    """``quantize_params`` takes the leaf entries (and skips the op ones), ``quantized``
    the op entries."""
    policy = qjax.Policy([qjax.Rule("w.", weight=W8, act=A8), qjax.OpRule(r"attn/.*", lhs=A8, rhs=A8)])
    stats = qjax.calibrate(scores, policy, P, CALIB)
    assert {"wq", "wk"} < set(stats) and len(stats) == 4
    qparams = qjax.quantize_params(P, policy, act_stats=stats)
    y = qjax.quantized(scores, policy, op_stats=stats)(qparams, X)
    fake = qjax.fake_quantized(scores, policy, act_stats=stats)(P, X)
    np.testing.assert_allclose(y, fake, rtol=1e-4, atol=1e-4 * float(jnp.abs(y).max()))


def test_an_op_in_a_scan_stack_pools_its_layers():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            q, k = nn.Dense(8, name="q")(h), nn.Dense(8, name="k")(h)
            with jax.named_scope("attn"):
                a = jnp.einsum("sd,td->st", q, k)
            return jnp.tanh(a @ h), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    x = jax.random.normal(jax.random.key(0), (6, 8))
    v = Stack().init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.OpRule(r".*attn/.*", lhs=A8, rhs=A8)])
    stats = qjax.calibrate(Stack().apply, policy, v, [x])
    assert len(stats) == 2 and all(s.hi.shape == () for s in stats.values())
    y = qjax.quantized(Stack().apply, policy, op_stats=stats)(v, x)
    fake = qjax.fake_quantized(Stack().apply, policy, act_stats=stats)(v, x)
    np.testing.assert_allclose(y, fake, rtol=1e-4, atol=1e-4)
    _, moved = qjax.fake_quantized(Stack().apply, policy, act_stats_momentum=0.5)(v, stats, 2 * x)
    assert jax.tree.structure(moved) == jax.tree.structure(stats)  # pooled again: no retrace
    assert all(float(moved[k].hi) > float(stats[k].hi) for k in stats)


def test_dynamic_specs_record_nothing_and_misuse_is_refused():
    per_token = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    dynamic = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=per_token, rhs=A8)])
    stats = qjax.calibrate(scores, dynamic, P, CALIB)
    assert list(stats) == ["op:attn/sd,td->st:rhs"]  # the per-token side has no static range
    static = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=A8, rhs=A8)])
    full = qjax.calibrate(scores, static, P, CALIB)
    with pytest.raises(ValueError, match="not per-tensor"):
        qjax.quantized(scores, dynamic, op_stats=full)(P, X)
    with pytest.raises(ValueError, match="match no matmul"):
        qjax.quantized(scores, static, op_stats={**full, "op:mlp/x:lhs": full["op:attn/sd,td->st:lhs"]})(P, X)


def test_running_averages_move_op_ranges_too():
    """``act_stats_momentum``: an op entry moves toward the operand's batch range like a
    weight op's, and the forward quantizes with the moved range."""
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=A8, rhs=A8)])
    stats = qjax.calibrate(scores, policy, P, CALIB)
    y, new = jax.jit(qjax.fake_quantized(scores, policy, act_stats_momentum=0.75))(P, stats, X)
    q = np.asarray(X, np.float64) @ np.asarray(P["wq"], np.float64)
    key = "op:attn/sd,td->st:lhs"
    assert float(new[key].hi) == pytest.approx(0.75 * float(stats[key].hi) + 0.25 * np.abs(q).max(), rel=1e-6)
    fixed = qjax.fake_quantized(scores, policy, act_stats=new)(P, X)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6 * float(jnp.abs(y).max()))


def test_running_stats_missing_an_entry_warn_by_name():
    """A running state without an op's (or a weight's) entry leaves that operand dynamic:
    said by name, not silently."""
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=A8, rhs=A8)])
    stats = qjax.calibrate(scores, policy, P, CALIB)
    partial = {k: v for k, v in stats.items() if not k.endswith(":rhs")}
    with pytest.warns(UserWarning, match=r"no entry for \['op:attn/sd,td->st:rhs'\]"):
        qjax.fake_quantized(scores, policy, act_stats_momentum=0.75)(P, partial, X)


def test_flax_attention_pv_lowers_with_the_value_as_lhs():
    """The documented operand order: Flax's PV einsum lowers to ``dot_general(value, probs)``,
    so the ``:lhs`` entry is the value's range and ``:rhs`` the probabilities' (at most 1)."""
    mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    v = mha.init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.OpRule(r".*attn/\.\.\.hqk,.*", lhs=A8, rhs=A8)])  # PV only
    stats = qjax.calibrate(lambda p, x: mha.apply(p, x), policy, v, [x])
    (lhs,) = [s for k, s in stats.items() if k.endswith(":lhs")]
    (rhs,) = [s for k, s in stats.items() if k.endswith(":rhs")]
    value = nn.DenseGeneral((2, 4)).apply({"params": v["params"]["value"]}, x)
    assert float(lhs.hi) == pytest.approx(float(jnp.abs(value).max()), rel=1e-5)
    assert float(rhs.hi) <= 1.0


def test_review_edge_cases():
    """A PER_TOKEN spec whose operand has every axis contracted records nothing; an infinite
    calibrated range, op stats of the wrong type and stats for a float operand are refused."""
    per_token = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    dot = lambda p, x: jnp.einsum("d,d->", x @ p["wq"], x @ p["wk"])
    assert (
        qjax.calibrate(dot, qjax.Policy([qjax.OpRule(r".*", lhs=per_token, rhs=per_token)]), P, [X[0]]) == {}
    )
    static = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=A8, rhs=A8)])
    inf_stats = qjax.calibrate(scores, static, P, [X.at[0, 0].set(jnp.inf)])
    with pytest.raises(ValueError, match="infinite"):
        qjax.quantized(scores, static, op_stats=inf_stats)(P, X)
    with pytest.raises(TypeError, match="op_stats must be the dict"):
        qjax.quantized(scores, static, op_stats=[1])
    stats = qjax.calibrate(scores, static, P, CALIB)
    with pytest.raises(TypeError, match="must be ActStats"):
        qjax.quantized(scores, static, op_stats={k: (s.lo, s.hi) for k, s in stats.items()})
    lhs_only = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=A8)])
    with pytest.raises(ValueError, match="keeps that operand float"):
        qjax.quantized(scores, lhs_only, op_stats=stats)(P, X)
