"""``fake_quantized(..., act_stats_momentum=qjax.DelayedScaling(h))``: static activation scales
from a history of earlier steps' ranges, against a float64 reference of the forward pass and
of the history's update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# the EMA tests' model, data and float64 quantizer
from test_act_ema import A8, POLICY, W8, Stack, _fq, _params, _x, mlp

import qjax
from qjax.quant.act_delayed import ActHistory


def _reference(p, x, hist: dict):
    """float64: the MLP with per-channel int8 weights and static int8 activations scaled by
    the max of each layer's history; returns the output and each layer's batch absmax."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    h, seen = np.asarray(x, np.float64), {}
    for name in ("w1", "w2"):
        w = _fq(p[name], np.abs(p[name]).max(0))
        seen[name] = np.abs(h).max()
        h = _fq(h, np.asarray(hist[name].hi, np.float64).max()) @ w
        if name == "w1":
            h = np.maximum(h + p["b1"], 0)
    return h, seen


def test_init_repeats_the_calibrated_range_and_ranges_reduce_the_history():
    p = _params()
    stats = qjax.calibrate(mlp, POLICY, p, [_x(2)])
    delayed = qjax.DelayedScaling(history=3)
    hist = delayed.init(stats)
    assert set(hist) == {"w1", "w2"} and all(isinstance(h, ActHistory) for h in hist.values())
    assert hist["w1"].hi.shape == (3,)
    np.testing.assert_array_equal(hist["w1"].hi, np.full(3, float(stats["w1"].hi), np.float32))
    h = ActHistory(jnp.asarray([-1.0, -4.0, -2.0]), jnp.asarray([3.0, 1.0, 2.0]))
    back = delayed.ranges({"w1": h})["w1"]
    assert (float(back.lo), float(back.hi)) == (-4.0, 3.0)


def test_the_scale_comes_from_earlier_steps_and_the_batch_range_is_pushed():
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [_x(2, 0.3)])  # narrower than x: x clips this step
    delayed = qjax.DelayedScaling(history=4)
    hist = delayed.init(stats)
    step = jax.jit(qjax.fake_quantized(mlp, POLICY, act_stats_momentum=delayed))
    y, new = step(p, hist, x)
    want_y, seen = _reference(p, x, hist)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    # the same output as the fixed calibrated scales: this batch did not move its own scale
    fixed = qjax.fake_quantized(mlp, POLICY, act_stats=stats)(p, x)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6 * np.abs(want_y).max())
    for name in ("w1", "w2"):
        old = float(stats[name].hi)
        np.testing.assert_allclose(new[name].hi, [old, old, old, seen[name]], rtol=1e-6)
        np.testing.assert_allclose(new[name].lo, [-old, -old, -old, -seen[name]], rtol=1e-6)
    # the next step quantizes with the pushed range: as fixed stats of the window's max
    y2, _ = step(p, new, x)
    fixed2 = qjax.fake_quantized(mlp, POLICY, act_stats=delayed.ranges(new))(p, x)
    np.testing.assert_allclose(y2, fixed2, rtol=1e-6, atol=1e-6 * float(jnp.abs(fixed2).max()))
    assert not np.allclose(y2, y)


def test_an_outlier_batch_stays_in_the_scale_for_exactly_history_steps():
    p, calm = _params(), _x(1)
    delayed = qjax.DelayedScaling(history=3)
    hist = delayed.init(qjax.calibrate(mlp, POLICY, p, [calm]))
    step = jax.jit(qjax.fake_quantized(mlp, POLICY, act_stats_momentum=delayed))
    calm_amax = float(jnp.abs(calm).max())
    _, hist = step(p, hist, 10 * calm)  # the outlier saturates in its own step, then is remembered
    amaxes = []
    for _ in range(4):
        amaxes.append(float(delayed.ranges(hist)["w1"].hi))
        _, hist = step(p, hist, calm)
    assert amaxes[:3] == pytest.approx([10 * calm_amax] * 3, rel=1e-6)
    assert amaxes[3] == pytest.approx(calm_amax, rel=1e-6)  # pushed out after 3 steps


def test_asymmetric_ranges_push_both_ends():
    policy = qjax.Policy([qjax.Rule(r"w\d", weight=W8, act=qjax.QuantSpec(qjax.int8, symmetric=False))])
    p, x = _params(), _x(1) + 2.0
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(mlp, policy, p, [_x(2)]))
    _, new = qjax.fake_quantized(mlp, policy, act_stats_momentum=delayed)(p, hist, x)
    assert float(new["w1"].lo[-1]) == pytest.approx(float(x.min()), rel=1e-6)
    assert float(new["w1"].hi[-1]) == pytest.approx(float(x.max()), rel=1e-6)
    assert float(new["w1"].lo[0]) == float(hist["w1"].lo[1])


def test_params_train_and_the_history_gets_no_gradient():
    p, x = _params(), _x(1)
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(mlp, POLICY, p, [_x(2, 0.5)]))
    g = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=delayed)

    def loss(p, hist):
        y, new = g(p, hist, x)
        return jnp.sum(y**2), new

    (gp, gh), new = jax.grad(loss, argnums=(0, 1), has_aux=True)(p, hist)
    assert all(bool(jnp.all(jnp.isfinite(v))) and float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(gp))
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(gh))
    assert float(new["w1"].hi[-1]) != float(hist["w1"].hi[-1])


def test_reads_of_one_weight_push_their_largest_range():
    p, x = {"w1": _params()["w1"]}, _x(1)
    policy = qjax.Policy([qjax.Rule("w1", weight=W8, act=A8)])
    f = lambda p, x: x @ p["w1"] + (3.0 * x) @ p["w1"]
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(f, policy, p, [x]))
    _, new = qjax.fake_quantized(f, policy, act_stats_momentum=delayed)(p, hist, x)
    assert float(new["w1"].hi[-1]) == pytest.approx(3 * float(jnp.abs(x).max()), rel=1e-6)


@pytest.mark.parametrize("loop", ["scan", "while_loop"])
def test_a_weight_read_in_every_iteration_pushes_the_largest_iteration(loop):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)) * 0.6, jnp.float32)
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    body = lambda h, p: 2.0 * jnp.tanh(h @ p["w"])
    if loop == "scan":
        f = lambda p, x, n: jax.lax.fori_loop(0, 3, lambda i, h: body(h, p), x)
    else:
        f = lambda p, x, n: jax.lax.fori_loop(0, n, lambda i, h: body(h, p), x)
    p, x = {"w": w}, _x(1, 0.1)
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(f, policy, p, [(x, 3)]))
    _, new = jax.jit(qjax.fake_quantized(f, policy, act_stats_momentum=delayed))(p, hist, x, 3)
    wq = _fq(np.asarray(w, np.float64), np.abs(np.asarray(w, np.float64)).max(0))
    h, scale_amax, seen = np.asarray(x, np.float64), float(hist["w"].hi.max()), []
    for _ in range(3):  # float64: every iteration quantizes with the history's scale
        seen.append(np.abs(h).max())
        h = 2.0 * np.tanh(_fq(h, scale_amax) @ wq)
    assert float(new["w"].hi[-1]) == pytest.approx(max(seen), rel=1e-5)


def test_inside_a_shard_map_the_largest_shard_range_is_pushed():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    p, x = {"w1": _params()["w1"]}, _x(1)
    policy = qjax.Policy([qjax.Rule("w1", weight=W8, act=A8)])

    def f(p, x):
        body = lambda w, x: x @ w
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(p["w1"], x)

    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(f, policy, p, [0.5 * x]))
    with jax.set_mesh(mesh):
        _, new = jax.jit(qjax.fake_quantized(f, policy, act_stats_momentum=delayed))(p, hist, x)
    assert float(new["w1"].hi[-1]) == pytest.approx(float(jnp.abs(x).max()), rel=1e-6)  # global amax


@pytest.mark.parametrize("history", [3, 4])
def test_a_row_parallel_weight_in_a_shard_map_quantizes_with_the_whole_history(history):
    """The walk is given each history's range, not the history: a weight split along K (its
    scale replicated) must not have its history's time axis split over the shards too."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    r = np.random.default_rng(0)
    p = {"w": jnp.asarray(r.normal(size=(8, 4)), jnp.float32)}
    x = jnp.asarray(r.normal(size=(2, 8)), jnp.float32)

    def f(p, x):
        body = lambda w, x: jax.lax.psum(x @ w, "data")
        return jax.shard_map(body, mesh=mesh, in_specs=(P("data", None), P(None, "data")), out_specs=P())(
            p["w"], x
        )

    delayed = qjax.DelayedScaling(history)
    hi = jnp.asarray([0.1] * (history - 1) + [float(jnp.abs(x).max())], jnp.float32)
    hist = {"w": ActHistory(-hi, hi)}
    with jax.set_mesh(mesh):
        y, new = jax.jit(qjax.fake_quantized(f, policy, act_stats_momentum=delayed))(p, hist, 2 * x)
        fixed = jax.jit(qjax.fake_quantized(f, policy, act_stats=delayed.ranges(hist)))(p, 2 * x)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6 * float(jnp.abs(fixed).max()))
    np.testing.assert_allclose(new["w"].hi, [*hi[1:], 2 * float(jnp.abs(x).max())], rtol=1e-6)


def test_a_scanned_weight_with_one_shared_range_pushes_the_layers_max():
    policy = qjax.Policy([qjax.Rule("w", weight=W8.replace(channel_axes=(0, -1)), act=A8)])
    r = np.random.default_rng(0)
    p = {"w": jnp.asarray(r.normal(size=(3, 8, 8)) * 0.5, jnp.float32)}
    f = lambda p, x: jax.lax.scan(lambda h, w: (2.0 * jnp.tanh(h @ w), None), x, p["w"])[0]
    x = jnp.asarray(r.normal(size=(4, 8)), jnp.float32)
    stats = qjax.calibrate(f, policy, p, [x])
    shared = {"w": qjax.ActStats(jnp.min(stats["w"].lo), jnp.max(stats["w"].hi))}  # one range, 3 layers
    delayed = qjax.DelayedScaling(history=3)  # as long as the stack: must not be taken for its layers
    hist = delayed.init(shared)
    y, new = qjax.fake_quantized(f, policy, act_stats_momentum=delayed)(p, hist, x)
    fixed = qjax.fake_quantized(f, policy, act_stats=shared)(p, x)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6)
    assert new["w"].hi.shape == (3,)
    h, amax, seen = np.asarray(x, np.float64), float(shared["w"].hi), []
    for w in np.asarray(p["w"], np.float64):  # float64: every layer quantizes with the shared range
        seen.append(np.abs(h).max())
        h = 2.0 * np.tanh(_fq(h, amax) @ _fq(w, np.abs(w).max(0)))
    assert float(new["w"].hi[-1]) == pytest.approx(max(seen), rel=1e-5)  # the layers' max
    assert float(new["w"].hi[0]) == pytest.approx(amax, rel=1e-6)


def test_an_untaken_branch_and_a_nan_batch_keep_their_history():
    p = _params()
    f = lambda p, x, pick: jax.lax.cond(pick, lambda: x @ p["w1"], lambda: (2 * x) @ p["w1"]) @ p["w2"]
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(f, POLICY, p, [(_x(2), True), (_x(3), False)]))
    step = jax.jit(qjax.fake_quantized(f, POLICY, act_stats_momentum=delayed))
    for value in (jnp.nan, jnp.inf):
        y, new = step(p, hist, _x(1).at[0, 0].set(value), True)
        np.testing.assert_array_equal(new["w1"].hi, hist["w1"].hi)  # nothing pushed
        assert not bool(jnp.isfinite(y).all())
    _, later = step(p, hist, _x(1), True)
    assert bool(jnp.isfinite(later["w1"].hi).all()) and float(later["w1"].hi[-1]) != float(hist["w1"].hi[-1])


def test_scan_stack_histories_are_per_layer_and_export_exactly():
    x = _x(1, shape=(4, 16))
    v = Stack().init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8.replace(channel_axes=(0, -1)), act=A8)])
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(Stack().apply, policy, v, [0.5 * x]))
    step = jax.jit(qjax.fake_quantized(Stack().apply, policy, act_stats_momentum=delayed))
    _, hist = step(v, hist, x)
    y, new = step(v, hist, x)
    (h,) = new.values()
    assert h.hi.shape == (3, 2)
    assert float(h.hi[0, -1]) == pytest.approx(float(jnp.abs(x).max()), rel=1e-6)  # layer 0 reads x
    assert len(set(np.asarray(h.hi[:, -1]).round(6))) == 3  # each layer its own input range
    # the scales the last step trained with: the ranges of the state passed into it
    served = qjax.quantized(Stack().apply, policy, backend="xla")(
        qjax.quantize_params(v, policy, act_stats=delayed.ranges(hist)), x
    )
    np.testing.assert_allclose(y, served, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))


def test_an_op_rule_entry_keeps_a_history_too():
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=A8, rhs=A8)])

    def attention(p, q, k):
        with jax.named_scope("scores"):
            return jnp.einsum("qd,kd->qk", q, k)

    q, k = _x(1), _x(2, 2.0)
    delayed = qjax.DelayedScaling(history=2)
    hist = delayed.init(qjax.calibrate(attention, policy, {}, [(q, k)]))
    assert {key.rsplit(":", 1)[1] for key in hist} == {"lhs", "rhs"}
    _, new = qjax.fake_quantized(attention, policy, act_stats_momentum=delayed)({}, hist, 3 * q, k)
    (lhs,) = [key for key in new if key.endswith(":lhs")]
    assert float(new[lhs].hi[-1]) == pytest.approx(3 * float(jnp.abs(q).max()), rel=1e-6)
    assert float(new[lhs].hi[0]) == pytest.approx(float(jnp.abs(q).max()), rel=1e-6)


@pytest.mark.parametrize("history", [0, -2, 1.5, True, "16", np.int64(0)])
def test_bad_history_is_refused(history):
    with pytest.raises(ValueError, match="history must be an integer"):
        qjax.DelayedScaling(history=history)


def test_a_numpy_integer_history_is_taken():
    delayed = qjax.DelayedScaling(history=np.int64(4))
    assert delayed.history == 4 and type(delayed.history) is int


def test_misuse_is_refused_by_name():
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [x])
    delayed = qjax.DelayedScaling(history=4)
    g = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=delayed)
    with pytest.raises(TypeError, match=r"DelayedScaling.init.*entry 'w1' is of type ActStats"):
        g(p, stats, x)  # calibrated stats given as they are
    with pytest.raises(TypeError, match="got Array"):
        g(p, x)  # the state forgotten
    with pytest.raises(ValueError, match=r"act_stats\['w1'\].*history of 4 steps"):
        g(p, qjax.DelayedScaling(history=2).init(stats), x)
    hist = delayed.init(stats)
    with pytest.raises(ValueError, match=r"w1.*ActHistory.*DelayedScaling.ranges"):
        qjax.quantize_params(p, POLICY, act_stats=hist)  # the running state, not its ranges
    with pytest.raises(ValueError, match=r"not leaves.*'w3'"):
        g(p, {**hist, "w3": hist["w1"]}, x)
    with pytest.raises(TypeError, match="takes \\{path: ActStats\\}"):
        delayed.init(hist)
    with pytest.raises(TypeError, match=r"^DelayedScaling.ranges takes"):
        delayed.ranges(stats)
    with pytest.raises(TypeError, match=r"ActHistory.*DelayedScaling\("):
        qjax.fake_quantized(mlp, POLICY, act_stats_momentum=0.9)(p, hist, x)  # EMA given histories


def test_histories_given_where_ranges_are_expected_say_so():
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=A8, rhs=A8)])

    def attention(p, q, k):
        with jax.named_scope("scores"):
            return jnp.einsum("qd,kd->qk", q, k)

    q, k = _x(1), _x(2)
    hist = qjax.DelayedScaling(2).init(qjax.calibrate(attention, policy, {}, [(q, k)]))
    with pytest.raises(TypeError, match=r"ActHistory.*DelayedScaling.ranges"):
        qjax.quantized(attention, policy, op_stats=hist)({}, q, k)
    lhs, rhs = sorted(hist)
    with pytest.raises(TypeError, match=r"ActHistory.*DelayedScaling.ranges"):
        qjax.kv_cache_scales(hist, keys=rhs, values=lhs, spec=A8)


def test_empty_running_stats_warn_that_everything_stays_dynamic():
    p, x = _params(), _x(1)
    g = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=qjax.DelayedScaling(2))
    with pytest.warns(UserWarning, match="running stats are empty"):
        _, new = g(p, {}, x)
    assert new == {}


def test_exporting_a_scan_stack_with_scales_shared_across_layers_warns():
    """Per-layer act stats show the leaf is a stack; a weight spec without axis 0 would
    export one scale for all layers, unlike the per-layer scales QAT trained with."""
    r = np.random.default_rng(0)
    p = {"w": jnp.asarray(r.normal(size=(3, 8, 8)) * 0.5, jnp.float32)}
    f = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    x = jnp.asarray(r.normal(size=(4, 8)), jnp.float32)
    shared = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])  # channel_axes=(-1,)
    per_layer = qjax.Policy([qjax.Rule("w", weight=W8.replace(channel_axes=(0, -1)), act=A8)])
    stats = qjax.calibrate(f, shared, p, [x])
    assert stats["w"].hi.shape == (3,)
    with pytest.warns(UserWarning, match=r"leaf 'w'.*nn.scan stack.*add axis 0"):
        qjax.quantize_params(p, shared, act_stats=stats)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qjax.quantize_params(p, per_layer, act_stats=stats)
