"""GPTQ against an independent float64 NumPy implementation of the paper's algorithm."""

import importlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.quant.gptq import gptq_quantize, input_hessians


def reference_gptq(w, h, fmt, group=None, damp=0.01, order=None, symmetric=True, keep=None):
    """Unblocked GPTQ in float64: scales from the current rows at each group start
    (``group=None``: per output channel from the whole original weight). With ``keep``
    (SparseGPT-style): masked-out weights are set to 0, their error fed back, and scales
    come from the kept weights only."""
    keep = np.ones(w.shape, bool) if keep is None else keep
    w = np.where(keep, w.astype(np.float64), 0.0)
    h = h.astype(np.float64).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    order = np.arange(k) if order is None else order
    w, h, keep = w[order], h[order][:, order], keep[order]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros_like(w)

    def scale_of(block):
        if symmetric:
            s = np.abs(block).max(0) / fmt.qmax
            return np.where(s == 0, 1.0, s), 0.0
        lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
        s = (hi - lo) / (fmt.qmax - fmt.qmin)
        s = np.where(s == 0, 1.0, s)
        return s, np.round(fmt.qmin - lo / s)

    s, zp = scale_of(w)
    for i in range(k):
        if group is not None and i % group == 0:
            s, zp = scale_of(np.where(keep[i : i + group], w[i : i + group], 0.0))
        q = (np.clip(np.round(w[i] / s) + zp, fmt.qmin, fmt.qmax) - zp) * s
        q = np.where(keep[i], q, 0.0)
        out[i] = q
        err = (w[i] - q) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    result = np.zeros_like(out)
    result[order] = out
    return result


def problem(k, n, seed=0, correlated=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * k, k))
    if correlated:
        x = x @ rng.normal(size=(k, k)) * 0.2
    w = rng.normal(size=(k, n)).astype(np.float32)
    return w, (x.T @ x / len(x)).astype(np.float32)


def loss(w_hat, w, h):
    d = np.asarray(w_hat, np.float64) - w
    return float(np.trace(d.T @ h.astype(np.float64) @ d))


def int4_spec(group=None, **kw):
    if group is None:
        return qjax.QuantSpec(qjax.int4, channel_axes=(-1,), **kw)
    return qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=group, group_axis=0, **kw)


@pytest.mark.parametrize("group", [None, 32, 64])
def test_matches_reference(group):
    w, h = problem(192, 40)
    got = np.asarray(gptq_quantize(w, h, int4_spec(group), block_size=64).dequantize())
    want = reference_gptq(w, h, qjax.int4, group)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lazy_blocks_do_not_change_the_result():
    w, h = problem(160, 24, seed=3)
    spec = int4_spec(32)
    a = np.asarray(gptq_quantize(w, h, spec, block_size=32).dequantize())
    b = np.asarray(gptq_quantize(w, h, spec, block_size=160).dequantize())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_act_order_uses_static_groups_and_matches_reference():
    w, h = problem(128, 16, seed=1)
    spec = int4_spec(32)
    got = np.asarray(gptq_quantize(w, h, spec, act_order=True).dequantize())
    order = np.argsort(-np.diag(h), kind="stable")
    # Static groups: each row's scale is its original group's scale from the original weight.
    g = w.reshape(4, 32, 16)
    s = np.maximum(np.abs(g).max(1), 0) / 7
    want_grid = np.asarray(qjax.quantize(w, spec).scale)
    np.testing.assert_allclose(want_grid, s, rtol=1e-6)
    q = qjax.quantize(jnp.asarray(got), spec, scale=want_grid)
    np.testing.assert_allclose(np.asarray(q.dequantize()), got, rtol=1e-6, atol=1e-7)
    assert loss(got, w, h) < loss(np.asarray(qjax.dequantize(qjax.quantize(w, spec))), w, h)
    assert order[0] == np.argmax(np.diag(h))


UINT4_G32_MINMAX = qjax.QuantSpec(  # asymmetric, grouped along the input axis
    qjax.uint4,
    channel_axes=(-1,),
    group_size=32,
    group_axis=0,
    symmetric=False,
    calibration=qjax.calib.minmax(),
)


def test_asymmetric_matches_reference():
    w, h = problem(96, 20, seed=4)
    w = w + 0.7  # skewed, so the zero point matters
    spec = UINT4_G32_MINMAX
    got = np.asarray(gptq_quantize(w, h, spec).dequantize())
    want = reference_gptq(w, h, qjax.uint4, 32, symmetric=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt,group", [(qjax.int4, 64), (qjax.int3, 64), (qjax.int8, None)])
def test_better_than_round_to_nearest(fmt, group):
    w, h = problem(256, 64, seed=2)
    grouping = {} if group is None else dict(group_size=group, group_axis=0)
    spec = qjax.QuantSpec(fmt, channel_axes=(-1,), **grouping)
    rtn = np.asarray(qjax.dequantize(qjax.quantize(w, spec)))
    got = np.asarray(gptq_quantize(w, h, spec).dequantize())
    assert loss(got, w, h) < 0.8 * loss(rtn, w, h)


def test_identity_hessian_is_round_to_nearest():
    # Uncorrelated inputs: nothing to compensate, GPTQ == RTN exactly.
    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 12)).astype(np.float32)
    spec = int4_spec(16)
    got = gptq_quantize(w, np.eye(64, dtype=np.float32), spec)
    want = qjax.quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))


def test_dead_inputs_and_odd_sizes():
    w, h = problem(100, 7, seed=6)  # K=100: not a multiple of the block; group 25
    h[3, :] = h[:, 3] = 0
    q = gptq_quantize(w, h, int4_spec(25), block_size=64)
    got = np.asarray(q.dequantize())
    assert got.shape == (100, 7) and np.all(got[3] == 0)
    assert q.values.shape == (100, 4) and q.shape == (100, 7)  # packed int4, logical shape kept
    want = reference_gptq(w, h, qjax.int4, 25)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_weight_keeps_dtype():
    w, h = problem(64, 8)
    q = gptq_quantize(jnp.asarray(w, jnp.bfloat16), h, int4_spec(32))
    assert q.dequantize().dtype == jnp.bfloat16


def test_errors_name_the_leaf():
    w, h = problem(64, 8)
    with pytest.raises(ValueError, match=r"'k'.*2-D"):
        gptq_quantize(w[None], h, int4_spec(), path="k")
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, h[:10, :10], int4_spec())
    with pytest.raises(ValueError, match="per output channel"):
        gptq_quantize(w, h, qjax.QuantSpec(qjax.int4, channel_axes=(0,)))
    with pytest.raises(ValueError, match="integer formats"):
        gptq_quantize(w, h, qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,)))
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, h, int4_spec(24))
    bad = h.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, bad, int4_spec())


def test_input_hessians_of_a_two_layer_model():
    rng = np.random.default_rng(0)
    params = {
        "a": rng.normal(size=(6, 5)).astype(np.float32),
        "b": rng.normal(size=(4, 5)).astype(np.float32),
    }

    def f(p, x):
        hidden = jnp.tanh(x @ p["a"])
        return jnp.einsum("btk,nk->btn", hidden, p["b"])  # second weight used transposed

    batches = [(rng.normal(size=(3, 7, 6)).astype(np.float32),) for _ in range(3)]
    hs = input_hessians(f, params, batches)
    xs = np.concatenate([b[0].reshape(-1, 6) for b in batches])
    np.testing.assert_allclose(hs["a"], xs.T @ xs / len(xs), rtol=1e-5)
    hid = np.tanh(xs.astype(np.float64) @ params["a"])
    np.testing.assert_allclose(hs["b"], hid.T @ hid / len(hid), rtol=1e-4, atol=1e-6)
    # GPTQ through a Hessian gathered by the graph layer beats RTN on the model's own inputs.
    assert set(hs) == {"a", "b"}
    jax.tree.map(lambda h: np.testing.assert_allclose(h, np.asarray(h).T), hs)


def test_gptq_params_through_a_linen_model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(64)(x)))

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(32, 32)).astype(np.float32)
    xs = [jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32) @ mix) for _ in range(4)]
    model = MLP()
    variables = model.init(jax.random.key(0), xs[0])
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0)
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=spec)])
    from qjax.quant.gptq import gptq

    qp = gptq(model.apply, variables, [(x,) for x in xs], policy)
    rtn = qjax.quantize_params(variables, policy)
    x_test = jnp.asarray(rng.normal(size=(256, 32)).astype(np.float32) @ mix)
    ref = model.apply(variables, x_test)
    err = lambda p: float(jnp.mean((qjax.quantized(model.apply, policy)(p, x_test) - ref) ** 2))
    assert isinstance(qp["params"]["Dense_0"]["kernel"], qjax.QArray)
    assert err(qp) < err(rtn)


def test_sequential_stages_and_stage_errors():
    import flax.linen as nn

    from qjax.quant.gptq import gptq

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = nn.relu(nn.Dense(32)(x))
            return nn.Dense(8)(hidden)

    rng = np.random.default_rng(2)
    xs = [jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32)) for _ in range(2)]
    model = MLP()
    variables = model.init(jax.random.key(0), xs[0])
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=int4_spec(8))])
    batches = [(x,) for x in xs]
    seq = gptq(model.apply, variables, batches, policy, stages=[r"params/Dense_0/.*"])
    # Stage 2's Hessian comes from the model whose first layer is already quantized.
    first = seq["params"]["Dense_0"]["kernel"].dequantize()
    hidden = [jax.nn.relu(x @ first + variables["params"]["Dense_0"]["bias"]) for x in xs]
    h = sum(np.asarray(a, np.float64).T @ np.asarray(a, np.float64) for a in hidden) / 128
    want = gptq_quantize(variables["params"]["Dense_1"]["kernel"], h.astype(np.float32), int4_spec(8))
    np.testing.assert_allclose(
        np.asarray(seq["params"]["Dense_1"]["kernel"].dequantize()), np.asarray(want.dequantize()), atol=1e-5
    )
    with pytest.raises(ValueError, match="stage pattern"):
        gptq(model.apply, variables, batches, policy, stages=[r"params/nope/.*"])


@pytest.mark.parametrize(
    "spec",
    [
        qjax.QuantSpec(qjax.int4, channel_axes=(0,), group_size=16, group_axis=1),
        qjax.QuantSpec(qjax.int8),  # per tensor
    ],
    ids=["int4_g16_per_out_channel", "int8_per_tensor"],
)
def test_weights_read_transposed_get_gptq_of_their_kernel(spec):
    """A leaf stored ``[outputs, inputs]`` and read as ``x @ w.T`` (PyTorch layout, a tied
    LM head) is GPTQ-quantized as its ``[inputs, outputs]`` kernel would be: the same codes,
    transposed (before, the Hessian was applied along the wrong axis: worse than
    round-to-nearest for a square weight, an unclear shape error otherwise)."""
    from qjax.quant.gptq import gptq

    rng = np.random.default_rng(3)
    mix = rng.normal(size=(32, 32)).astype(np.float32)
    xs = [(jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32) @ mix),) for _ in range(3)]
    w = jnp.asarray(rng.normal(size=(48, 32)).astype(np.float32) / 6)  # [out, in]
    spec_kn = qjax.QuantSpec(
        spec.format,
        channel_axes=tuple(1 - a for a in spec.channel_axes),
        group_size=spec.group_size,
        group_axis=None if spec.group_axis is None else 1 - spec.group_axis,
    )
    torch = gptq(lambda p, x: x @ p["w"].T, {"w": w}, xs, qjax.Policy([qjax.Rule("w", weight=spec)]))["w"]
    flax = gptq(lambda p, x: x @ p["w"], {"w": w.T}, xs, qjax.Policy([qjax.Rule("w", weight=spec_kn)]))["w"]
    assert torch.shape == (48, 32)
    np.testing.assert_array_equal(np.asarray(torch.dequantize()), np.asarray(flax.dequantize()).T)
    rtn = qjax.quantize(w, spec).dequantize()
    x = xs[0][0]
    err = lambda v: float(jnp.mean((x @ v.T - x @ w.T) ** 2))
    assert err(torch.dequantize()) < err(rtn)


def test_stochastic_rounding_is_refused_up_front():
    from qjax.quant.gptq import gptq

    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), rounding="stochastic")
    with pytest.raises(ValueError, match=r"leaf 'w'.*round to nearest"):
        gptq(
            lambda p, x: x @ p["w"],
            {"w": jnp.ones((8, 4))},
            [(jnp.ones((2, 8)),)],
            qjax.Policy([qjax.Rule("w", weight=spec)]),
        )
    with pytest.raises(ValueError, match="round to nearest"):
        gptq_quantize(jnp.ones((8, 4)), jnp.eye(8), spec)


# -- sparsity (SparseGPT-style): pruned weights stay exactly 0 ---------------------------------


def two_four(w):
    """A 2:4 mask along the input axis: the two largest |w| of every 4 rows are kept."""
    k, n = w.shape
    rank = np.argsort(np.argsort(-np.abs(w).reshape(k // 4, 4, n), 1, kind="stable"), 1, kind="stable")
    return (rank < 2).reshape(k, n)


SPARSE_SPECS = {"int4_g32": (qjax.int4, 32), "int8": (qjax.int8, None)}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPARSE_SPECS))
def test_two_four_pattern_survives_exactly(name, act_order):
    fmt, group = SPARSE_SPECS[name]
    grouping = {} if group is None else dict(group_size=group, group_axis=0)
    spec = qjax.QuantSpec(fmt, channel_axes=(-1,), **grouping)
    w, h = problem(128, 24, seed=7)
    keep = two_four(w)
    wm = np.where(keep, w, 0.0).astype(np.float32)
    got = np.asarray(gptq_quantize(wm, h, spec, act_order=act_order, block_size=32).dequantize())
    assert np.all(got[~keep] == 0)
    assert (got.reshape(-1, 4, 24) != 0).sum(1).max() <= 2
    # The error of the pruned weights is still fed back: better than rounding the masked weight.
    rtn = np.asarray(qjax.quantize(wm, spec).dequantize())
    assert loss(got, wm, h) < 0.9 * loss(rtn, wm, h)
    if not (act_order and group):  # act_order + groups: static groups, no float64 reference
        order = np.argsort(-np.diag(h), kind="stable") if act_order else None
        want = reference_gptq(wm, h, fmt, group, order=order, keep=keep)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_asymmetric_keeps_zeros_at_the_zero_point():
    w, h = problem(64, 12, seed=9)
    keep = two_four(w + 0.7)
    wm = np.where(keep, w + 0.7, 0.0).astype(np.float32)
    spec = UINT4_G32_MINMAX
    q = gptq_quantize(wm, h, spec)
    got = np.asarray(q.dequantize())
    assert np.all(got[~keep] == 0)
    want = reference_gptq(wm, h, qjax.uint4, 32, symmetric=False, keep=keep)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_explicit_mask_equals_the_exact_zero_default():
    w, h = problem(64, 16, seed=8)
    keep = two_four(w)
    spec = int4_spec(32)
    default = gptq_quantize(np.where(keep, w, 0.0).astype(np.float32), h, spec)
    for weight in (w, np.where(keep, w, 0.0).astype(np.float32)):  # zeros absent / present
        explicit = gptq_quantize(weight, h, spec, masks=keep)
        np.testing.assert_array_equal(np.asarray(explicit.values), np.asarray(default.values))
        np.testing.assert_array_equal(np.asarray(explicit.scale), np.asarray(default.scale))


def _pruned_mlp():
    import flax.linen as nn

    from qjax import prune

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(x)))

    rng = np.random.default_rng(3)
    mix = rng.normal(size=(16, 16)).astype(np.float32)
    xs = [(jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32) @ mix),) for _ in range(2)]
    model = MLP()
    variables = model.init(jax.random.key(0), xs[0][0])
    pruner = prune.Magnitude(0.5, sparsity_type=prune.NM(2, 4, axis=-2), rules=[(r".*bias", None)])
    return model, variables, xs, pruner.masks(variables)


def test_gptq_keeps_a_pruned_models_pattern_and_takes_packed_masks():
    from qjax import prune
    from qjax.quant.gptq import gptq

    model, variables, xs, masks = _pruned_mlp()
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=spec)])
    pruned = gptq(model.apply, prune.apply_masks(variables, masks), xs, policy, act_order=True)
    given = gptq(model.apply, variables, xs, policy, act_order=True, masks=prune.pack_masks(masks))
    for name in ("fc1", "fc2"):
        keep = np.asarray(masks["params"][name]["kernel"])
        a, b = pruned["params"][name]["kernel"], given["params"][name]["kernel"]
        assert np.all(np.asarray(a.dequantize())[~keep] == 0)
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_mask_errors_name_the_leaf():
    from qjax.quant.gptq import gptq

    model, variables, xs, masks = _pruned_mlp()
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=int4_spec())])
    wrong_shape = jax.tree.map(lambda m: m, masks)
    wrong_shape["params"]["fc2"]["kernel"] = masks["params"]["fc2"]["kernel"][:4]
    with pytest.raises(ValueError, match=r"'params/fc2/kernel'.*mask shape \(4, 8\)"):
        gptq(model.apply, variables, xs, policy, masks=wrong_shape)
    with pytest.raises(ValueError, match=r"not leaves of params: \['params/fc3/kernel'\]"):
        gptq(model.apply, variables, xs, policy, masks={"params": {"fc3": {"kernel": np.ones((2, 2), bool)}}})
    with pytest.raises(TypeError, match=r"'params/fc1/kernel'.*boolean"):
        gptq(model.apply, variables, xs, policy, masks={"params": {"fc1": {"kernel": np.ones((16, 32))}}})
    w, h = problem(64, 8)
    with pytest.raises(ValueError, match=r"'k'.*mask shape"):
        gptq_quantize(w, h, int4_spec(), masks=np.ones((8, 64), bool), path="k")


def test_stages_collect_only_their_own_hessians_with_identical_results(monkeypatch):
    G = importlib.import_module("qjax.quant.gptq")  # the module (qjax.quant.gptq is also the function)
    rng = np.random.default_rng(3)
    d = 16
    w = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) / 4)
    params = {"embed": w(16, d), **{k: {"kernel": w(d, d)} for k in ("l.0", "l.1", "l2")}}

    def f(p, ids):
        x = p["embed"][ids]  # a gather: no Hessian
        for name in ("l.0", "l.1", "l2"):
            x = jnp.tanh(x @ p[name]["kernel"])
        return x

    batches = [(jnp.asarray(rng.integers(0, 16, size=(64,))),) for _ in range(2)]
    policy = qjax.Policy([qjax.Rule(r".*", weight=int4_spec(8))])
    stages = [r"l\.0/kernel", r"embed", r"l\.1/kernel"]  # l2: the final stage
    calls = []
    stats = G.input_statistics
    record = lambda *a, **k: calls.append(k.get("patterns")) or stats(*a, **k)
    monkeypatch.setattr(G, "input_statistics", record)
    got = G.gptq(f, params, batches, policy, stages=stages)
    # the first pass (float model) collects every matmul weight's Hessian; a stage of no matmul
    # weight makes no pass; later ones only their own kernels (the "." escaped)
    assert calls == [None, [r"l\.1/kernel"], [r"l2/kernel"]]
    calls.clear()
    every = lambda f, p, batches, todo, read, kwargs: G.input_statistics(f, p, batches, G.gram, **kwargs)
    monkeypatch.setattr(G, "_stage_statistics", every)  # the previous behaviour: every Hessian each stage
    want = G.gptq(f, params, batches, policy, stages=stages)
    assert calls == [None] * 4
    pairs = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want))
    for (pa, a), (pb, b) in pairs:
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(pa))


def _scan_and_unrolled():
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(32, use_bias=False, name="fc")(x)), None

    class Stacked(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan(name="layers")(x, None)[0]

    def unrolled(p, x):
        for i in range(2):
            x = jax.nn.relu(x @ p[f"fc{i}"])
        return x

    return Stacked(), unrolled


@pytest.mark.parametrize(
    "spec",
    [
        qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0),
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,), symmetric=False),
    ],
    ids=["int4-g16", "int8-asym"],
)
def test_scan_stack_equals_the_unrolled_model_layer_by_layer(spec):
    # An nn.scan stack (L, K, N) used to get plain round-to-nearest without a word.
    stacked, unrolled = _scan_and_unrolled()
    x = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 3, 32)
    v = stacked.init(jax.random.key(1), x)
    k = v["params"]["layers"]["fc"]["kernel"]
    flat = {"fc0": k[0], "fc1": k[1]}
    stack_spec = spec.replace(channel_axes=(0, -1), group_axis=None if spec.group_size is None else 1)
    q_stack = qjax.gptq(stacked.apply, v, [(x,)], qjax.Policy([qjax.Rule(r".*kernel", weight=stack_spec)]))
    q_flat = qjax.gptq(unrolled, flat, [(x,)], qjax.Policy([qjax.Rule(r"fc\d", weight=spec)]))
    got = np.asarray(q_stack["params"]["layers"]["fc"]["kernel"].dequantize())
    for i in range(2):
        np.testing.assert_array_equal(got[i], np.asarray(q_flat[f"fc{i}"].dequantize()))
    rtn = qjax.quantize_params(v, qjax.Policy([qjax.Rule(r".*kernel", weight=stack_spec)]))
    assert not np.array_equal(got, np.asarray(rtn["params"]["layers"]["fc"]["kernel"].dequantize()))


def test_einsum_expert_weights_get_per_expert_gptq_with_the_shared_hessian():
    rng = np.random.default_rng(3)
    x = jnp.asarray(
        rng.normal(size=(96, 32)).astype(np.float32) @ rng.normal(size=(32, 32)).astype(np.float32)
    )
    w = {"w_in": jnp.asarray(rng.normal(size=(3, 32, 16)).astype(np.float32))}
    f = lambda p, x: jnp.einsum("nd,edf->nef", x, p["w_in"])  # every expert sees every token
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(0, -1), group_size=16, group_axis=1)
    q = qjax.gptq(f, w, [(x[:48],), (x[48:],)], qjax.Policy([qjax.Rule("w_in", weight=spec)]))
    h = input_hessians(f, w, [(x[:48],), (x[48:],)])["w_in"]
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(h), x64.T @ x64 / 96, rtol=1e-5, atol=1e-4)
    spec2 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0)
    got = np.asarray(q["w_in"].dequantize())
    for e in range(3):
        want = gptq_quantize(w["w_in"][e], h, spec2)
        np.testing.assert_array_equal(got[e], np.asarray(want.dequantize()))
    rtn = qjax.quantize(w["w_in"], spec)
    assert not np.array_equal(got, np.asarray(rtn.dequantize()))


def test_stacked_leaf_without_per_slice_scales_and_convs_warn_and_round_to_nearest():
    stacked, _ = _scan_and_unrolled()
    x = jax.random.normal(jax.random.key(0), (8, 32))
    v = stacked.init(jax.random.key(1), x)
    shared = qjax.Policy([qjax.Rule(r".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))])
    with pytest.warns(UserWarning, match=r"'params/layers/fc/kernel'.*axes \[0\].*channel_axes=\(0, -1\)"):
        q = qjax.gptq(stacked.apply, v, [(x,)], shared)  # one scale across both layers
    rtn = qjax.quantize_params(v, shared)["params"]["layers"]["fc"]["kernel"]
    np.testing.assert_array_equal(q["params"]["layers"]["fc"]["kernel"].values, rtn.values)
    conv = lambda p, x: jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    p = {"k": jax.random.normal(jax.random.key(2), (3, 3, 4, 8))}
    xc = jax.random.normal(jax.random.key(3), (2, 6, 6, 4))
    policy = qjax.Policy([qjax.Rule("k", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))])
    with pytest.warns(UserWarning, match=r"'k' is read by 'conv_general_dilated'.*rounded to nearest"):
        q = qjax.gptq(conv, p, [(xc,)], policy)
    np.testing.assert_array_equal(q["k"].dequantize(), qjax.quantize_params(p, policy)["k"].dequantize())


def _mha():
    import flax.linen as nn

    m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(4, 5, 16)).astype(np.float32) @ mix)
    return m, m.init(jax.random.key(1), x, x), x


def test_attention_out_kernel_is_gptqd_flattened_over_heads():
    # Its matmul "nhk,hkd->nd" contracts two leaf axes: the whole gptq call used to raise.
    m, v, x = _mha()
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(r".*out/kernel", weight=spec)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = qjax.gptq(m.apply, v, [(x, x)], policy)
    k = v["params"]["out"]["kernel"]  # (heads, head_dim, features)
    h = input_hessians(m.apply, v, [(x, x)], patterns=[r".*out/kernel"])["params/out/kernel"]
    want = gptq_quantize(k.reshape(16, 16), h, spec)  # the explicitly flattened 2-D weight
    got = q["params"]["out"]["kernel"]
    assert got.scale.shape == (1, 1, 16)
    codes = lambda a: np.asarray(qjax.quantize(a.dequantize(), spec, scale=a.scale).values)
    np.testing.assert_array_equal(codes(got).reshape(16, -1), np.asarray(want.values))
    np.testing.assert_array_equal(np.asarray(got.dequantize()).reshape(16, 16), np.asarray(want.dequantize()))
    rtn = qjax.quantize_params(v, policy)
    y, run = m.apply(v, x, x), qjax.quantized(m.apply, policy)
    err = lambda p: float(jnp.mean((run(p, x, x) - y) ** 2))
    assert err(q) < err(rtn)


def test_attention_kernels_gptq_cannot_honour_warn_and_round_to_nearest():
    # With ".*kernel" per last axis, q/k/v (D, H, hd) share scales across heads; with per
    # (head_dim, features) scales the out kernel has scales along its contracted head axis.
    m, v, x = _mha()
    for spec, leaves, hint in [
        (qjax.QuantSpec(qjax.int4, channel_axes=(-1,)), ("key", "query", "value"), r"channel_axes=\(1, -1\)"),
        (qjax.QuantSpec(qjax.int4, channel_axes=(-2, -1)), ("out",), r"channel_axes=\(-1,\)"),
    ]:
        policy = qjax.Policy([qjax.Rule(r".*kernel", weight=spec)])
        with pytest.warns(UserWarning) as record:
            q = qjax.gptq(m.apply, v, [(x, x)], policy)
        assert sorted(_warned_leaves(record)) == [f"params/{leaf}/kernel" for leaf in leaves]
        assert all(re.search(rf"{hint}.*rounded to nearest", str(w.message)) for w in record)
        rtn = qjax.quantize_params(v, policy)["params"]
        for leaf in leaves:
            np.testing.assert_array_equal(q["params"][leaf]["kernel"].values, rtn[leaf]["kernel"].values)


def _warned_leaves(record) -> list[str]:
    """The leaves a ``gptq`` call warned it rounds to nearest."""
    return [m.group(1) for w in record if (m := re.search(r"GPTQ of '([^']+)'", str(w.message)))]


def test_nnx_attention_gptq_runs():
    from flax import nnx

    m = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=nnx.Rngs(0))
    gd, st = nnx.split(m)
    f = qjax.nnx_apply(gd)
    x = jax.random.normal(jax.random.key(0), (4, 5, 16))
    policy = qjax.Policy([qjax.Rule(r".*kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)))])
    with pytest.warns(UserWarning) as record:
        q = qjax.gptq(f, st, [(x,)], policy)
    assert sorted(_warned_leaves(record)) == ["key/kernel", "query/kernel", "value/kernel"]
    rtn = qjax.quantize_params(st, policy)
    assert not np.array_equal(q["out"]["kernel"].values, rtn["out"]["kernel"].values)  # GPTQ'd
