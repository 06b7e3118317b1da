"""GPTQ of mixture-of-experts weights whose experts read their own tokens: a ``dot_general``
with the expert axis as a batch dimension (dispatched tokens ``"ecd,edf->ecf"``) and a
``lax.ragged_dot`` (rows sorted by expert). Each expert must be GPTQ'd with the Hessian of
its own tokens only, as if it were a separate dense layer, against float64 references."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gptq import reference_gptq

import qjax
from qjax.graph.statistics import gram, input_statistics
from qjax.quant.gptq import gptq_quantize, input_hessians

E, D, F = 3, 32, 16
EXPERT_SPEC = qjax.QuantSpec(qjax.int4, channel_axes=(0, -1), group_size=16, group_axis=1)
SLICE_SPEC = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0)


def _correlated(rng, shape):
    """Inputs with correlated features (so GPTQ's error feedback differs from rounding)."""
    mix = rng.normal(size=(shape[-1], shape[-1])).astype(np.float32)
    return jnp.asarray(rng.normal(size=shape).astype(np.float32) @ mix)


def _gram64(x) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x.T @ x


def _check_per_expert(got, w, hessians, spec=SLICE_SPEC):
    """Each expert's slice is exactly qjax's GPTQ of that expert with its own Hessian."""
    for e, h in enumerate(hessians):
        want = gptq_quantize(w[e], h, spec)
        np.testing.assert_array_equal(got[e], np.asarray(want.dequantize()), err_msg=f"expert {e}")


def test_batched_einsum_experts_get_their_own_tokens_hessians():
    rng = np.random.default_rng(0)
    x = _correlated(rng, (E, 24, D)) * jnp.asarray([0.5, 1.0, 3.0])[:, None, None]  # experts differ
    w = {"w": jnp.asarray(rng.normal(size=(E, D, F)).astype(np.float32))}
    f = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["w"])
    batches = [(x[:, :12],), (x[:, 12:],)]
    h = input_hessians(f, w, batches, grouped=True)["w"]
    assert h.shape == (E, D, D)
    for e in range(E):  # against float64, over both batches
        np.testing.assert_allclose(np.asarray(h[e]), _gram64(x[e]) / 24, rtol=1e-5, atol=1e-4)
    q = qjax.gptq(f, w, batches, qjax.Policy([qjax.Rule("w", weight=EXPERT_SPEC)]))
    got = np.asarray(q["w"].dequantize())
    _check_per_expert(got, w["w"], h)
    # and the per-expert problem against the independent float64 GPTQ
    want = reference_gptq(np.asarray(w["w"][2]), np.asarray(h[2]), qjax.int4, group=16)
    np.testing.assert_allclose(got[2], want, rtol=1e-4, atol=1e-4)
    # the shared Hessian (every token for every expert) gives another answer
    pooled = gptq_quantize(w["w"][0], jnp.mean(h, 0), SLICE_SPEC).dequantize()
    assert not np.array_equal(got[0], np.asarray(pooled))


def test_weight_as_lhs_with_the_expert_axis_in_the_middle():
    # weight (D, E, F) read first: dot_general(w, x) with batch dims (1, 0)
    rng = np.random.default_rng(1)
    x = _correlated(rng, (E, 20, D))
    w = {"w": jnp.asarray(rng.normal(size=(D, E, F)).astype(np.float32))}
    f = lambda p, x: jnp.einsum("def,ecd->efc", p["w"], x)
    st = input_statistics(f, w, [(x,)], gram, grouped=True)["w"]
    assert (st.groups, st.weight_axes, st.rows.tolist()) == ((1,), (0,), [20] * E)
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(1, 2))
    q = qjax.gptq(f, w, [(x,)], qjax.Policy([qjax.Rule("w", weight=spec)]))
    got = np.moveaxis(np.asarray(q["w"].dequantize()), 1, 0)
    h = np.stack([_gram64(x[e]) / 20 for e in range(E)]).astype(np.float32)
    for e in range(E):
        want = reference_gptq(np.asarray(w["w"][:, e]), h[e], qjax.int8)
        np.testing.assert_allclose(got[e], want, rtol=1e-4, atol=2e-4)


def _ragged_problem(seed=2, sizes=(5, 0, 11, 16), pad=4):
    rng = np.random.default_rng(seed)
    m = sum(sizes) + pad
    x = np.array(_correlated(rng, (m, D)))
    x[sum(sizes) :] = 1e4  # rows past the last group: ignored by ragged_dot, must not count
    w = {"w": jnp.asarray(rng.normal(size=(len(sizes), D, F)).astype(np.float32))}
    return jnp.asarray(x), w, jnp.asarray(sizes, jnp.int32)


def _ragged(p, x, sizes):
    return jax.lax.ragged_dot(x, p["w"], sizes)


def test_ragged_dot_experts_get_their_own_rows_and_an_unreached_expert_is_rounded():
    x, w, sizes = _ragged_problem()
    ends = np.cumsum(np.asarray(sizes))
    own = [np.asarray(x)[e0:e1] for e0, e1 in zip([0, *ends[:-1]], ends)]
    st = input_statistics(_ragged, w, [(x, sizes)], gram, grouped=True)["w"]
    assert st.op == "ragged_dot_general" and st.rows.tolist() == [5, 0, 11, 16]
    for e in range(4):
        np.testing.assert_allclose(np.asarray(st.value[e]), _gram64(own[e]), rtol=1e-5, atol=1e-3)
    policy = qjax.Policy([qjax.Rule("w", weight=EXPERT_SPEC)])
    with pytest.warns(UserWarning, match=r"'w': no calibration token reached experts \[1\]"):
        q = qjax.gptq(_ragged, w, [(x, sizes)], policy)
    got = np.asarray(q["w"].dequantize())
    h = input_hessians(_ragged, w, [(x, sizes)], grouped=True)["w"]
    for e in (0, 2, 3):
        _check_per_expert(got[e : e + 1], w["w"][e : e + 1], h[e : e + 1])
    # expert 1 saw nothing: rounded to nearest, not zeroed as "dead inputs"
    rtn = qjax.quantize_params(w, policy)["w"].dequantize()
    np.testing.assert_array_equal(got[1], np.asarray(rtn[1]))
    assert np.abs(got[1]).max() > 0
    # GPTQ lowers the output error of the experts it saw against rounding to nearest
    err = lambda v: float(jnp.sum((_ragged({"w": v}, x, sizes) - _ragged(w, x, sizes))[: ends[-1]] ** 2))
    assert err(jnp.asarray(got)) < 0.9 * err(rtn)


def test_ragged_statistics_add_up_over_batches_with_different_group_sizes():
    x1, w, s1 = _ragged_problem(3, (4, 6, 2), pad=0)
    x2, _, s2 = _ragged_problem(4, (0, 3, 9), pad=2)
    st = input_statistics(_ragged, w, [(x1, s1), (x2, s2)], gram, grouped=True)["w"]
    assert st.rows.tolist() == [4, 9, 11]
    h = input_hessians(_ragged, w, [(x1, s1), (x2, s2)], grouped=True)["w"]
    want1 = _gram64(np.concatenate([x1[4:10], x2[0:3]]))
    np.testing.assert_allclose(np.asarray(h[1]), want1 / 9, rtol=1e-5, atol=1e-4)


def test_ragged_experts_in_a_scanned_stack_take_each_layers_rows():
    # (L, G, K, N) experts under lax.scan with per-layer group sizes: depth and groups together
    rng = np.random.default_rng(5)
    layers, g = 2, 3
    w = {"w": jnp.asarray(rng.normal(size=(layers, g, D, D)).astype(np.float32))}
    sizes = jnp.asarray([[6, 10, 0], [2, 2, 12]], jnp.int32)
    x = _correlated(rng, (16, D))

    def f(p, x, sizes):
        def body(h, layer):
            w_l, s_l = layer
            return jnp.tanh(jax.lax.ragged_dot(h, w_l, s_l)), h

        return jax.lax.scan(body, x, (p["w"], sizes))

    st = input_statistics(f, w, [(x, sizes)], gram, grouped=True)["w"]
    assert (st.depth, st.groups, st.value.shape) == (1, (1,), (layers, g, D, D))
    assert st.rows.tolist() == sizes.tolist()
    inputs = np.asarray(f(w, x, sizes)[1])  # each layer's input rows
    np.testing.assert_allclose(np.asarray(st.value[1, 2]), _gram64(inputs[1][4:16]), rtol=1e-4, atol=1e-3)
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, -1))
    with pytest.warns(UserWarning, match=r"experts \[\(0, 2\)\] \(indices along leaf axes \[0, 1\]\)"):
        q = qjax.gptq(f, w, [(x, sizes)], qjax.Policy([qjax.Rule("w", weight=spec)]))
    got = np.asarray(q["w"].dequantize())
    h = input_hessians(f, w, [(x, sizes)], grouped=True)["w"]
    slice_spec = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    for layer, e in [(0, 0), (0, 1), (1, 0), (1, 2)]:
        want = gptq_quantize(w["w"][layer, e], h[layer, e], slice_spec).dequantize()
        np.testing.assert_array_equal(got[layer, e], np.asarray(want), err_msg=f"{layer=} {e=}")
    rtn = qjax.quantize(w["w"][0, 2], slice_spec).dequantize()
    np.testing.assert_array_equal(got[0, 2], np.asarray(rtn))


def test_without_grouped_the_statistics_refuse_experts_by_name():
    x, w, sizes = _ragged_problem()
    with pytest.raises(ValueError, match=r"'w'.*ragged_dot.*cannot be pooled.*grouped=True"):
        input_statistics(_ragged, w, [(x, sizes)], gram, patterns="w")
    assert input_statistics(_ragged, w, [(x, sizes)], gram) == {}  # every weight: skipped, as before
    xe = jnp.ones((E, 4, D))
    we = {"w": jnp.ones((E, D, F))}
    with pytest.raises(ValueError, match=r"'w'.*batch dimensions.*cannot be pooled.*grouped=True"):
        input_statistics(lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["w"]), we, [(xe,)], gram)


def test_an_expert_spec_without_per_expert_scales_warns_and_rounds():
    x, w, sizes = _ragged_problem()
    shared = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = qjax.gptq(_ragged, w, [(x, sizes)], shared)
    messages = [str(c.message) for c in caught]
    assert any(re.search(r"'w'.*axes \[0\].*channel_axes=\(0, -1\).*rounded to nearest", m) for m in messages)
    np.testing.assert_array_equal(q["w"].values, qjax.quantize_params(w, shared)["w"].values)


def test_gptqd_experts_serve_through_quantized_and_beat_rounding():
    # the MoE block of a model: dispatched tokens per expert, then quantized() runs it
    rng = np.random.default_rng(6)
    x = _correlated(rng, (E, 64, D))
    w = {"w": jnp.asarray(rng.normal(size=(E, D, F)).astype(np.float32))}
    f = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["w"])
    policy = qjax.Policy([qjax.Rule("w", weight=EXPERT_SPEC)])
    q = qjax.gptq(f, w, [(x,)], policy)
    served = qjax.quantized(f, policy)(q, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(f({"w": q["w"].dequantize()}, x)), atol=1e-3)
    rtn = qjax.quantize_params(w, policy)
    ref = np.asarray(f(w, x), np.float64)
    err = lambda y: float(np.sum((np.asarray(y, np.float64) - ref) ** 2))
    assert err(served) < 0.9 * err(qjax.quantized(f, policy)(rtn, x))


def test_an_expert_that_saw_only_padding_is_rounded_with_a_warning():
    # capacity-padded dispatch: expert 1's slots are all zero rows, so its Hessian is 0 though
    # its row count is not; it used to be zeroed as "dead inputs", silently
    rng = np.random.default_rng(7)
    x = np.array(_correlated(rng, (E, 8, D)))
    x[1] = 0.0
    w = {"w": jnp.asarray(rng.normal(size=(E, D, F)).astype(np.float32))}
    f = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["w"])
    policy = qjax.Policy([qjax.Rule("w", weight=EXPERT_SPEC)])
    with pytest.warns(UserWarning, match=r"'w': no calibration token reached experts \[1\]"):
        q = qjax.gptq(f, w, [(jnp.asarray(x),)], policy)
    rtn = qjax.quantize_params(w, policy)["w"].dequantize()
    np.testing.assert_array_equal(np.asarray(q["w"].dequantize())[1], np.asarray(rtn[1]))


def test_a_few_token_experts_unseen_inputs_keep_their_weights():
    # the down projection of an expert that saw 2 tokens reads ReLU units that were 0 for
    # both: the dense rule (zero the weights of always-zero inputs) would wipe those rows
    rng = np.random.default_rng(10)
    hidden = 64
    up = jnp.asarray(rng.normal(size=(2, D, hidden)).astype(np.float32) / 4)
    down = {"w": jnp.asarray(rng.normal(size=(2, hidden, D)).astype(np.float32) / 8)}
    f = lambda p, x, s: jax.lax.ragged_dot(jax.nn.relu(jax.lax.ragged_dot(x, up, s)), p["w"], s)
    x, sizes = _correlated(rng, (40, D)), jnp.asarray([38, 2], jnp.int32)
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(0, -1))
    q = np.asarray(
        qjax.gptq(f, down, [(x, sizes)], qjax.Policy([qjax.Rule("w", weight=spec)]))["w"].dequantize()
    )
    h = np.asarray(input_hessians(f, down, [(x, sizes)], grouped=True)["w"][1])
    unseen = np.flatnonzero(np.diag(h) == 0)
    assert unseen.size > 5
    rtn = qjax.quantize(down["w"][1], qjax.QuantSpec(qjax.int8, channel_axes=(-1,))).dequantize()
    np.testing.assert_array_equal(q[1][unseen], np.asarray(rtn)[unseen])  # rounded, not zeroed
    # held-out tokens: no worse than rounding to nearest
    xt, st = _correlated(rng, (200, D)), jnp.asarray([100, 100], jnp.int32)
    ref = np.asarray(f(down, xt, st))[100:]
    err = lambda v: float(np.sum((np.asarray(f({"w": v}, xt, st))[100:] - ref) ** 2))
    rtn_all = qjax.quantize(down["w"], spec).dequantize()
    assert err(jnp.asarray(q)) < 1.5 * err(rtn_all)


def test_a_weight_read_per_expert_and_by_every_token_is_refused_by_name():
    x, w, sizes = _ragged_problem()
    y = jnp.ones((5, D))
    both = lambda p, x, s, y: (jax.lax.ragged_dot(x, p["w"], s), jnp.einsum("nd,edf->nef", y, p["w"]))
    with pytest.raises(
        ValueError, match=r"'w': it is read both per expert.*and by ops that pool every token"
    ):
        input_statistics(both, w, [(x, sizes, y)], gram, grouped=True)


def test_a_per_expert_vector_weight_warns_and_rounds_instead_of_failing():
    x = jnp.ones((E, 4, D))
    w = {"w": jax.random.normal(jax.random.key(0), (E, D))}
    f = lambda p, x: jnp.einsum("ecd,ed->ec", x, p["w"])
    policy = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0,)))])
    with pytest.warns(UserWarning, match=r"'w': its matmul leaves no output axis.*rounded to nearest"):
        q = qjax.gptq(f, w, [(x,)], policy)
    np.testing.assert_array_equal(q["w"].values, qjax.quantize_params(w, policy)["w"].values)
