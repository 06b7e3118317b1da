"""Quantized ops on a mesh with Explicit axes: weights sharded along the contraction.

The rewritten op (blocks per scale group, one contraction per int4 bit field, integer
backward matmuls) runs with the axes Auto and returns in the types of the op it replaces,
so serving, QAT and int8 training run where the float model runs, with its output
shardings, and match the same transform without a mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax

K, N, B = 128, 32, 8
INT4_G32 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0)
INT8_PC = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)


def _mlp(params, x):
    # a K-sharded contraction needs the output sharding named on an Explicit mesh
    h = jnp.einsum("bk,kn->bn", x, params["w"], out_sharding=P())
    return jnp.einsum("bn,cn->bc", h, h, out_sharding=P())


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, K)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(K, N)), jnp.float32)}
    return params, x


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("k", "d"), axis_types=(AxisType.Explicit,) * 2)


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize(
    "wspec, act, xspec",
    [
        (INT4_G32, None, P(None, "k")),  # groups sliced out of the K shards, per bit field
        (INT4_G32, None, P()),
        (INT4_G32, A8, P("d", "k")),
        (INT8_PC, None, P(None, "k")),  # both contracted sides sharded
        (INT8_PC, A8, P(None, "k")),
    ],
)
def test_serving_weights_sharded_along_k(data, mesh, wspec, act, xspec):
    params, x = data
    ops = (
        [qjax.OpRule(".*bn,cn.*", lhs=qjax.QuantSpec(qjax.int8), rhs=qjax.QuantSpec(qjax.int8))]
        if act
        else []
    )
    policy = qjax.Policy([qjax.Rule("w", weight=wspec, act=act), *ops])
    with jax.set_mesh(mesh):
        expected = qjax.quantized(_mlp, policy)(params, x)  # unsharded
        ps = jax.device_put(params, NamedSharding(mesh, P("k", None)))
        xs = jax.device_put(x, NamedSharding(mesh, xspec))
        served = jax.jit(qjax.quantized(_mlp, policy))
        for p in (ps, qjax.quantize_params(ps, policy)):
            out = served(p, xs)
            assert out.sharding.is_equivalent_to(jax.jit(_mlp)(ps, xs).sharding, 2)
            _close(out, expected)


def test_qat_gradients_of_a_grouped_int4_weight_sharded_along_k(data, mesh):
    params, x = data
    policy = qjax.Policy([qjax.Rule("w", weight=INT4_G32)])
    loss = lambda p, x: qjax.fake_quantized(_mlp, policy)(p, x).sum()
    with jax.set_mesh(mesh):
        expected = jax.grad(loss)(params, x)["w"]
        ps = jax.device_put(params, NamedSharding(mesh, P("k", None)))
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "k")))
        got = jax.jit(jax.grad(loss))(ps, xs)["w"]
    assert got.sharding.spec == P("k", None)
    _close(got, expected)


@pytest.mark.parametrize("xspec", [P(), P("d", None), P("d", "k"), None])  # None: never placed
def test_int8_training_cotangents_keep_their_primals_shardings(data, mesh, xspec):
    # a replicated activation against a K-sharded weight: the integer backward's dx comes
    # out sharded along K, which a custom VJP may not return for a replicated primal
    params, x = data
    policy = qjax.Policy([qjax.Rule("w", weight=INT8_PC, act=A8, grad=A8)])
    f = lambda p, x: jnp.einsum("bk,kn->bn", x, p["w"], out_sharding=P())
    loss = lambda p, x: qjax.fake_quantized(f, policy)(p, x).sum()
    with jax.set_mesh(mesh):
        expected = jax.grad(loss, argnums=(0, 1))(params, x)
        ps = jax.device_put(params, NamedSharding(mesh, P("k", None)))
        xs = x if xspec is None else jax.device_put(x, NamedSharding(mesh, xspec))
        dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(ps, xs)
    assert xspec is None or dx.sharding.is_equivalent_to(xs.sharding, 2)
    assert dp["w"].sharding.spec == P("k", None)
    _close(dp["w"], expected[0]["w"])
    _close(dx, expected[1])


def test_ragged_experts_sharded_along_k(data, mesh):
    _, x = data
    experts = {"e": jnp.asarray(np.random.default_rng(1).normal(size=(4, K, N)), jnp.float32)}
    sizes = jnp.array([1, 3, 0, 4], jnp.int32)
    f = lambda p, x, s: jax.lax.ragged_dot(x, p["e"], s, out_sharding=P())
    policy = qjax.Policy([qjax.Rule("e", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=A8)])
    with jax.set_mesh(mesh):
        expected = qjax.quantized(f, policy)(experts, x, sizes)
        es = jax.device_put(experts, NamedSharding(mesh, P(None, "k", None)))
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "k")))
        _close(jax.jit(qjax.quantized(f, policy))(es, xs, sizes), expected)


def test_inside_a_partial_manual_shard_map(data, mesh):
    # the manual axis stays Manual: only the Explicit ones are made Auto around the op
    params, x = data
    policy = qjax.Policy([qjax.Rule("w", weight=INT8_PC, act=A8, grad=A8)])

    @functools.partial(jax.shard_map, in_specs=(P(), P("d")), out_specs=P("d"), axis_names={"d"})
    def body(w, x):
        return x @ w

    f = lambda p, x: body(p["w"], x)
    plain = lambda p, x: x @ p["w"]
    expected = qjax.quantized(plain, policy)(params, x)
    expected_grad = jax.grad(lambda p: qjax.fake_quantized(plain, policy)(p, x).sum())(params)["w"]
    with jax.set_mesh(mesh):
        ps = jax.device_put(params, NamedSharding(mesh, P()))
        xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
        _close(jax.jit(qjax.quantized(f, policy))(ps, xs), expected)
        grad = jax.jit(jax.grad(lambda p: qjax.fake_quantized(f, policy)(p, xs).sum()))(ps)["w"]
    # the gradient's per-row scales are per shard of the batch: close, not equal
    np.testing.assert_allclose(
        grad, expected_grad, rtol=0.02, atol=0.02 * float(jnp.abs(expected_grad).max())
    )
