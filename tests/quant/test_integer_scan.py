"""Scans in integer-only inference (``nn.scan`` layer stacks, ``lax.scan`` forward and
reversed, ``lax.map``, ``fori_loop`` with static bounds) run unrolled. Each is checked bit
for bit against the same model written as a Python loop over layers whose quantized
weights were sliced by hand, and against ``qjax.quantized`` (the same quantization
rescaled in float)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax
from qjax.quant.integer_scan import layer_of

A8 = qjax.QuantSpec(qjax.int8)
SPECS = {
    "int8, scales shared by the layers": qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
    "int8, per layer": qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)),
    "int4, per layer": qjax.QuantSpec(qjax.int4, channel_axes=(0, -1)),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer(q: qjax.QArray, i: int) -> qjax.QArray:
    """Layer ``i`` of a stacked quantized weight, built by hand."""
    per_layer = lambda a: a[i] if a.shape[0] > 1 else a[0]
    return qjax.QArray(
        q.values[i],
        per_layer(q.scale),
        act_scale=q.act_scale[i] if np.size(q.act_scale) > 1 else jnp.reshape(q.act_scale, ()),
        format=q.format,
        dtype=q.dtype,
        channel_axes=(-1,),
        packed_axis=q.packed_axis,
        packed_length=q.packed_length,
    )


class _Residual(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(16, name="dense")(x)) + x, None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="inp")(x)
        stack = nn.scan(_Residual, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="out")(x)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.filterwarnings("ignore:.*act_stats are per layer")
def test_nn_scan_stack_is_bit_identical_to_its_unrolled_loop(spec, integer_program):
    net = _Stack()
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = net.init(jax.random.key(1), x)
    policy = qjax.Policy(
        [
            qjax.Rule(".*layers/.*kernel", weight=SPECS[spec], act=A8),
            qjax.Rule(".*kernel", weight=SPECS["int8, scales shared by the layers"], act=A8),
        ]
    )
    stats = qjax.calibrate(net.apply, policy, variables, [(x,)])
    qp = qjax.quantize_params(variables, policy, act_stats=stats)
    program = qjax.integer_only(net.apply, policy, qp)
    got = program(x)

    p = qp["params"]
    stacked = p["layers"]["dense"]
    loose = {
        "inp": p["inp"],
        "out": p["out"],
        **{f"l{i}": {"kernel": _layer(stacked["kernel"], i), "bias": stacked["bias"][i]} for i in range(3)},
    }

    def unrolled(p, x):
        x = x @ p["inp"]["kernel"] + p["inp"]["bias"]
        for i in range(3):
            x = jax.nn.relu(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]) + x
        return x @ p["out"]["kernel"] + p["out"]["bias"]

    np.testing.assert_array_equal(got, qjax.integer_only(unrolled, policy, loose)(x))
    assert _rel(got, qjax.quantized(net.apply, policy)(qp, x)) < 1e-2
    integer_program(program, x)


_T, _D, _HEADS, _KV_HEADS, _HD = 8, 32, 4, 2, 8


def _rotary(x):
    """Rotary embedding as Llama writes it: static cos / sin and a half swap (a gather)."""
    angle = np.arange(_T)[:, None] * np.exp(-np.arange(_HD // 2) / 2.0)[None, :]
    cos, sin = (np.tile(f(angle), 2)[:, None, :] for f in (np.cos, np.sin))
    half = np.concatenate([np.arange(_HD // 2, _HD), np.arange(_HD // 2)])
    sign = np.concatenate([-np.ones(_HD // 2), np.ones(_HD // 2)])
    return x * cos + x[..., half] * sign * sin


class _LlamaLayer(nn.Module):
    """A Llama decoder layer: RMSNorm, grouped-query causal attention with rotary
    embeddings, a SiLU-gated MLP, pre-norm residuals."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.RMSNorm(name="attn_norm")(x)
        q = _rotary(nn.DenseGeneral((_HEADS, _HD), use_bias=False, name="q")(h))
        k = _rotary(nn.DenseGeneral((_KV_HEADS, _HD), use_bias=False, name="k")(h))
        v = nn.DenseGeneral((_KV_HEADS, _HD), use_bias=False, name="v")(h)
        k, v = (jnp.repeat(a, _HEADS // _KV_HEADS, axis=2) for a in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(_HD)
        probs = jax.nn.softmax(jnp.where(np.tril(np.ones((_T, _T), bool)), scores, -jnp.inf))
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + nn.DenseGeneral(_D, axis=(-2, -1), use_bias=False, name="o")(o)
        h = nn.RMSNorm(name="mlp_norm")(x)
        gate, up = (nn.Dense(64, use_bias=False, name=n)(h) for n in ("gate", "up"))
        return x + nn.Dense(_D, use_bias=False, name="down")(jax.nn.silu(gate) * up), None


class _Llama(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_LlamaLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return nn.RMSNorm(name="norm")(stack(name="layers")(x, None)[0])


def test_a_scanned_llama_stack_with_int4_group_weights(integer_program):
    # scans, grouped int4 weights, GQA, rotary, causal softmax, SiLU gates and RMSNorms together
    policy = qjax.Policy(
        [
            qjax.Rule(
                r".*/(q|k|v)/kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -2, -1)), act=A8
            ),
            qjax.Rule(r".*/o/kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=A8),
            qjax.Rule(
                r".*/(gate|up|down)/kernel",
                weight=qjax.QuantSpec(qjax.int4, channel_axes=(0, -1), group_size=16, group_axis=-2),
                act=A8,
            ),
            qjax.OpRule(r".*bqhd,bkhd->bhqk", lhs=A8, rhs=A8),
            qjax.OpRule(r".*bhqk,bkhd->bqhd", lhs=qjax.QuantSpec(qjax.uint8), rhs=A8),
        ]
    )
    net = _Llama()
    x = jax.random.normal(jax.random.key(11), (2, _T, _D))
    variables = net.init(jax.random.key(12), x)
    stats = qjax.calibrate(net.apply, policy, variables, [(x,)])
    qp = qjax.quantize_params(variables, policy, act_stats=stats)
    program = qjax.integer_only(net.apply, policy, qp, op_stats=stats, calibration=[(x,)])
    got = program(x)
    served = qjax.quantized(net.apply, policy, op_stats=stats)(qp, x)
    exact = net.apply(variables, x)
    assert _rel(got, served) < 2e-2
    assert _rel(got, exact) < 1.25 * _rel(served, exact)
    integer_program(program, x)


def _stacked_params(layers=3, width=12):
    return {"w": jax.random.normal(jax.random.key(4), (layers, width, width)) / np.sqrt(width)}


def _quantized(f, params, x):
    policy = qjax.Policy(
        [qjax.Rule("w|l[0-9]", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=A8)]
    )
    stats = qjax.calibrate(f, policy, params, [(x,)])
    qp = qjax.quantize_params(params, policy, act_stats=stats)
    return policy, qp, {f"l{i}": _layer(qp["w"], i) for i in range(qp["w"].shape[0])}


def test_reversed_scan_with_stacked_outputs_and_lax_map():
    x = jax.random.normal(jax.random.key(5), (4, 12))
    params = _stacked_params()

    def scanned(p, x):  # layers 2, 1, 0; each layer's row sums stacked in layer order
        h, sums = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), jnp.sum(h @ w, -1)), x, p["w"], reverse=True)
        return h, sums

    def unrolled(p, x):
        h, sums = x, [None] * 3
        for i in (2, 1, 0):
            sums[i] = jnp.sum(h @ p[f"l{i}"], -1)
            h = jax.nn.relu(h @ p[f"l{i}"])
        return h, jnp.stack(sums)

    policy, qp, loose = _quantized(scanned, params, x)
    got, want = qjax.integer_only(scanned, policy, qp)(x), qjax.integer_only(unrolled, policy, loose)(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert _rel(got[1], qjax.quantized(scanned, policy)(qp, x)[1]) < 1e-2

    mapped = lambda p, x: jax.lax.map(lambda w: x @ w, p["w"])  # one scale per layer, stacked
    policy, qp, loose = _quantized(mapped, params, x)
    got = qjax.integer_only(mapped, policy, qp)(x)
    want = qjax.integer_only(lambda p, x: jnp.stack([x @ p[f"l{i}"] for i in range(3)]), policy, loose)(x)
    np.testing.assert_array_equal(got, want)
    # a stacked weight transposed before the scan, its layer axis kept: the view goes along
    swapped = lambda p, x: jax.lax.map(lambda w: x @ w.T, jnp.swapaxes(p["w"], 1, 2))
    np.testing.assert_array_equal(qjax.integer_only(swapped, policy, qp)(x), got)


def test_fori_loop_with_static_bounds_and_scans_of_length_zero_and_one():
    x = jax.random.normal(jax.random.key(6), (4, 12))
    params = {"w": _stacked_params(1)["w"][0]}
    policy = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=A8)])

    looped = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jax.nn.relu(h @ p["w"]) + i, x)

    def unrolled(p, x):
        for i in range(3):
            x = jax.nn.relu(x @ p["w"]) + i
        return x

    stats = qjax.calibrate(looped, policy, params, [(x,)])
    qp = qjax.quantize_params(params, policy, act_stats=stats)
    got = qjax.integer_only(looped, policy, qp)(x)
    np.testing.assert_array_equal(got, qjax.integer_only(unrolled, policy, qp)(x))
    assert _rel(got, qjax.quantized(looped, policy)(qp, x)) < 1e-2

    def scans(p, x):
        h = x @ p["w"]
        kept, empty = jax.lax.scan(lambda h, _: (h * 2, h), h, None, length=0)
        once, ys = jax.lax.scan(lambda h, _: (h + h, h), h, None, length=1)
        return kept, empty, once, ys

    kept, empty, once, ys = qjax.integer_only(scans, policy, qp)(x)
    h = qjax.integer_only(lambda p, x: x @ p["w"], policy, qp)(x)
    np.testing.assert_array_equal(kept, h)
    assert empty.shape == (0, 4, 12)
    np.testing.assert_array_equal(once, 2 * h)
    np.testing.assert_array_equal(ys, h[None])


def test_layer_loops_indexing_or_reversing_the_stack():
    # fori_loop(..., lambda i, h: f(h @ w[i])): the counter is static once unrolled, so w[i] is
    # layer i of the stack; a stack reversed before a scan runs its layers last to first
    x = jax.random.normal(jax.random.key(8), (4, 12))
    params = _stacked_params()
    indexed = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jax.nn.relu(h @ p["w"][i]), x)
    reversed_ = lambda p, x: jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p["w"][::-1])[0]

    def unrolled(order):
        def f(p, x):
            for i in order:
                x = jax.nn.relu(x @ p[f"l{i}"])
            return x

        return f

    policy, qp, loose = _quantized(indexed, params, x)
    got = qjax.integer_only(indexed, policy, qp)(x)
    np.testing.assert_array_equal(got, qjax.integer_only(unrolled((0, 1, 2)), policy, loose)(x))
    assert _rel(got, qjax.quantized(indexed, policy)(qp, x)) < 1e-2
    # the stack stored (N, K) (qjax.store_transposed): the same program
    transposed = qjax.store_transposed(qp, "w")
    np.testing.assert_array_equal(qjax.integer_only(indexed, policy, transposed)(x), got)
    # (calibrate does not follow a reversed stack into the scan: its act scales come from
    # the forward scan's calibration here)
    forward = lambda p, x: jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p["w"])[0]
    policy, qp, loose = _quantized(forward, params, x)
    got = qjax.integer_only(reversed_, policy, qp)(x)
    np.testing.assert_array_equal(got, qjax.integer_only(unrolled((2, 1, 0)), policy, loose)(x))


def _layer_norm(h):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def test_a_scans_stacked_outputs_keep_their_loose_bounds():
    # a product of normalised values needs measured ranges, scanned or not: refused without
    # calibration= (it would keep no bits; with it, a scan is right: the Llama test)
    x = jax.random.normal(jax.random.key(9), (4, 12))
    f = lambda p, x: jnp.square(jax.lax.scan(lambda c, w: (c, _layer_norm(c @ w)), x, p["w"])[1])
    policy, qp, _ = _quantized(f, _stacked_params(), x)
    with pytest.raises(ValueError, match="calibration="):
        qjax.integer_only(f, policy, qp)(x)


def test_other_control_flow_and_moved_layer_axes_are_refused():
    x = jax.random.normal(jax.random.key(7), (4, 12))
    params = _stacked_params()
    policy, qp, _ = _quantized(lambda p, x: jax.lax.map(lambda w: x @ w, p["w"]), params, x)
    with pytest.raises(ValueError, match="moves its layer axis"):
        f = lambda p, x: jax.lax.map(lambda w: x @ w, jnp.transpose(p["w"], (1, 2, 0)))
        qjax.integer_only(f, policy, qp)(x)
    w0 = {"w": qp["w"]}
    cond = lambda p, x: jax.lax.cond(x.sum() > 0, lambda h: h @ p["w"][0], lambda h: -h @ p["w"][0], x)
    while_ = lambda p, x: jax.lax.while_loop(lambda h: h.sum() < 0, lambda h: h @ p["w"][0], x)
    for f in (cond, while_):
        with pytest.raises(ValueError, match="cond and while_loop are not followed"):
            qjax.integer_only(f, policy, w0)(x)


@settings(deadline=None, max_examples=examples(4))  # make fuzz scales it up
@given(
    layers=st.integers(1, 4),
    k=st.sampled_from([1, 7]),  # few shapes: each compiles its quantize / dequantize
    n=st.sampled_from([2, 6]),
    bits=st.sampled_from([4, 8]),
    per_layer=st.booleans(),
    act_per_layer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_stacked_weights_layer_is_its_dequantized_slice(layers, k, n, bits, per_layer, act_per_layer, seed):
    w = np.random.default_rng(seed).normal(size=(layers, k, n)).astype(np.float32)
    fmt = qjax.int4 if bits == 4 else qjax.int8
    spec = qjax.QuantSpec(fmt, channel_axes=(0, -1) if per_layer else (-1,))
    q = qjax.quantize(jnp.asarray(w), spec)
    act = np.random.default_rng(seed + 1).uniform(0.01, 1, layers if act_per_layer else 1).astype(np.float32)
    q = q.with_act_scale(jnp.asarray(act if act_per_layer else act[0]))
    for i in range(layers):
        one = layer_of(q, i, layers, "w")
        np.testing.assert_array_equal(one.dequantize(), np.asarray(q.dequantize())[i])
        assert float(one.act_scale) == float(act[i if act_per_layer else 0])
        assert one.shape == (k, n)
    with pytest.raises(ValueError, match="'w' is scanned 5 times"):
        layer_of(q, 0, 5, "w")
