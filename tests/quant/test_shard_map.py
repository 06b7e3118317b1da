"""``qjax.calibrate`` and ``qjax.quantized`` on functions whose layers run inside
``jax.shard_map`` (tensor-parallel bodies), in Explicit and Auto mesh modes, against the
same function without ``shard_map``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import qjax

W_SPEC = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
SPECS = (P(None, "model"), P("model", None), P("data", None))  # column-, row-parallel, batch


def _mlp(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _sharded_mlp(mesh):
    def body(w1, w2, x):
        # x @ w1: w1 column-parallel, x replicated over "model"; h @ w2: h sharded along
        # w2's contraction, a partial sum reduced by psum
        return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "model")

    def f(p, x):
        return jax.shard_map(body, mesh=mesh, in_specs=SPECS, out_specs=P("data", None))(p["w1"], p["w2"], x)

    return f


def _setup(mode):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (16, 32)), "w2": jax.random.normal(k[1], (32, 8))}
    batches = [jax.random.normal(k[2], (8, 16)) * 3, jax.random.normal(k[3], (8, 16))]

    def put(a, spec):
        return jax.device_put(a, jax.NamedSharding(mesh, spec))

    sharded = {"w1": put(params["w1"], SPECS[0]), "w2": put(params["w2"], SPECS[1])}
    return mesh, params, batches, sharded, [put(x, SPECS[2]) for x in batches]


@pytest.mark.parametrize("mode", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_calibrate_and_serve_inside_shard_map_match_the_unsharded_function(mode):
    mesh, params, batches, sharded, sharded_batches = _setup(mode)
    pol = qjax.Policy([qjax.Rule("w.*", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8))])
    f = _sharded_mlp(mesh)
    with jax.set_mesh(mesh):
        stats = qjax.calibrate(f, pol, sharded, sharded_batches)
    ref = qjax.calibrate(_mlp, pol, params, batches)
    assert set(stats) == set(ref) == {"w1", "w2"}
    for path in ref:  # per-tensor absmax: the max over shards is the max over the tensor
        np.testing.assert_allclose(stats[path].hi, ref[path].hi, rtol=1e-6)
        np.testing.assert_allclose(stats[path].lo, ref[path].lo, rtol=1e-6)
        assert stats[path].count == ref[path].count == 2
    qp = qjax.quantize_params(sharded, pol, act_stats=stats)
    with jax.set_mesh(mesh):
        y = jax.jit(qjax.quantized(f, pol))(qp, sharded_batches[0])
    want = qjax.quantized(_mlp, pol)(qjax.quantize_params(params, pol, act_stats=ref), batches[0])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_int4_weight_only_inside_shard_map():
    mesh, params, batches, sharded, sharded_batches = _setup(AxisType.Explicit)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=4)
    pol = qjax.Policy([qjax.Rule("w.*", weight=spec)])
    with jax.set_mesh(mesh):
        y = qjax.quantized(_sharded_mlp(mesh), pol)(qjax.quantize_params(sharded, pol), sharded_batches[1])
    want = qjax.quantized(_mlp, pol)(qjax.quantize_params(params, pol), batches[1])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_percentile_ranges_average_the_shards_like_batches():
    """Each shard's range is one read: the mean over reads counts every data shard once,
    although the activation of ``w1`` is replicated four times over ``model``."""
    mesh, _, batches, sharded, sharded_batches = _setup(AxisType.Explicit)
    cal = qjax.calib.percentile(90.0)
    pol = qjax.Policy([qjax.Rule("w1", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8, calibration=cal))])
    with jax.set_mesh(mesh):
        stats = qjax.calibrate(_sharded_mlp(mesh), pol, sharded, sharded_batches)
    per_batch = []
    for x in batches:  # the two data shards of each batch: rows 0-3 and 4-7
        his = [cal(x[i : i + 4], (0, 1), qjax.int8, True)[1] for i in (0, 4)]
        per_batch.append(np.mean([float(np.squeeze(h)) for h in his]))
    np.testing.assert_allclose(float(stats["w1"].hi), np.mean(per_batch), rtol=1e-5)
    # a genuinely per-tensor percentile of the whole batch differs: the shards were not pooled
    whole = np.mean([float(np.squeeze(cal(x, (0, 1), qjax.int8, True)[1])) for x in batches])
    assert abs(float(stats["w1"].hi) - whole) > 1e-4


def test_per_feature_statistics_inside_shard_map_raise():
    mesh, _, _, sharded, sharded_batches = _setup(AxisType.Explicit)
    with (
        jax.set_mesh(mesh),
        pytest.raises(ValueError, match=r"op 'w1' inside shard_map emits values that cannot be combined"),
    ):
        qjax.graph.input_statistics(_sharded_mlp(mesh), sharded, sharded_batches, lambda r: r.T @ r)


@pytest.mark.parametrize("mode", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_lsq_qat_gradients_inside_shard_map(mode):
    """Learned LSQ scales enter the body split like their weight's scales; a scale shared
    by the K shards of a row-parallel weight gets LSQ's gradient scale of the whole
    weight (1 / sqrt(all its elements per scale)), so params and scale gradients equal the
    unsharded ones."""
    mesh, params, batches, sharded, sharded_batches = _setup(mode)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    pol = qjax.Policy([qjax.Rule("w.*", weight=spec)])
    scales = qjax.lsq_scales(params, pol)

    def loss(fn):
        return lambda p, s, x: jnp.sum(qjax.fake_quantized(fn, pol, scales=s)(p, x) ** 2)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss(_sharded_mlp(mesh)), argnums=(0, 1)))(sharded, scales, sharded_batches[0])
    want = jax.grad(loss(_mlp), argnums=(0, 1))(params, scales, batches[0])
    for part in (0, 1):
        for path in ("w1", "w2"):
            w = np.asarray(want[part][path])
            np.testing.assert_allclose(np.asarray(got[part][path]), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


_WHOLE_SCALE_SPECS = {
    "channel": qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),  # w2's scale reduces over its split K
    "groups_local": qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=4),
    "groups_split": qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=16),
    "groups_across_n": qjax.QuantSpec(qjax.int4, group_axis=0, group_size=4),  # one scale per group
    "percentile": qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=qjax.calib.percentile(99.0)),
    "stochastic": qjax.QuantSpec(qjax.int8, channel_axes=(-1,), rounding="stochastic"),
}


@pytest.mark.parametrize(
    "mode,spec",
    [(AxisType.Explicit, "channel"), (AxisType.Explicit, "stochastic")]
    + [(AxisType.Auto, name) for name in _WHOLE_SCALE_SPECS],
    ids=lambda v: v if isinstance(v, str) else str(v).split(".")[-1].lower(),
)
def test_qat_weight_scales_inside_shard_map_are_the_whole_weights(mode, spec):
    """``fake_quantized`` scales each weight shard as part of the whole weight (its scale
    axes gathered across the shards that split them), so the QAT forward and gradients
    equal the unsharded ones and the deployed ``quantize_params`` model (before, a
    row-parallel weight got per-shard absmax scales: 0.5 off on outputs of ~64)."""
    mesh, params, batches, sharded, sharded_batches = _setup(mode)
    pol = qjax.Policy([qjax.Rule("w.*", weight=_WHOLE_SCALE_SPECS[spec])])
    key = jax.random.key(5)

    def loss(fn):
        return lambda p, x: jnp.sum(qjax.fake_quantized(fn, pol, key=key)(p, x) ** 2)

    with jax.set_mesh(mesh):
        y = jax.jit(qjax.fake_quantized(_sharded_mlp(mesh), pol, key=key))(sharded, sharded_batches[0])
        g = jax.jit(jax.grad(loss(_sharded_mlp(mesh))))(sharded, sharded_batches[0])
    want_y = qjax.fake_quantized(_mlp, pol, key=key)(params, batches[0])
    want_g = jax.grad(loss(_mlp))(params, batches[0])
    scale = float(np.abs(want_y).max())
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5 * scale)
    for path in ("w1", "w2"):
        w = np.asarray(want_g[path])
        np.testing.assert_allclose(np.asarray(g[path]), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("spec", ["channel", "groups_local", "groups_split", "groups_across_n", "percentile"])
def test_serving_float_leaves_inside_shard_map_uses_the_whole_weights_scales(spec):
    """``quantized`` on *float* params quantizes each shard with the whole weight's scales,
    as ``quantize_params`` of the whole weight does (a row-parallel per-channel weight took
    per-shard scales: 0.26 off). Groups that straddle the shards run on the whole weight's
    dequantized values."""
    mesh, params, batches, sharded, sharded_batches = _setup(AxisType.Auto)
    pol = qjax.Policy([qjax.Rule("w.*", weight=_WHOLE_SCALE_SPECS[spec])])
    with jax.set_mesh(mesh):
        y = jax.jit(qjax.quantized(_sharded_mlp(mesh), pol))(sharded, sharded_batches[0])
    want = qjax.quantized(_mlp, pol)(qjax.quantize_params(params, pol), batches[0])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_serving_shards_with_padded_groups_and_refusing_straddled_w8a8():
    """``pad_groups`` groups are measured by the spec's group size (a K of 40 in 4 shards
    with groups of 12 was sliced per shard: 0.67 off); a W8A8 op whose weight groups
    straddle the shards is refused by name instead of serving a float activation."""
    mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Auto,))
    w = jax.random.normal(jax.random.key(0), (40, 8))
    x = jax.random.normal(jax.random.key(1), (3, 40))
    body = lambda w, x: jax.lax.psum(x @ w, "model")
    f = lambda p, x: jax.shard_map(
        body, mesh=mesh, in_specs=(P("model", None), P(None, "model")), out_specs=P()
    )(p["w"], x)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=12, pad_groups=True)
    pol = qjax.Policy([qjax.Rule("w", weight=spec)])
    want = qjax.quantized(lambda p, x: x @ p["w"], pol)(qjax.quantize_params({"w": w}, pol), x)
    with jax.set_mesh(mesh):
        got = jax.jit(qjax.quantized(f, pol))({"w": w}, x)
        fq = jax.jit(qjax.fake_quantized(f, pol))({"w": w}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fq), np.asarray(want), rtol=1e-5, atol=1e-5)
    w8a8 = qjax.Policy([qjax.Rule("w", weight=spec.replace(format=qjax.int8), act=qjax.QuantSpec(qjax.int8))])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"'w'.*scale groups straddle the shards"):
        qjax.quantized(f, w8a8)({"w": w}, x)
