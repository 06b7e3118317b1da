"""``fake_quantized(..., act_stats_momentum=m)``: running-average static activation ranges
for QAT, against a float64 reference of the update and of the forward pass it quantizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qjax
from qjax.quant.calibrate import ActStats

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8)
POLICY = qjax.Policy([qjax.Rule(r"w\d", weight=W8, act=A8)])


def mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _params(seed=0, k=6, h=16, n=4):
    r = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(r.normal(size=(k, h)), jnp.float32),
        "b1": jnp.asarray(r.normal(size=(h,)) * 0.1, jnp.float32),
        "w2": jnp.asarray(r.normal(size=(h, n)), jnp.float32),
    }


def _x(seed, scale=1.0, shape=(8, 6)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _fq(v, amax):
    """float64 symmetric int8 fake quantization with scale ``amax / 127`` (ties to even)."""
    s = np.asarray(amax, np.float64) / 127
    return np.clip(np.round(v / s), -128, 127) * s


def _reference(p, x, old: dict, m: float):
    """float64: the MLP with per-channel int8 weights and static int8 activations whose
    absmax ranges move from ``old`` toward each layer's batch absmax, layer by layer."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    w1, w2 = (_fq(p[k], np.abs(p[k]).max(0)) for k in ("w1", "w2"))
    new = {}
    h = np.asarray(x, np.float64)
    for name, w in (("w1", w1), ("w2", w2)):
        new[name] = m * float(old[name].hi) + (1 - m) * np.abs(h).max()
        h = _fq(h, new[name]) @ w
        if name == "w1":
            h = np.maximum(h + p["b1"], 0)
    return h, new


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_ranges_move_toward_the_batch_and_the_forward_uses_the_moved_ranges(m):
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [_x(2, 0.3)])  # narrower than x: x would clip
    ema = jax.jit(qjax.fake_quantized(mlp, POLICY, act_stats_momentum=m))
    y, new = ema(p, stats, x)
    want_y, want = _reference(p, x, stats, m)
    for name in ("w1", "w2"):
        assert float(new[name].hi) == pytest.approx(want[name], rel=1e-6)
        assert float(new[name].lo) == pytest.approx(-want[name], rel=1e-6)  # absmax: symmetric
        assert new[name].count == stats[name].count
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    fixed = qjax.fake_quantized(mlp, POLICY, act_stats=new)(p, x)  # the same as fixed moved stats
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6 * np.abs(want_y).max())


def test_asymmetric_minmax_ranges_update_both_ends():
    policy = qjax.Policy([qjax.Rule(r"w\d", weight=W8, act=qjax.QuantSpec(qjax.int8, symmetric=False))])
    p, x = _params(), _x(1) + 2.0
    stats = qjax.calibrate(mlp, policy, p, [_x(2)])
    _, new = qjax.fake_quantized(mlp, policy, act_stats_momentum=0.75)(p, stats, x)
    lo, hi = float(x.min()), float(x.max())
    assert float(new["w1"].lo) == pytest.approx(0.75 * float(stats["w1"].lo) + 0.25 * lo, rel=1e-6)
    assert float(new["w1"].hi) == pytest.approx(0.75 * float(stats["w1"].hi) + 0.25 * hi, rel=1e-6)


def test_repeated_steps_converge_geometrically_to_the_batch_range():
    """With a fixed batch the first layer's range follows ``b + m^n (r0 - b)``."""
    p, x, m = _params(), _x(1), 0.8
    stats = qjax.calibrate(mlp, POLICY, p, [_x(2, 0.1)])
    r0, b = float(stats["w1"].hi), float(jnp.abs(x).max())
    ema = jax.jit(qjax.fake_quantized(mlp, POLICY, act_stats_momentum=m))
    for _ in range(12):
        _, stats = ema(p, stats, x)
    assert float(stats["w1"].hi) == pytest.approx(b + m**12 * (r0 - b), rel=1e-5)


def test_params_train_and_the_ranges_get_no_gradient():
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [_x(2, 0.5)])
    ema = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=0.9)

    def loss(p, stats):
        y, new = ema(p, stats, x)
        return jnp.sum(y**2), new

    (gp, gs), new = jax.grad(loss, argnums=(0, 1), has_aux=True)(p, stats)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gp))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(gs))
    assert float(new["w1"].hi) != float(stats["w1"].hi)


def test_a_weight_read_twice_averages_its_reads():
    p, x = {"w1": _params()["w1"]}, _x(1)
    policy = qjax.Policy([qjax.Rule("w1", weight=W8, act=A8)])
    f = lambda p, x: x @ p["w1"] + (3.0 * x) @ p["w1"]
    stats = qjax.calibrate(f, policy, p, [x])
    _, new = qjax.fake_quantized(f, policy, act_stats_momentum=0.5)(p, stats, x)
    a = float(jnp.abs(x).max())
    reads = [0.5 * float(stats["w1"].hi) + 0.5 * a, 0.5 * float(stats["w1"].hi) + 0.5 * 3 * a]
    assert float(new["w1"].hi) == pytest.approx(np.mean(reads), rel=1e-6)


def test_an_untaken_branch_and_a_nan_batch_keep_their_ranges():
    p = _params()
    f = lambda p, x, pick: jax.lax.cond(pick, lambda: x @ p["w1"], lambda: (2 * x) @ p["w1"]) @ p["w2"]
    stats = qjax.calibrate(f, POLICY, p, [(_x(2), True), (_x(3), False)])
    ema = jax.jit(qjax.fake_quantized(f, POLICY, act_stats_momentum=0.9))
    _, new = ema(p, stats, _x(1), True)
    assert float(new["w1"].hi) != float(stats["w1"].hi)  # the taken branch updated it
    for value in (jnp.nan, jnp.inf):  # e.g. a bf16 overflow: the step is skipped, the stats must not be
        y, new = ema(p, stats, _x(1).at[0, 0].set(value), True)
        assert float(new["w1"].hi) == float(stats["w1"].hi)  # kept, not NaN / Inf
        assert not bool(jnp.isfinite(y).all())  # the output shows the bad input; the state does not
    _, later = ema(p, new, _x(1), True)
    assert bool(jnp.isfinite(later["w1"].hi))


class Stack(nn.Module):
    """Three Dense + ReLU layers as one ``nn.scan`` stack (kernels ``(3, 16, 16)``)."""

    @nn.compact
    def __call__(self, x):
        block = nn.scan(
            lambda m, h, _: (nn.relu(nn.Dense(16)(h)), None),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        return block(self, x, None)[0]


def test_scan_stack_ranges_are_per_layer():
    x = _x(1, shape=(4, 16))
    v = Stack().init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8.replace(channel_axes=(0, -1)), act=A8)])
    stats = qjax.calibrate(Stack().apply, policy, v, [0.5 * x])
    ema = qjax.fake_quantized(Stack().apply, policy, act_stats_momentum=0.5)
    y, new = jax.jit(ema)(v, stats, x)
    ((path, old),) = stats.items()
    assert new[path].hi.shape == (3,)
    assert float(new[path].hi[0]) == pytest.approx(0.5 * float(old.hi[0]) + 0.5 * float(jnp.abs(x).max()))
    fixed = qjax.fake_quantized(Stack().apply, policy, act_stats=new)(v, x)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6 * float(jnp.abs(y).max()))
    served = qjax.quantized(Stack().apply, policy, backend="xla")(
        qjax.quantize_params(v, policy, act_stats=new), x
    )
    np.testing.assert_allclose(y, served, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))


def test_int8_training_takes_the_running_ranges():
    policy = qjax.Policy([qjax.Rule(r"w\d", weight=W8, act=A8, grad=qjax.QuantSpec(qjax.int8))])
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, policy, p, [_x(2, 0.5)])
    ema = qjax.fake_quantized(mlp, policy, act_stats_momentum=0.9)
    g, new = jax.grad(lambda p: (lambda y, s: (jnp.sum(y**2), s))(*ema(p, stats, x)), has_aux=True)(p)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    _, want = _reference(p, x, stats, 0.9)
    assert float(new["w1"].hi) == pytest.approx(want["w1"], rel=1e-6)


@pytest.mark.parametrize("momentum", [1.0, -0.1, float("nan"), "fast"])
def test_bad_momentum_is_refused(momentum):
    with pytest.raises(ValueError, match="act_stats_momentum"):
        qjax.fake_quantized(mlp, POLICY, act_stats_momentum=momentum)


def test_misuse_is_refused_by_name():
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [x])
    with pytest.raises(ValueError, match="do not also give act_stats"):
        qjax.fake_quantized(mlp, POLICY, act_stats=stats, act_stats_momentum=0.9)
    ema = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=0.9)
    with pytest.raises(TypeError, match="second argument"):
        ema(p, x)  # the stats forgotten
    with pytest.raises(ValueError, match=r"not leaves.*'w3'"):
        ema(p, {**stats, "w3": stats["w1"]}, x)
    dynamic = qjax.Policy([qjax.Rule(r"w\d", weight=W8, act=A8.replace(channel_axes=qjax.PER_TOKEN))])
    with pytest.raises(ValueError, match="not per-tensor"):
        qjax.fake_quantized(mlp, dynamic, act_stats_momentum=0.9)(p, stats, x)


def test_only_the_given_leaves_are_static():
    p, x = _params(), _x(1)
    stats = qjax.calibrate(mlp, POLICY, p, [x])
    with pytest.warns(UserWarning, match=r"no entry for \['w2'\].*keep dynamic scales"):
        y, new = qjax.fake_quantized(mlp, POLICY, act_stats_momentum=0.9)(p, {"w1": stats["w1"]}, x)
    assert set(new) == {"w1"}
    fixed = qjax.fake_quantized(mlp, POLICY, act_stats={"w1": new["w1"]})(p, x)  # w2 dynamic in both
    np.testing.assert_allclose(y, fixed, rtol=1e-6)
    assert isinstance(new["w1"], ActStats)


def test_an_expert_weight_of_a_ragged_dot_updates_from_its_grouped_rows():
    """Rows past the groups (padding) do not count toward the batch range."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(14, 8)), jnp.float32).at[12:].set(50.0)  # 2 padding rows
    p = {"experts": jnp.asarray(r.normal(size=(3, 8, 4)), jnp.float32)}
    sizes = jnp.asarray([5, 0, 7], jnp.int32)
    moe = lambda p, x, sizes: jax.lax.ragged_dot(x, p["experts"], sizes)
    policy = qjax.Policy(
        [qjax.Rule("experts", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, 2)), act=A8)]
    )
    stats = qjax.calibrate(moe, policy, p, [(0.5 * x, sizes)])
    y, new = qjax.fake_quantized(moe, policy, act_stats_momentum=0.5)(p, stats, x, sizes)
    want = 0.5 * float(stats["experts"].hi) + 0.5 * float(jnp.abs(x[:12]).max())
    assert float(new["experts"].hi) == pytest.approx(want, rel=1e-6)
    fixed = qjax.fake_quantized(moe, policy, act_stats=new)(p, x, sizes)
    np.testing.assert_allclose(y, fixed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loop", ["scan", "while_loop"])
def test_a_weight_read_in_every_iteration_averages_the_iterations(loop):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)) * 0.6, jnp.float32)
    policy = qjax.Policy([qjax.Rule("w", weight=W8, act=A8)])
    body = lambda i, h, p: jnp.tanh(h @ p["w"])
    if loop == "scan":  # a static trip count: fori_loop lowers to a scan over a constant weight
        f = lambda p, x, n: jax.lax.fori_loop(0, 3, lambda i, h: body(i, h, p), x)
    else:
        f = lambda p, x, n: jax.lax.fori_loop(0, n, lambda i, h: body(i, h, p), x)
    p, x, m = {"w": w}, _x(1), 0.5
    stats = qjax.calibrate(f, policy, p, [(0.2 * x, 3)])
    _, new = jax.jit(qjax.fake_quantized(f, policy, act_stats_momentum=m))(p, stats, x, 3)
    wq = _fq(np.asarray(w, np.float64), np.abs(np.asarray(w, np.float64)).max(0))
    h, ranges = np.asarray(x, np.float64), []
    for _ in range(3):  # float64: each iteration's moved range, and the activation it quantizes
        ranges.append(m * float(stats["w"].hi) + (1 - m) * np.abs(h).max())
        h = np.tanh(_fq(h, ranges[-1]) @ wq)
    assert float(new["w"].hi) == pytest.approx(np.mean(ranges), rel=1e-5)


def test_inside_a_shard_map_each_shard_updates_from_its_rows_and_the_updates_average():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    p, x = {"w1": _params()["w1"]}, _x(1)
    policy = qjax.Policy([qjax.Rule("w1", weight=W8, act=A8)])

    def f(p, x):
        body = lambda w, x: x @ w
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(p["w1"], x)

    stats = qjax.calibrate(f, policy, p, [0.5 * x])
    with jax.set_mesh(mesh):
        _, new = jax.jit(qjax.fake_quantized(f, policy, act_stats_momentum=0.5))(p, stats, x)
    shards = [float(jnp.abs(x[2 * i : 2 * i + 2]).max()) for i in range(4)]
    want = np.mean([0.5 * float(stats["w1"].hi) + 0.5 * s for s in shards])
    assert float(new["w1"].hi) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bins", [None, 2048])
def test_padding_rows_of_a_ragged_dot_do_not_count_in_a_percentile(bins):
    """``grouped_rows`` zeroes the rows past the groups; zeros moved the percentile of the
    real rows (0.78 instead of 1.47 with 48 padding rows of 64) in calibrate and the
    running update, and filled the pooled histogram's first bin."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(64, 8)), jnp.float32)
    p = {"experts": jnp.asarray(r.normal(size=(2, 8, 4)), jnp.float32)}
    sizes = jnp.asarray([10, 6], jnp.int32)  # 16 real rows, 48 padding rows
    moe = lambda p, x, sizes: jax.lax.ragged_dot(x, p["experts"], sizes)
    act = qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(90))
    policy = qjax.Policy(
        [qjax.Rule("experts", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, 2)), act=act)]
    )
    real = np.sort(np.abs(np.asarray(x[:16], np.float64)).ravel())
    want = float(np.percentile(real, 90))
    stats = qjax.calibrate(moe, policy, p, [(x, sizes)], histogram_bins=bins)
    if bins:  # the pooled histogram's percentile: between the order statistics around it, within a bin
        k, width = int(0.9 * (real.size - 1)), 4.0 / bins  # range 4: the power of two above max|x|
        assert real[k] - width <= float(stats["experts"].hi) <= real[k + 1] + width
    else:
        assert float(stats["experts"].hi) == pytest.approx(want, rel=1e-6)
        _, new = qjax.fake_quantized(moe, policy, act_stats_momentum=0.0)(p, stats, x, sizes)
        assert float(new["experts"].hi) == pytest.approx(want, rel=1e-6)
