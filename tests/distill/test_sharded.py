"""Losses with batch statistics under ``jax.jit`` with the batch sharded over 8 devices
(1-D mesh, NamedSharding): the values and gradients equal the unsharded ones, i.e. the
reductions over the batch are global, not per shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax import distill

B, C = 32, 10

LOSSES = {
    "kd": lambda s, t, fs, ft, y: distill.kd_loss(s, t, y, 4.0, 0.7, label_smoothing=0.1),
    "kd_standardized": lambda s, t, fs, ft, y: distill.kd_loss(s, t, y, 2.0, 0.9, standardize=True),
    "dkd": lambda s, t, fs, ft, y: distill.dkd_loss(s, t, y, 4.0, 1.0, 8.0),
    "dist": lambda s, t, fs, ft, y: distill.dist_loss(s, t, 2.0),
    "hint": lambda s, t, fs, ft, y: distill.hint_loss(fs[..., :4], ft[..., :4]),
    "at": lambda s, t, fs, ft, y: distill.attention_transfer_loss(fs, ft),
    "rkd": lambda s, t, fs, ft, y: distill.rkd_loss(fs, ft, 25.0, 50.0),
    "sp": lambda s, t, fs, ft, y: distill.sp_loss(fs, ft),
    "pkt": lambda s, t, fs, ft, y: distill.pkt_loss(fs, ft),
}


def _data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(B, C)).astype(np.float32) * 3
    t = rng.normal(size=(B, C)).astype(np.float32) * 3
    fs = rng.normal(size=(B, 4, 4, 6)).astype(np.float32)
    ft = rng.normal(size=(B, 4, 4, 12)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    return s, t, fs, ft, y


def _all(s, t, fs, ft, y):
    """Every loss with its gradients w.r.t. the student logits and features: one program."""
    return {name: jax.value_and_grad(loss, argnums=(0, 2))(s, t, fs, ft, y) for name, loss in LOSSES.items()}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_batch_statistics_are_global_under_sharding(axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    args = _data()
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data", *[None] * (a.ndim - 1)))) for a in args]
    assert sharded[0].sharding.shard_shape(sharded[0].shape) == (B // 8, C)
    want = jax.jit(_all)(*args)
    with jax.set_mesh(mesh):
        got = jax.jit(_all)(*sharded)
    values = jax.jit(lambda *a: {name: loss(*a) for name, loss in LOSSES.items()})
    local = values(*(a[: B // 8] for a in args))
    for name in LOSSES:
        (v, grads), (w, want_grads) = got[name], want[name]
        np.testing.assert_allclose(v, w, rtol=2e-5, err_msg=name)
        for g, wg in zip(grads, want_grads):
            np.testing.assert_allclose(g, wg, rtol=2e-4, atol=1e-5 * np.abs(wg).max(), err_msg=name)
        # the per-shard (local) value differs: the reduction really is over the whole batch
        assert abs(float(local[name]) - float(w)) > 1e-4, name


def test_topk_cache_sharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    s, t, _, _, y = _data()
    cache = distill.topk_teacher(t, 3, 4.0)
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *[None] * (a.ndim - 1))))
    f = jax.jit(lambda s, c, y: distill.kd_loss(s, c, y, 4.0, 0.5))
    want = f(s, cache, y)
    got = f(shard(s), jax.tree.map(shard, cache), shard(y))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert jnp.isfinite(got)
