"""QArray as a pytree: jit, vmap, tree.map, sharding, nbytes, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax.numerics import QArray, QuantSpec, dequantize, is_qarray, quantize

RNG = np.random.default_rng(5)
SHAPE = (16, 8)


def _x(shape=SHAPE):
    return RNG.standard_normal(shape).astype(np.float32)


SPECS = [
    QuantSpec(qjax.int8, channel_axes=(-1,)),
    QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=4),
    QuantSpec(qjax.uint8, symmetric=False),
]


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec", SPECS, ids=["int8ch", "int4group", "uint8asym"])
def test_jit_in_and_out(spec):
    x = _x()
    q = quantize(x, spec)
    qj = jax.jit(lambda x: quantize(x, spec))(x)
    assert isinstance(qj, QArray) and qj.format == q.format and qj.shape == q.shape
    _eq(qj.values, q.values)
    _eq(qj.scale, q.scale)
    _eq(jax.jit(lambda q: q.dequantize())(q), dequantize(q))
    _eq(jax.jit(lambda q: dequantize(q) * 2)(q), np.asarray(dequantize(q)) * 2)


@pytest.mark.parametrize("spec", SPECS, ids=["int8ch", "int4group", "uint8asym"])
def test_vmap_over_leading_axis(spec):
    xs = _x((3, *SHAPE))
    qs = jax.vmap(lambda x: quantize(x, spec))(xs)
    assert isinstance(qs, QArray)
    assert qs.shape == (3, *SHAPE) and qs.scale.shape == (3, *spec.layout(SHAPE).scale_shape)
    ys = jax.vmap(dequantize)(qs)
    for i in range(3):
        qi = quantize(xs[i], spec)
        _eq(qs.values[i], qi.values)
        _eq(ys[i], dequantize(qi))
    # negative axes keep the batched QArray self-consistent: it dequantizes directly
    _eq(dequantize(qs), ys)


def test_tree_map_and_leaves():
    q = quantize(_x(), SPECS[2])
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 3  # values, scale, zero_point
    q2 = jax.tree.map(lambda a: a, q)
    assert isinstance(q2, QArray) and q2.format == q.format and q2.dtype == q.dtype
    _eq(dequantize(q2), dequantize(q))
    qs = quantize(_x(), SPECS[0])
    assert len(jax.tree.leaves(qs)) == 2  # zero_point None is not a leaf
    # a params-like tree: is_qarray stops at QArrays
    tree = {"a": qs, "b": [q, jnp.ones(3)]}
    deq = jax.tree.map(lambda t: dequantize(t) if is_qarray(t) else t, tree, is_leaf=is_qarray)
    _eq(deq["a"], dequantize(qs))
    assert deq["b"][1].shape == (3,)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == [".values", ".scale", ".zero_point"]


def test_device_put_with_named_sharding():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = QuantSpec(qjax.int8, channel_axes=(-1,))
    x = _x()
    q = quantize(x, spec)
    sh = NamedSharding(mesh, P(None, "x"))
    qs = jax.device_put(q, sh)
    assert isinstance(qs, QArray)
    assert qs.values.sharding == sh and qs.scale.sharding == sh
    assert len(qs.values.addressable_shards) == 8
    assert qs.values.addressable_shards[0].data.shape == (16, 1)
    _eq(dequantize(qs), dequantize(q))
    # a pytree of shardings of the same structure (values by rows, scale replicated)
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), q)
    shardings.values = NamedSharding(mesh, P("x", None))
    qr = jax.device_put(q, shardings)
    assert qr.values.sharding.spec == P("x", None) and qr.scale.sharding.spec == P()
    _eq(jax.jit(dequantize)(qr), dequantize(q))


def test_nbytes():
    x = _x()
    q8 = quantize(x, QuantSpec(qjax.int8, channel_axes=(-1,)))
    q4 = quantize(x, QuantSpec(qjax.int4, channel_axes=(-1,)))
    q4u = quantize(x, QuantSpec(qjax.int4, channel_axes=(-1,), pack=False))
    qa = quantize(x, QuantSpec(qjax.uint8, channel_axes=(-1,), symmetric=False))
    q16 = quantize(x, QuantSpec(qjax.int16))
    qf8 = quantize(x, QuantSpec(qjax.fp8_e4m3))
    scale_bytes = 8 * 4
    n = math.prod(SHAPE)
    assert q8.nbytes == n + scale_bytes
    assert q4.nbytes == n // 2 + scale_bytes
    assert q4.nbytes - scale_bytes == (q8.nbytes - scale_bytes) // 2
    assert q4u.nbytes == q8.nbytes
    assert qa.nbytes == n + scale_bytes + 8  # uint8 zero points
    assert q16.nbytes == 2 * n + 4
    assert qf8.nbytes == n + 4
    assert quantize(x, QuantSpec(qjax.int2)).nbytes == n // 4 + 4
    # odd lengths round up to whole bytes
    assert quantize(_x((3, 5)), QuantSpec(qjax.int4)).nbytes == 3 * 3 + 4


def _good_parts():
    q = quantize(_x(), QuantSpec(qjax.int8, channel_axes=(-1,)))
    return q.values, q.scale


def test_constructor_validates():
    v, s = _good_parts()
    q = QArray(v, s, format=qjax.int8, dtype=jnp.float32, channel_axes=(-1,))
    _eq(q.dequantize(), np.asarray(v, np.float32) * np.asarray(s))
    with pytest.raises(ValueError, match=r"scale has shape \(1, 7\).*need scale shape \(1, 8\)"):
        QArray(v, s[:, :7], format=qjax.int8, dtype=jnp.float32, channel_axes=(-1,))
    with pytest.raises(ValueError, match="scale has shape"):
        QArray(v, s, format=qjax.int8, dtype=jnp.float32)  # per-tensor needs (1, 1)
    with pytest.raises(ValueError, match="zero_point has shape"):
        QArray(v, s, jnp.zeros((1, 3), jnp.int8), format=qjax.int8, dtype=jnp.float32, channel_axes=(-1,))
    with pytest.raises(ValueError, match="dtype int8, expected uint8"):
        QArray(v, s, format=qjax.uint8, dtype=jnp.float32, channel_axes=(-1,))
    with pytest.raises(TypeError, match="float dtype"):
        QArray(v, s, format=qjax.int8, dtype=jnp.int32, channel_axes=(-1,))
    with pytest.raises(ValueError, match="negative index"):
        QArray(v, s, format=qjax.int8, dtype=jnp.float32, channel_axes=(1,))
    with pytest.raises(ValueError, match="packed_length"):
        QArray(
            jnp.zeros((16, 4), jnp.uint8),
            s,
            format=qjax.int4,
            dtype=jnp.float32,
            channel_axes=(-1,),
            packed_axis=-1,
            packed_length=9,
        )


def test_repr_and_properties():
    q = quantize(_x(), QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=4, symmetric=False))
    r = repr(q)
    assert "int4" in r and "(16, 8)" in r and "group_size=4" in r and "asymmetric" in r and "packed" in r
    assert q.ndim == 2 and q.size == 128 and q.layout.scale_shape == (4, 8)
    assert is_qarray(q) and not is_qarray(np.ones(2))
