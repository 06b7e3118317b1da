"""``qjax.calibrate(..., histogram_bins=...)``: percentile / MSE ranges of all calibration
batches pooled, against the exact statistics of the concatenated activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import qjax

BINS = 2048
W_SPEC = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


def _mlp(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _data(n_batches=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 2 + n_batches)
    params = {"w1": jax.random.normal(k[0], (16, 32)), "w2": jax.random.normal(k[1], (32, 8))}
    scales = [1.0, 0.3, 5.0, 1.5][:n_batches]
    batches = [jax.random.t(k[2 + i], 3.0, (64, 16)) * s for i, s in enumerate(scales)]
    return params, batches


def _exact(values, p, symmetric):
    v = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in values])
    if symmetric:
        a = np.percentile(np.abs(v), p, method="inverted_cdf")
        return -a, a
    return np.percentile(v, 100 - p, method="inverted_cdf"), np.percentile(v, p, method="inverted_cdf")


@pytest.mark.parametrize("symmetric", [True, False])
def test_pooled_percentile_matches_the_concatenated_activations(symmetric):
    params, batches = _data()
    cal = qjax.calib.percentile(99.0)
    act = qjax.QuantSpec(qjax.int8 if symmetric else qjax.uint8, symmetric=symmetric, calibration=cal)
    pol = qjax.Policy([qjax.Rule("w.*", weight=W_SPEC, act=act)])
    stats = qjax.calibrate(_mlp, pol, params, batches, histogram_bins=BINS)
    inputs = {"w1": batches, "w2": [jax.nn.relu(x @ params["w1"]) for x in batches]}
    for path, acts in inputs.items():
        lo, hi = _exact(acts, 99.0, symmetric)
        r = 2.0 ** np.ceil(np.log2(max(np.abs(np.asarray(a)).max() for a in acts) * (1 + 1e-7)))
        assert abs(float(stats[path].hi) - hi) <= r / BINS and abs(float(stats[path].lo) - lo) <= r / BINS
        assert stats[path].count == 4
    # the default averages the per-batch percentiles: a different (batch-size dependent) number
    mean = qjax.calibrate(_mlp, pol, params, batches)
    assert abs(float(mean["w1"].hi) - float(stats["w1"].hi)) > 10 * r / BINS


def test_pooled_mse_is_near_optimal_on_the_concatenated_activations():
    params, batches = _data()
    act = qjax.QuantSpec(qjax.int4, calibration=qjax.calib.mse())
    pol = qjax.Policy([qjax.Rule("w1", weight=W_SPEC, act=act)])
    stats = qjax.calibrate(_mlp, pol, params, batches, histogram_bins=BINS)
    allx = jnp.concatenate([x.ravel() for x in batches])
    _, ref_hi = qjax.calib.mse()(allx, (0,), qjax.int4, True)

    def cost(a):
        return float(
            jnp.sum(
                (allx - qjax.fake_quant(allx, qjax.QuantSpec(qjax.int4, calibration=qjax.calib.fixed(-a, a))))
                ** 2
            )
        )

    assert cost(float(stats["w1"].hi)) <= 1.01 * cost(float(ref_hi[0]))


def test_scanned_layers_get_their_own_pooled_ranges():
    k = jax.random.split(jax.random.key(3), 4)
    w = jax.random.normal(k[0], (3, 8, 8)) / 2
    batches = [jax.random.normal(k[1], (32, 8)), jax.random.normal(k[2], (32, 8)) * 4]

    def f(p, x):
        return lax.scan(lambda h, wl: (jnp.tanh(h @ wl) * (1.0 + jnp.abs(h).mean()), None), x, p["w"])[0]

    cal = qjax.calib.percentile(95.0)
    pol = qjax.Policy(
        [
            qjax.Rule(
                "w",
                weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
                act=qjax.QuantSpec(qjax.int8, calibration=cal),
            )
        ]
    )
    stats = qjax.calibrate(f, pol, {"w": w}, batches, histogram_bins=BINS)
    assert stats["w"].hi.shape == (3,)
    for layer in range(3):  # the inputs each layer saw, over both batches
        acts = []
        for x in batches:
            h = x
            for j in range(layer):
                h = jnp.tanh(h @ w[j]) * (1.0 + jnp.abs(h).mean())
            acts.append(h)
        _, hi = _exact(acts, 95.0, True)
        r = 2.0 ** np.ceil(np.log2(max(float(jnp.abs(a).max()) for a in acts) * (1 + 1e-7)))
        assert abs(float(stats["w"].hi[layer]) - hi) <= r / BINS


def test_shards_pool_exactly():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params, batches = _data()
    pol = qjax.Policy(
        [
            qjax.Rule(
                "w.*", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.0))
            )
        ]
    )

    def body(w1, w2, x):
        return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "model")

    def f(p, x):
        specs = (P(None, "model"), P("model", None), P("data", None))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("data", None))(p["w1"], p["w2"], x)

    def put(a, spec):
        return jax.device_put(a, jax.NamedSharding(mesh, spec))

    sharded = {"w1": put(params["w1"], P(None, "model")), "w2": put(params["w2"], P("model", None))}
    with jax.set_mesh(mesh):
        stats = qjax.calibrate(
            f, pol, sharded, [put(x, P("data", None)) for x in batches], histogram_bins=BINS
        )
    ref = qjax.calibrate(_mlp, pol, params, batches, histogram_bins=BINS)
    for path in ("w1", "w2"):
        np.testing.assert_allclose(float(stats[path].hi), float(ref[path].hi), rtol=1e-6)


def test_errors():
    params, batches = _data(1)
    pol = qjax.Policy(
        [
            qjax.Rule(
                "w.*", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.0))
            )
        ]
    )
    with pytest.raises(ValueError, match="histogram_bins=1000 must be a power of two"):
        qjax.calibrate(_mlp, pol, params, batches, histogram_bins=1000)

    def looped(p, x, n):
        return lax.while_loop(
            lambda s: s[0] < n, lambda s: (s[0] + 1, jnp.tanh(s[1] @ p["w1"][:, :16])), (0, x)
        )[1]

    with pytest.raises(ValueError, match=r"inside lax\.while_loop emits values"):
        qjax.calibrate(looped, pol, params, [(batches[0], 2)], histogram_bins=BINS)
    # NaN in the activations: a NaN range, as everywhere in qjax
    stats = qjax.calibrate(_mlp, pol, params, [batches[0].at[0, 0].set(jnp.nan)], histogram_bins=BINS)
    assert np.isnan(float(stats["w1"].hi))


def test_huge_activation_is_a_clear_error_naming_the_op():
    params = {"w": jnp.ones((4, 2))}
    act = qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.0))
    pol = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8), act=act)])
    x = jnp.ones((8, 4)).at[0, 0].set(2e38)
    for batches in ([x], [jnp.ones((8, 4)), x]):
        with pytest.raises(ValueError, match=r"op reading 'w'.*cannot bin magnitudes >= 2\*\*127"):
            qjax.calibrate(lambda p, x: x @ p["w"], pol, params, batches, histogram_bins=64)


@pytest.mark.parametrize("bins", [None, BINS], ids=["ranges", "histograms"])
def test_a_calibrator_keeps_its_program_and_equals_calibrate(bins):
    """``qjax.Calibrator`` traces ``f`` once; later calls (new params, new batches of the
    same shapes) reuse the compiled program and give ``calibrate``'s result."""
    params, batches = _data()
    traces = []

    def f(p, x):
        traces.append(1)  # runs when f is traced
        return _mlp(p, x)

    act = qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.0))
    policy = qjax.Policy([qjax.Rule("w.*", weight=W_SPEC, act=act)])
    cal = qjax.Calibrator(f, policy, histogram_bins=bins)
    first = cal(params, batches[:2])
    n = len(traces)
    later = jax.tree.map(lambda a: 0.5 * a, params)
    got = cal(later, batches[2:])
    assert len(traces) == n  # no new trace
    want = qjax.calibrate(_mlp, policy, later, batches[2:], histogram_bins=bins)
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path].hi), np.asarray(want[path].hi))
        np.testing.assert_array_equal(np.asarray(got[path].lo), np.asarray(want[path].lo))
    assert not np.array_equal(np.asarray(first["w1"].hi), np.asarray(got["w1"].hi))
    with pytest.raises(ValueError, match="power of two"):
        qjax.Calibrator(f, policy, histogram_bins=3)
