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
