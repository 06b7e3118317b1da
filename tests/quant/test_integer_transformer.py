"""Integer-only transformers (I-BERT's scope): GELU and other activations, softmax,
LayerNorm / RMSNorm and attention's activation matmuls run on integers. Each is checked
against float64 applied to the same integer inputs, against ``qjax.quantized`` (the same
quantization rescaled in float), and for integer arithmetic between the input's
quantization and the output's dequantization."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

import qjax

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
W8_HEADS = qjax.QuantSpec(qjax.int8, channel_axes=(-2, -1))  # q/k/v kernels (D, H, hd)
A8 = qjax.QuantSpec(qjax.int8)
P8 = qjax.QuantSpec(qjax.uint8)  # attention probabilities: [0, 1]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _setup(f, params, x, policy, calibrate_ops=False):
    stats = qjax.calibrate(f, policy, params, [(x,)])
    qp = qjax.quantize_params(params, policy, act_stats=stats)
    return qp, (stats if calibrate_ops else None)


_ACTIVATIONS = {
    "gelu_tanh": (jax.nn.gelu, lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))),
    "gelu_erf": (lambda h: jax.nn.gelu(h, approximate=False), lambda v: 0.5 * v * sp.erfc(-v / np.sqrt(2))),
    "silu": (jax.nn.silu, lambda v: v * sp.expit(v)),
    "tanh": (jnp.tanh, np.tanh),
    "sigmoid": (jax.nn.sigmoid, sp.expit),
    "elu": (jax.nn.elu, lambda v: np.where(v > 0, v, np.expm1(v))),
    "softplus": (jax.nn.softplus, lambda v: np.logaddexp(v, 0)),
}


def _mlp_params():
    return {
        "w": jax.random.normal(jax.random.key(1), (32, 64)) / 4,
        "v": jax.random.normal(jax.random.key(2), (64, 16)) / 8,
    }


@pytest.mark.parametrize("name", list(_ACTIVATIONS))
def test_activations_match_float64_on_the_same_integers(name, integer_program):
    act, reference = _ACTIVATIONS[name]
    x = jax.random.normal(jax.random.key(0), (8, 32))
    params = _mlp_params()
    policy = qjax.Policy([qjax.Rule("(w|v)", weight=W8, act=A8)])
    pre = lambda p, x: x @ p["w"]
    f = lambda p, x: act(x @ p["w"])
    qp, _ = _setup(lambda p, x: f(p, x) @ p["v"], params, x, policy)
    # the integer pre-activations, dequantized exactly; the activation of them in float64
    h = np.asarray(qjax.integer_only(pre, policy, qp)(x), np.float64)
    got = np.asarray(qjax.integer_only(f, policy, qp)(x), np.float64)
    want = reference(h)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)) + 1e-6, name
    # a layer after it: as qjax.quantized serves it (a code may flip at a rounding tie)
    g = lambda p, x: f(p, x) @ p["v"]
    program = qjax.integer_only(g, policy, qp)
    assert _rel(program(x), qjax.quantized(g, policy)(qp, x)) < 3e-3
    integer_program(program, x)


def _logits_program():
    x = jax.random.normal(jax.random.key(3), (6, 32))
    params = _mlp_params()
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    pre = lambda p, x: x @ p["w"]
    qp, _ = _setup(pre, params, x, policy)
    h = np.asarray(qjax.integer_only(pre, policy, qp)(x), np.float64)
    return x, policy, qp, pre, h


def test_softmax_and_layer_norm_match_float64_on_the_same_integers():
    x, policy, qp, pre, h = _logits_program()
    # softmax: exp evaluated within 2^-19, the quotient to 2^-24; rows sum to 1
    probs = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x)), policy, qp)(x)
    e = np.exp(h - h.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), atol=2e-6)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, atol=1e-4)
    # log_softmax: the log of a sum known to be >= exp(0) (the max's own term)
    got = qjax.integer_only(lambda p, x: jax.nn.log_softmax(pre(p, x)), policy, qp)(x)
    z = h - h.max(-1, keepdims=True)
    np.testing.assert_allclose(got, z - np.log(np.exp(z).sum(-1, keepdims=True)), atol=1e-5)
    # LayerNorm (Flax's fast variance), scale and bias per channel
    ln = nn.LayerNorm()
    lv = {"params": {"scale": jnp.linspace(0.5, 1.5, 64), "bias": jnp.linspace(-0.2, 0.2, 64)}}
    got = qjax.integer_only(lambda p, x: ln.apply(lv, pre(p, x)), policy, qp)(x)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    want = (h - mu) / np.sqrt(var + 1e-6) * np.linspace(0.5, 1.5, 64) + np.linspace(-0.2, 0.2, 64)
    np.testing.assert_allclose(got, want, atol=2e-3 * np.max(np.abs(want)))
    # RMSNorm
    rms = nn.RMSNorm()
    rv = {"params": {"scale": jnp.ones(64)}}
    got = qjax.integer_only(lambda p, x: rms.apply(rv, pre(p, x)), policy, qp)(x)
    want = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, atol=2e-3 * np.max(np.abs(want)))


class _Block(nn.Module):
    """A BERT-style encoder block."""

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(x, x, mask=mask)
        x = nn.LayerNorm(name="ln1")(x + h)
        h = nn.Dense(32, name="down")(nn.gelu(nn.Dense(128, name="up")(x), approximate=False))
        return nn.LayerNorm(name="ln2")(x + h)


_BLOCK_POLICY = qjax.Policy(
    [
        qjax.Rule(r".*attn/(query|key|value)/kernel", weight=W8_HEADS, act=A8),
        qjax.Rule(r".*(attn/out|up|down)/kernel", weight=W8, act=A8),
        qjax.OpRule(r".*attn/.*qhd,.*khd->.*", lhs=A8, rhs=A8),  # QKᵀ
        qjax.OpRule(r".*attn/.*hqk,.*khd->.*", lhs=A8, rhs=P8),  # PV: (value, probs)
    ]
)


@pytest.mark.parametrize("causal", [False])  # causal attention: the scanned Llama test (test_integer_scan.py)
def test_encoder_block_runs_integer_only(causal, integer_program):
    net = _Block()
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    variables = net.init(jax.random.key(1), x)
    mask = nn.make_causal_mask(jnp.ones((2, 16))) if causal else None
    f = lambda v, x: net.apply(v, x, mask=mask)
    stats = qjax.calibrate(f, _BLOCK_POLICY, variables, [(x,)])
    qp = qjax.quantize_params(variables, _BLOCK_POLICY, act_stats=stats)
    program = qjax.integer_only(f, _BLOCK_POLICY, qp, op_stats=stats, calibration=[(x,)])
    got = program(x)
    served = qjax.quantized(f, _BLOCK_POLICY, op_stats=stats)(qp, x)
    assert _rel(got, served) < 5e-3
    assert _rel(got, f(variables, x)) < 3e-2
    integer_program(program, x)
    # the second LayerNorm reads a sum of the first one's products: its static range
    # would leave x² no bits, so without measured ranges it is refused, not wrong
    with pytest.raises(ValueError, match="calibration="):
        qjax.integer_only(f, _BLOCK_POLICY, qp, op_stats=stats)(x)


def test_refusals_name_what_is_missing():
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    attn = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")
    variables = attn.init(jax.random.key(1), x, x)
    f = lambda v, x: attn.apply(v, x, x)
    weight_rules = [
        qjax.Rule(".*(query|key|value)/kernel", weight=W8_HEADS, act=A8),
        qjax.Rule(".*out/kernel", weight=W8, act=A8),
    ]
    weights_only = qjax.Policy(weight_rules)
    stats = qjax.calibrate(f, weights_only, variables, [(x,)])
    qp = qjax.quantize_params(variables, weights_only, act_stats=stats)
    with pytest.raises(ValueError, match="no OpRule matches its name stack"):
        qjax.integer_only(f, weights_only, qp)(x)
    policy = qjax.Policy([*weight_rules, qjax.OpRule(".*attn/.*", lhs=A8, rhs=A8)])
    with pytest.raises(ValueError, match=r"lhs of the matmul at .* has no static scale.*op_stats="):
        qjax.integer_only(f, policy, qp)(x)
    per_token = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    dynamic = qjax.Policy([*weight_rules, qjax.OpRule(".*attn/.*", lhs=per_token, rhs=A8)])
    with pytest.raises(ValueError, match="one static scale"):
        qjax.integer_only(f, dynamic, qp)(x)
    stats = qjax.calibrate(f, policy, variables, [(x,)])
    extra = {**stats, "op:nowhere:lhs": stats[next(k for k in stats if k.startswith("op:"))]}
    with pytest.raises(ValueError, match="op:nowhere:lhs"):
        qjax.integer_only(f, policy, qp, op_stats=extra)(x)
    with pytest.raises(ValueError, match="margin"):
        qjax.integer_only(f, policy, qp, margin=0.5)
    with pytest.raises(ValueError, match="no batch"):
        qjax.integer_only(f, policy, qp, calibration=[])


def test_element_wise_refusals():
    x = jax.random.normal(jax.random.key(4), (4, 32))
    params = _mlp_params()
    policy = qjax.Policy([qjax.Rule("(w|v)", weight=W8, act=A8)])
    qp, _ = _setup(lambda p, x: (x @ p["w"]) @ p["v"], params, x, policy)
    cases = {
        # a quotient of two unrelated values has no static range
        "divides by an integer value": lambda p, x: (
            (x @ p["w"]) / (1.0 + jnp.abs(x @ p["w"]).sum(-1, keepdims=True))
        ),
        # a comparison of one value masking another
        "comparison": lambda p, x: jnp.where((x @ p["w"]) > 0, jnp.flip(x @ p["w"], -1), 0.0),
        # the input meets an integer value before any matmul has quantized it
        "no quantized matmul reads directly": lambda p, x: (
            jnp.concatenate([x, x], -1) * 0 + (x[:, :1] + (x @ p["w"])[:, :1])
        ),
        # log of a value that reaches 0
        "not finite": lambda p, x: jnp.log(jax.nn.relu(x @ p["w"])),
        # an exp of a value not known to be <= 0 (no max subtracted): no bits left near 0
        "subtract the max": lambda p, x: jnp.exp(x @ p["w"]) / 64.0,
        # a constant case far too large for the value's integer scale (not a mask's fill)
        "constant too large": lambda p, x: jnp.where(jnp.arange(64) % 2 == 0, (x @ p["w"]) * 1e-6, 100.0),
    }
    for message, f in cases.items():
        with pytest.raises(ValueError, match=message):
            qjax.integer_only(f, policy, qp)(x)
    # ranges measured on another program than the call's (Python branching on a shape)
    branchy = lambda p, x: jnp.tanh(x @ p["w"]) if x.shape[0] > 2 else x @ p["w"]
    with pytest.raises(ValueError, match="program differs"):
        qjax.integer_only(branchy, policy, qp, calibration=[(x,)])(x[:2])


def _softmax64(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("fill", [-1e4, -1e9, float(jnp.finfo(jnp.float32).min), -np.inf])
def test_masked_softmax_additive_or_selected(fill):
    x, policy, qp, pre, h = _logits_program()
    mask = np.arange(64)[None, :] < np.array([64, 40, 10, 1, 64, 64])[:, None]
    want = _softmax64(np.where(mask, h, -np.inf))
    if np.isfinite(fill):  # an additive bias (T5 / Hugging Face style)
        bias = np.where(mask, 0.0, fill).astype(np.float32)
        got = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x) + bias), policy, qp)(x)
        np.testing.assert_allclose(got, want, atol=5e-5)
    got = qjax.integer_only(lambda p, x: jax.nn.softmax(jnp.where(mask, pre(p, x), fill)), policy, qp)(x)
    np.testing.assert_allclose(got, want, atol=5e-5)
    assert np.all(np.asarray(got)[~mask] == 0)  # masked keys get exactly nothing


@pytest.mark.parametrize("traced_mask", [True, False])
def test_softmax_where_argument(traced_mask):
    # jax.nn.softmax(x, where=m) masks x twice (for its max and for exp) and sums
    # where(m, e, 0): both masks are one value, the sum's masked terms are exact zeros
    x, policy, qp, pre, h = _logits_program()
    mask = np.array(jax.random.bernoulli(jax.random.key(5), 0.6, h.shape))
    mask[2] = False  # a row with every key masked: zeros, as in float
    mask[3] = False
    mask[3, 7] = True  # one key left: probability 1
    want = np.zeros(h.shape)
    rows = mask.any(-1)
    want[rows] = np.where(mask[rows], _softmax64(np.where(mask, h, -np.inf)[rows]), 0)
    if traced_mask:
        f = lambda p, x, m: jax.nn.softmax(pre(p, x), where=m)
        got = qjax.integer_only(f, policy, qp)(x, jnp.asarray(mask))
    else:
        got = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x), where=mask), policy, qp)(x)
    np.testing.assert_allclose(got, want, atol=5e-5)
    assert np.all(np.asarray(got)[~mask] == 0) and np.asarray(got)[3, 7] == 1
    # a mask broadcast from (K,) (an attention padding mask), traced, with measured ranges
    f = lambda p, x, m: jax.nn.softmax(pre(p, x), where=m)
    keys = np.asarray(mask[0])
    want_k = np.where(keys, _softmax64(np.where(keys, h, -np.inf)), 0)
    got = qjax.integer_only(f, policy, qp, calibration=[(x, jnp.asarray(keys))])(x, jnp.asarray(keys))
    np.testing.assert_allclose(got, want_k, atol=5e-5)

    # e / sum(e, where=mask) of an e not masked itself is e / s at the masked keys in float,
    # which can exceed 1: refused (it must not come out 0 there)
    def unmasked(p, x):
        z = pre(p, x)
        e = jnp.exp(z - jnp.max(z, -1, keepdims=True))
        return e / jnp.sum(e, -1, keepdims=True, where=mask)

    with pytest.raises(ValueError, match="divides by an integer value"):
        qjax.integer_only(unmasked, policy, qp)(x)
    # attention-sized rows (past the size up to which constants are compared by value)
    wide = {"w": jax.random.normal(jax.random.key(6), (32, 1024)) / 4}
    wide_q = qjax.quantize_params(wide, policy, act_stats=qjax.calibrate(pre, policy, wide, [(x,)]))
    z = np.asarray(qjax.integer_only(pre, policy, wide_q)(x), np.float64)
    keys = np.arange(1024) % 3 != 0
    got = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x), where=keys), policy, wide_q)(x)
    np.testing.assert_allclose(got, np.where(keys, _softmax64(np.where(keys, z, -np.inf)), 0), atol=5e-5)
    # a division by the masked sum of another value still has no integer form
    sig = lambda p, x, sign: jax.nn.sigmoid(sign * pre(p, x))
    g = lambda p, x: sig(p, x, 1) / jnp.sum(jnp.where(mask, sig(p, x, -1), 0), -1, keepdims=True)
    with pytest.raises(ValueError, match="divides by an integer value"):
        qjax.integer_only(g, policy, qp)(x)


def test_bf16_logits_softmax():
    # jnp.sum upcasts bf16: the exp chain is read through a cast by the sum, not by the division
    x, policy, qp, pre, h = _logits_program()
    got = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x).astype(jnp.bfloat16)), policy, qp)(x)
    np.testing.assert_allclose(np.asarray(got, np.float64), _softmax64(h), atol=1e-5)


def test_small_epsilon_and_large_activations_need_measured_ranges():
    x, policy, qp, pre, h = _logits_program()
    x = x * 3
    h = np.asarray(qjax.integer_only(pre, policy, qp)(x), np.float64)
    ln = nn.LayerNorm(epsilon=1e-12, use_scale=False, use_bias=False)  # BERT's epsilon
    f = lambda p, x: ln.apply({}, pre(p, x))
    # rsqrt(var + 1e-12)'s range is 10^6 at var = 0: unmeasured, var ≈ 300 would keep a few codes
    with pytest.raises(ValueError, match=r"rsqrt .* fewer than 14 bits.*calibration="):
        qjax.integer_only(f, policy, qp)(x)
    got = qjax.integer_only(f, policy, qp, calibration=[(x,)])(x)
    want = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12)
    assert _rel(got, want) < 1e-4
    rms = nn.RMSNorm(epsilon=1e-6, use_scale=False)
    big = lambda p, x: rms.apply({}, 300.0 * pre(p, x))  # a residual stream in the hundreds
    got = qjax.integer_only(big, policy, qp, calibration=[(x,)])(x)
    want = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + 1e-6 / 300.0**2)
    assert _rel(got, want) < 1e-4


def test_gelu_after_a_channel_with_tiny_weights():
    # per-channel scales 10^6 apart (a nearly dead or pruned channel): the chain's root meets
    # at a finer power of two of the largest scale, not at the smallest (which saturated all
    # other channels)
    w = np.asarray(jax.random.normal(jax.random.key(1), (32, 64))) / 4
    w[:, 0] *= 1e-6
    params = {"w": jnp.asarray(w), "v": jax.random.normal(jax.random.key(2), (64, 16)) / 8}
    x = jax.random.normal(jax.random.key(0), (8, 32))
    policy = qjax.Policy([qjax.Rule("(w|v)", weight=W8, act=A8)])
    pre = lambda p, x: x @ p["w"]
    f = lambda p, x: jax.nn.gelu(pre(p, x), approximate=False)
    qp, _ = _setup(lambda p, x: f(p, x) @ p["v"], params, x, policy)
    h = np.asarray(qjax.integer_only(pre, policy, qp)(x), np.float64)
    got = qjax.integer_only(f, policy, qp)(x)
    np.testing.assert_allclose(got, 0.5 * h * sp.erfc(-h / np.sqrt(2)), atol=1e-4)


def test_long_rows_keep_their_small_terms_in_the_denominator():
    # a vocabulary's softmax: 32000 terms, most of whose numerators round to 0
    params = {"w": jax.random.normal(jax.random.key(1), (32, 32000)) * 0.5}
    x = jax.random.normal(jax.random.key(0), (3, 32))
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    pre = lambda p, x: x @ p["w"]
    qp, _ = _setup(pre, params, x, policy)
    h = np.asarray(qjax.integer_only(pre, policy, qp)(x), np.float64)
    got = qjax.integer_only(lambda p, x: jax.nn.softmax(pre(p, x)), policy, qp)(x)
    want = _softmax64(h)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.max(got, -1), np.max(want, -1), rtol=1e-4)  # was 1% too high


def test_split_stack_gates_and_a_pre_norm_residual():
    x = jax.random.normal(jax.random.key(0), (4, 32))
    params = {
        "w": jax.random.normal(jax.random.key(1), (32, 64)) / 4,
        "v": jax.random.normal(jax.random.key(2), (32, 32)) / 4,
    }
    policy = qjax.Policy([qjax.Rule("(w|v)", weight=W8, act=A8)])
    glu = lambda p, x: nn.glu(x @ p["w"]) @ p["v"]  # jnp.split
    stacked = lambda p, x: jnp.stack(jnp.split(x @ p["w"], 2, -1), -1).sum(-1) @ p["v"]
    for f in (glu, stacked):
        qp, _ = _setup(f, params, x, policy)
        assert _rel(qjax.integer_only(f, policy, qp)(x), qjax.quantized(f, policy)(qp, x)) < 3e-3
    # a pre-norm block: the residual reads the raw input, which only the norm reads
    rms = nn.RMSNorm()
    rv = {"params": {"scale": jnp.ones(32)}}
    pre_norm = lambda p, x: x + rms.apply(rv, x) @ p["v"]
    qp, _ = _setup(pre_norm, params, x, policy)
    with pytest.raises(ValueError, match="calibration="):
        qjax.integer_only(pre_norm, policy, qp)(x)
    got = qjax.integer_only(pre_norm, policy, qp, calibration=[(x,)])(x)
    assert _rel(got, qjax.quantized(pre_norm, policy)(qp, x)) < 3e-3
    # float arguments a measured range cannot serve: a -1e9 mask (no precision left for what
    # it meets), a bias that was 0 on every calibration batch (a zero scale)
    biased = lambda p, x, b: jax.nn.softmax(x @ p["v"] + b)
    mask = jnp.where(jnp.arange(32) < 20, 0.0, -1e9)
    for calib_bias, message in ((mask, "a mask or bias"), (mask * 0, "nonzero range")):
        with pytest.raises(ValueError, match=message):
            qjax.integer_only(biased, policy, qp, calibration=[(x, calib_bias)])(x, mask)


def test_rotary_embedding_by_a_static_permutation(integer_program):
    # rotate_half as x[..., perm] (a gather), positions' cos / sin as static per-element factors
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    params = {
        "w": jax.random.normal(jax.random.key(1), (32, 16)) / 4,
        "v": jax.random.normal(jax.random.key(2), (16, 8)) / 4,
    }
    policy = qjax.Policy([qjax.Rule("(w|v)", weight=W8, act=A8)])
    angle = np.arange(6)[:, None] * np.exp(-np.arange(8) / 4.0)[None, :]
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    perm = np.concatenate([np.arange(8, 16), np.arange(8)])
    sign = np.concatenate([-np.ones(8), np.ones(8)])

    def f(p, x):
        q = x @ p["w"]
        return (q * cos + q[..., perm] * sign * sin) @ p["v"]

    qp, _ = _setup(f, params, x, policy)
    program = qjax.integer_only(f, policy, qp)
    assert _rel(program(x), qjax.quantized(f, policy)(qp, x)) < 3e-3
    integer_program(program, x)
    params["u"] = jax.random.normal(jax.random.key(3), (8, 8)) / 4
    dyn = lambda p, x: jax.lax.dynamic_slice_in_dim(x @ p["w"], 4, 8, axis=-1) @ p["u"]
    policy = qjax.Policy([qjax.Rule("(w|u)", weight=W8, act=A8)])
    qp, _ = _setup(dyn, params, x, policy)
    assert _rel(qjax.integer_only(dyn, policy, qp)(x), qjax.quantized(dyn, policy)(qp, x)) < 3e-3
