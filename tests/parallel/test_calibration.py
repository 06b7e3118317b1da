"""Sharded calibration and GPTQ Hessians: statistics reduced across the data shards equal
the unsharded ones."""

import jax
import numpy as np

import qjax
from qjax import parallel as qp
from qjax.quant.gptq import input_hessians

from .common import MLP, batch, init

POLICY = qjax.Policy(
    [
        qjax.Rule(
            r".*/kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=qjax.QuantSpec(qjax.int8)
        )
    ]
)


def test_calibration_and_hessians_reduced_across_shards():
    model = MLP()
    batches = [batch(10)["x"], batch(11)["x"]]
    batches[1][3] *= 50.0  # an outlier row that only one data shard sees
    params = init(model, batches[0])
    mesh = qp.make_mesh(data=4, fsdp=2)
    want = qjax.calibrate(model.apply, POLICY, params, [(x,) for x in batches])
    got = qp.calibrate(model.apply, POLICY, params, [(x,) for x in batches], mesh)
    assert set(got) == set(want) == {"params/up/kernel", "params/down/kernel"}
    for k in want:
        np.testing.assert_array_equal(got[k].lo, want[k].lo)
        np.testing.assert_array_equal(got[k].hi, want[k].hi)
        assert got[k].count == want[k].count == 2
    h_want = input_hessians(model.apply, params, [(x,) for x in batches])
    psh = qp.shardings(params, qp.presets.hybrid(), qp.make_mesh(2, 2, 2))
    h_got = qp.input_hessians(
        model.apply, params, [(x,) for x in batches], psh["params"]["up"]["kernel"].mesh, param_shardings=psh
    )
    for k in h_want:
        np.testing.assert_allclose(h_got[k], h_want[k], rtol=1e-5, atol=1e-6)
    # the first shard alone would not see the outlier
    local = qjax.calibrate(model.apply, POLICY, params, [(x[:2],) for x in batches])
    assert float(local["params/up/kernel"].hi) < float(want["params/up/kernel"].hi)
    assert isinstance(h_got["params/up/kernel"], jax.Array)


def test_explicit_mesh_with_tensor_parallel_params():
    """On an Explicit-axes mesh with Megatron-split params, calibration (percentile sorts
    included) and the Hessians run with the axes Auto and equal the unsharded ones (they
    raised ShardingTypeError: contracting dims sharded; sort on a sharded axis)."""
    model = MLP()
    batches = [(batch(12)["x"],), (batch(13)["x"],)]
    params = init(model, batches[0][0])
    mesh = qp.make_mesh(2, 1, 4, axis_types="explicit")
    psh = qp.shardings(params, qp.presets.tensor_parallel(), mesh)
    pct = qjax.Policy(
        [qjax.Rule(r".*/kernel", act=qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.0)))]
    )
    for policy in (POLICY, pct):
        want = qjax.calibrate(model.apply, policy, params, batches)
        got = qp.calibrate(model.apply, policy, params, batches, mesh, param_shardings=psh)
        for k in want:
            np.testing.assert_allclose(got[k].lo, want[k].lo, rtol=1e-6)
            np.testing.assert_allclose(got[k].hi, want[k].hi, rtol=1e-6)
    h_want = input_hessians(model.apply, params, batches)
    h_got = qp.input_hessians(model.apply, params, batches, mesh, param_shardings=psh)
    for k in h_want:
        np.testing.assert_allclose(h_got[k], h_want[k], rtol=1e-5, atol=1e-6)


def test_percentile_of_an_explicitly_sharded_array():
    """``qjax.quantize`` with percentile calibration of a weight whose reduced axis an
    Explicit mesh axis splits (eager, jitted, per channel and per tensor)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    w = jax.random.normal(jax.random.key(0), (64, 8))
    mesh = qp.make_mesh(1, 8, 1, axis_types="explicit")
    pct = qjax.calib.percentile
    for spec, layout in (
        (qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=pct(99.0)), P("fsdp", None)),
        (qjax.QuantSpec(qjax.int8, symmetric=False, calibration=pct(98.0)), P(None, "fsdp")),
    ):
        want = qjax.quantize(w, spec)
        ws = jax.device_put(w, NamedSharding(mesh, layout))
        for got in (qjax.quantize(ws, spec), jax.jit(lambda x, spec=spec: qjax.quantize(x, spec))(ws)):
            np.testing.assert_array_equal(got.scale, want.scale)
            np.testing.assert_array_equal(got.values, want.values)
