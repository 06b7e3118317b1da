"""``qjax.OpRule``: matmuls between two activations (attention's QKᵀ and PV, a KV cache),
selected by name scope, run as integer matmuls in ``quantized`` and fake-quantized in
``fake_quantized``; checked against a float64 integer reference."""

import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qjax

PT = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
QK, PV = "attn/bqd,bkd->bqk", "attn/bqk,bkd->bqd"


def attention(params, x):
    """Single-head attention; the two activation matmuls run under the scope ``attn``."""
    q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
    with jax.named_scope("attn"):
        s = jnp.einsum("bqd,bkd->bqk", q, k) / math.sqrt(q.shape[-1])
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)


def _params_and_x(seed=0, b=2, t=7, d=16):
    ks = jax.random.split(jax.random.key(seed), 4)
    params = {n: jax.random.normal(k, (d, d)) / math.sqrt(d) for n, k in zip(("wq", "wk", "wv"), ks)}
    return params, jax.random.normal(ks[3], (b, t, d))


def _fq64(a, axis):
    """Symmetric int8 absmax round-to-nearest-even along ``axis`` (the summed one), float64."""
    scale = np.max(np.abs(a), axis=axis, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(a / scale), -127, 127), scale


def _reference(params, x):
    """Float64: q, k, softmax(QKᵀ) and v quantized per token (one scale per index of every
    axis not summed), integer products exact in float64."""
    p = {n: np.asarray(w, np.float64) for n, w in params.items()}
    x = np.asarray(x, np.float64)
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    qi, qs = _fq64(q, -1)
    ki, ks = _fq64(k, -1)
    s = np.einsum("bqd,bkd->bqk", qi, ki) * qs * np.swapaxes(ks, 1, 2) / math.sqrt(q.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    prob = e / e.sum(-1, keepdims=True)
    pi, ps = _fq64(prob, -1)
    vi, vs = _fq64(v, 1)  # v (b, k, d) summed over k: one scale per (b, d)
    return np.einsum("bqk,bkd->bqd", pi, vi) * ps * vs


def test_attention_matmuls_run_on_int8_and_match_a_float64_reference(integer_ops):
    params, x = _params_and_x()
    policy = qjax.Policy([qjax.OpRule(QK, lhs=PT, rhs=PT), qjax.OpRule(PV, lhs=PT, rhs=PT)])
    f = jax.jit(qjax.quantized(attention, policy))
    y = np.asarray(f(params, x), np.float64)
    ref = _reference(params, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    # and it is not the float result
    assert np.abs(np.asarray(attention(params, x)) - ref).max() > 1e-3
    assert integer_ops(jax.make_jaxpr(qjax.quantized(attention, policy))(params, x)) == 2
    # the weights' matmuls are not matched (they read params leaves): still float
    only = qjax.Policy([qjax.OpRule(r".*", lhs=PT, rhs=PT)])
    assert integer_ops(jax.make_jaxpr(qjax.quantized(attention, only))(params, x)) == 2


def test_fake_quantized_matches_quantized_and_passes_straight_through_gradients():
    params, x = _params_and_x(1)
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=PT, rhs=PT)])
    served = qjax.quantized(attention, policy)(params, x)
    fake = qjax.fake_quantized(attention, policy)(params, x)
    np.testing.assert_allclose(fake, served, rtol=1e-5, atol=1e-6)

    def ste(a, axis):  # absmax fake quantization with an identity gradient
        scale = jnp.max(jnp.abs(a), axis=axis, keepdims=True) / 127.0
        return a + lax.stop_gradient(jnp.clip(jnp.round(a / scale), -127, 127) * scale - a)

    def by_hand(params, x):
        q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
        s = jnp.einsum("bqd,bkd->bqk", ste(q, -1), ste(k, -1)) / math.sqrt(q.shape[-1])
        return jnp.einsum("bqk,bkd->bqd", ste(jax.nn.softmax(s, axis=-1), -1), ste(v, 1))

    loss = lambda f: lambda p: jnp.sum(f(p, x) ** 2)
    got = jax.grad(loss(qjax.fake_quantized(attention, policy)))(params)
    want = jax.grad(loss(by_hand))(params)
    for n in params:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-6)
        assert np.all(np.isfinite(got[n])) and np.abs(got[n]).max() > 0


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="layers")(x, None)[0]


def test_flax_attention_in_a_scan_over_layers_is_matched_by_its_module_scope(integer_ops):
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    model = Stack()
    params = model.init(jax.random.key(0), x)
    policy = qjax.Policy([qjax.OpRule(r".*attn/.*->.*", lhs=PT, rhs=PT)])
    jaxpr = jax.make_jaxpr(qjax.quantized(model.apply, policy))(params, x)
    assert integer_ops(jaxpr) == 2  # QKᵀ and PV, in the scan body
    y = jax.jit(qjax.quantized(model.apply, policy))(params, x)
    y0 = model.apply(params, x)
    err = float(jnp.abs(y - y0).max())
    assert 0 < err < 0.05 * float(jnp.abs(y0).max())
    fake = qjax.fake_quantized(model.apply, policy)(params, x)
    np.testing.assert_allclose(fake, y, rtol=1e-4, atol=1e-5)
    ops = qjax.dispatch_report(model.apply, policy)(params, x)
    acts = [op for op in ops if "attn/" in op.path and "->" in op.path]
    assert len(acts) == 2 and all(op.quantized and "int8xint8 -> int32" in op.runs[0] for op in acts)


def test_a_kv_cache_read_in_a_decode_loop_is_quantized(integer_ops):
    """A cache passed as an argument (an activation) and read inside ``fori_loop``."""
    d, steps = 16, 4
    params, _ = _params_and_x(3, d=d)
    cache = jax.random.normal(jax.random.key(4), (1, 12, d))

    def decode(params, cache, x):
        def step(i, h):
            with jax.named_scope("kv"):
                s = jnp.einsum("bd,bkd->bk", h @ params["wq"], cache)
                return jnp.tanh(jnp.einsum("bk,bkd->bd", jax.nn.softmax(s, -1), cache))

        return lax.fori_loop(0, steps, step, x)

    x = jax.random.normal(jax.random.key(5), (1, d))
    policy = qjax.Policy([qjax.OpRule(r"kv/.*", lhs=PT, rhs=PT)])
    jaxpr = jax.make_jaxpr(qjax.quantized(decode, policy))(params, cache, x)
    assert integer_ops(jaxpr) == 2
    y = qjax.quantized(decode, policy)(params, cache, x)
    y0 = decode(params, cache, x)
    assert 0 < float(jnp.abs(y - y0).max()) < 0.05


def test_bfloat16_activations_keep_their_dtype():
    params, x = _params_and_x()
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=PT, rhs=PT)])
    y = qjax.quantized(attention, policy)(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = _reference(params, x.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=0.05 * np.abs(ref).max())


def test_one_side_only_and_a_weight_rule_beside_it(integer_ops):
    params, x = _params_and_x()
    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(r"w.", weight=w8, act=PT), qjax.OpRule(QK, lhs=PT)])
    jaxpr = jax.make_jaxpr(qjax.quantized(attention, policy))(params, x)
    assert integer_ops(jaxpr) == 3  # the three projections; QKᵀ has a float right-hand side
    y = qjax.quantized(attention, policy)(params, x)
    assert np.all(np.isfinite(np.asarray(y)))


def test_an_op_rule_that_matches_nothing_names_the_scopes_it_saw():
    params, x = _params_and_x()
    policy = qjax.Policy([qjax.OpRule(r"atn/.*", lhs=PT, rhs=PT)])
    for transform in (qjax.quantized, qjax.fake_quantized):
        with pytest.raises(ValueError, match=r"op rule patterns \['atn/\.\*'\] matched no matmul") as e:
            transform(attention, policy)(params, x)
        assert repr(QK) in str(e.value) and repr(PV) in str(e.value)
    # a rule shadowed by an earlier one counts as unused too
    shadowed = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=PT), qjax.OpRule(QK, rhs=PT)])
    with pytest.raises(ValueError, match="matched no matmul"):
        qjax.quantized(attention, shadowed)(params, x)


def test_a_spec_that_does_not_fit_the_op_names_the_scope_and_rule():
    params, x = _params_and_x()
    grouped = qjax.QuantSpec(qjax.int8, channel_axes=(0, 1), group_axis=2, group_size=5)  # 16 % 5
    policy = qjax.Policy([qjax.OpRule(QK, lhs=grouped)])
    with pytest.raises(ValueError, match=r"matmul at name scope 'attn/bqd,bkd->bqk' \(op rule 0"):
        qjax.quantized(attention, policy)(params, x)


def test_op_rule_validation_and_policy_round_trip():
    with pytest.raises(ValueError, match="give lhs= and/or rhs="):
        qjax.OpRule(QK)
    with pytest.raises(TypeError, match=r"lhs must be a qjax\.QuantSpec"):
        qjax.OpRule(QK, lhs="int8")
    with pytest.raises(ValueError, match="ste='lsq'"):
        qjax.OpRule(QK, rhs=qjax.QuantSpec(qjax.int8, ste="lsq"))
    with pytest.raises(ValueError, match="attn"):
        qjax.OpRule("attn/(", lhs=PT)  # not a regular expression
    with pytest.raises(TypeError, match=r"qjax\.Rule or qjax\.OpRule"):
        qjax.Policy([("attn/.*", PT)])
    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    policy = qjax.Policy(
        [qjax.Rule(r".*", weight=w8), qjax.OpRule(QK, lhs=PT, rhs=PT), qjax.OpRule(PV, rhs=PT)]
    )
    assert [type(r) for r in policy.rules] == [qjax.Rule]
    assert [r.pattern for r in policy.op_rules] == [QK, PV]
    back = qjax.Policy.from_json(policy.to_json())
    assert back == policy and hash(back) == hash(policy)
    assert back != qjax.Policy(policy.rules)  # op rules count
    assert "OpRule" in repr(policy)
    assert policy.op_match(PV).value.lhs is None
    assert policy.unused_op_rules([QK]) == [PV]
    with pytest.raises(ValueError, match="policy op rule 0 is malformed"):
        qjax.Policy.from_json('{"rules": [], "op_rules": [{"pattern": "x"}]}')


def test_calibration_runs_a_policy_with_op_rules():
    """Calibration collects the weights' activation ranges; matmuls between activations are
    quantized dynamically, so it runs them as they are (and still checks their patterns)."""
    params, x = _params_and_x()
    policy = qjax.Policy(
        [
            qjax.Rule(
                r"w.", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=qjax.QuantSpec(qjax.int8)
            ),
            qjax.OpRule(QK, lhs=PT, rhs=PT),
        ]
    )
    stats = qjax.calibrate(attention, policy, params, [(x,)])
    assert set(stats) == {"wq", "wk", "wv"}
    with pytest.raises(ValueError, match="matched no matmul"):
        qjax.calibrate(attention, qjax.Policy([qjax.OpRule("nope", lhs=PT)]), params, [(x,)])


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)


class RematModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(RematBlock)(name=f"block_{i}")(x)
        return x


def test_scopes_of_inlined_bodies_are_joined_to_the_enclosing_ones(integer_ops):
    """A body the walker inlines (``nn.remat``, a jitted helper) records its name stack
    relative to its call: the rule sees the whole path, so the same helper called under
    two scopes is told apart (found by review: an exclusion pattern matched both)."""
    x = jax.random.normal(jax.random.key(1), (1, 4, 8))
    model = RematModel()
    params = model.init(jax.random.key(0), x)
    only_block_1 = qjax.Policy([qjax.OpRule(r"RematModel/block_1/attn/.*->.*", lhs=PT, rhs=PT)])
    assert integer_ops(jax.make_jaxpr(qjax.quantized(model.apply, only_block_1))(params, x)) == 2

    @jax.jit
    def attend(q, k):
        with jax.named_scope("attn"):
            return jnp.einsum("qd,kd->qk", q, k)

    def f(params, x):
        with jax.named_scope("encoder"):
            a = attend(x, x)
        with jax.named_scope("decoder"):
            return a, attend(x, x)

    x2 = jax.random.normal(jax.random.key(2), (4, 8))
    not_decoder = qjax.Policy([qjax.OpRule(r"(?!decoder/).*attn/.*", lhs=PT, rhs=PT)])
    enc, dec = qjax.quantized(f, not_decoder)({}, x2)
    np.testing.assert_array_equal(dec, x2 @ x2.T)  # the decoder's stays float
    assert float(jnp.abs(enc - x2 @ x2.T).max()) > 1e-4
    with pytest.raises(ValueError, match=r"\['decoder/attn/qd,kd->qk', 'encoder/attn/qd,kd->qk'\]"):
        qjax.quantized(f, qjax.Policy([qjax.OpRule("attn/.*", lhs=PT)]))({}, x2)


def test_bfloat16_scales_are_served_as_trained():
    """``scale_dtype="bfloat16"`` rounds the dynamic scales in ``quantized`` as in
    ``fake_quantized`` (found by review: the lean dynamic quantizer ignored it)."""
    params, x = _params_and_x()
    spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, scale_dtype="bfloat16")
    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=spec, rhs=spec)])
    served = qjax.quantized(attention, policy)(params, x)
    np.testing.assert_allclose(
        served, qjax.fake_quantized(attention, policy)(params, x), rtol=1e-5, atol=1e-6
    )
    f32 = qjax.quantized(attention, qjax.Policy([qjax.OpRule(r"attn/.*", lhs=PT, rhs=PT)]))(params, x)
    assert float(jnp.abs(served - f32).max()) > 1e-5


def test_an_empty_key_sequence_and_integer_operands():
    """A zero-length contracted axis gives zeros, as in float (found by review: the
    dynamic absmax crashed); integer matmuls in a matched scope run as they are."""

    def f(params, q, k):
        with jax.named_scope("attn"):
            return jnp.einsum("qd,kd->qk", q, k), jnp.einsum(
                "qd,kd->qk", q.astype(jnp.int32), k.astype(jnp.int32)
            )

    policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=PT, rhs=PT)])
    y, yi = qjax.quantized(f, policy)({}, jnp.ones((3, 0)), jnp.ones((5, 0)))
    assert y.shape == (3, 5) and not np.any(np.asarray(y))
    q = jnp.arange(6.0).reshape(2, 3)
    _, yi = qjax.quantized(f, policy)({}, q, q)
    assert yi.dtype == jnp.int32
    np.testing.assert_array_equal(yi, np.asarray(q, np.int64) @ np.asarray(q, np.int64).T)
