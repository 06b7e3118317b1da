"""Layout ops replayed on a QArray equal the same ops on its dequantized value."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import qjax
from qjax.graph import apply_layout, unpacked


def _q(shape, **kw):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    return qjax.quantize(x, qjax.QuantSpec(kw.pop("fmt", qjax.int8), **kw))


def _check(q, name, params, fn, operands=()):
    out = apply_layout(q, name, params, operands)
    assert out is not None
    np.testing.assert_array_equal(out.dequantize(), fn(q.dequantize()))
    assert out.packed_axis is None
    return out


@given(st.permutations([0, 1, 2]), st.sampled_from([(), (0,), (-1,), (0, 2)]))
def test_transpose(perm, axes):
    q = _q((3, 4, 5), channel_axes=axes)
    _check(q, "transpose", {"permutation": tuple(perm)}, lambda x: jnp.transpose(x, perm))


def test_transpose_grouped_int4():
    q = _q((8, 6), fmt=qjax.int4, channel_axes=(-1,), group_size=4, group_axis=0)
    out = _check(q, "transpose", {"permutation": (1, 0)}, lambda x: x.T)
    assert out.group_axis == -1 and out.channel_axes == (-2,)


@pytest.mark.parametrize(
    "shape,axes,new",
    [
        ((384, 6, 64), (-2, -1), (384, 384)),  # DenseGeneral kernel merged
        ((384, 384), (-1,), (384, 6, 64)),  # split heads
        ((4, 6), (), (24,)),
        ((1, 4, 6), (-1,), (4, 1, 6)),  # unit dims moved
        ((2, 3, 4), (0,), (2, 12)),
    ],
)
def test_reshape_representable(shape, axes, new):
    q = _q(shape, channel_axes=axes)
    _check(q, "reshape", {"new_sizes": new, "dimensions": None}, lambda x: x.reshape(new))


def test_reshape_not_representable_returns_none():
    q = _q((4, 6), channel_axes=(-1,))
    assert apply_layout(q, "reshape", {"new_sizes": (24,), "dimensions": None}) is None
    g = _q((8, 6), channel_axes=(-1,), group_size=4, group_axis=0)
    assert apply_layout(g, "reshape", {"new_sizes": (48,), "dimensions": None}) is None


@pytest.mark.parametrize(
    "shape,dims,out_axis,pack_axis,group",
    [
        ((1, 1, 8, 6), (0, 1), -1, 2, None),  # HWIO 1x1 conv kernel, packed along I
        ((6, 8, 1, 1), (2, 3), 0, 1, None),  # OIHW, packed along I
        ((1, 1, 16, 6), (0, 1), -1, -1, (4, -2)),  # grouped along I, packed along O
        ((1, 8, 6), (0,), -1, 1, None),
    ],
)
def test_squeeze_keeps_packed_codes(shape, dims, out_axis, pack_axis, group):
    """A squeeze that keeps the packed axis keeps the codes packed (no per-call unpack)."""
    kw = dict(channel_axes=(out_axis,), pack=True, pack_axis=pack_axis)
    if group is not None:
        kw.update(group_size=group[0], group_axis=group[1])
    q = _q(shape, fmt=qjax.int4, **kw)
    assert q.packed_axis is not None
    out = apply_layout(q, "squeeze", {"dimensions": dims})
    assert out.packed_axis is not None and out.values.dtype == q.values.dtype
    assert out.values.size == q.values.size  # still two codes per byte
    np.testing.assert_array_equal(out.dequantize(), lax.squeeze(q.dequantize(), dims))
    assert out.shape == tuple(s for i, s in enumerate(shape) if i not in dims)


def test_squeeze_of_the_packed_axis_unpacks():
    q = _q((1, 6), fmt=qjax.int4, channel_axes=(-1,), pack=True, pack_axis=0)
    out = apply_layout(q, "squeeze", {"dimensions": (0,)})
    np.testing.assert_array_equal(out.dequantize(), q.dequantize()[0])
    assert out.packed_axis is None


def test_broadcast_squeeze_convert_slice():
    q = _q((4, 6), channel_axes=(-1,))
    _check(
        q,
        "broadcast_in_dim",
        {"shape": (2, 4, 6), "broadcast_dimensions": (1, 2), "sharding": None},
        lambda x: jnp.broadcast_to(x, (2, 4, 6)),
    )
    q1 = _q((1, 6), channel_axes=(-1,))
    _check(q1, "squeeze", {"dimensions": (0,)}, lambda x: x[0])
    out = _check(
        q,
        "convert_element_type",
        {"new_dtype": jnp.bfloat16, "weak_type": False, "sharding": None},
        lambda x: x.astype(jnp.bfloat16),
    )
    assert out.dtype == jnp.bfloat16
    _check(
        q, "slice", {"start_indices": (1, 2), "limit_indices": (3, 5), "strides": None}, lambda x: x[1:3, 2:5]
    )
    g = _q((8, 6), channel_axes=(-1,), group_size=4, group_axis=0)
    _check(g, "slice", {"start_indices": (4, 0), "limit_indices": (8, 6), "strides": None}, lambda x: x[4:8])
    assert (
        apply_layout(g, "slice", {"start_indices": (2, 0), "limit_indices": (8, 6), "strides": None}) is None
    )
    # strides along the group axis would mix groups
    assert (
        apply_layout(g, "slice", {"start_indices": (0, 0), "limit_indices": (8, 6), "strides": (2, 1)})
        is None
    )


@given(
    st.sampled_from([(), (0,), (-1,), (0, 2)]),
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 3)), min_size=3, max_size=3),
)
def test_strided_slice(axes, cuts):
    """A strided slice takes every scale that varies along an axis with the same stride."""
    q = _q((5, 7, 4), channel_axes=axes)
    start = [min(a, n) for (a, _, _), n in zip(cuts, q.shape)]
    limit = [max(lo, min(b, n)) for lo, (_, b, _), n in zip(start, cuts, q.shape)]
    strides = [c for _, _, c in cuts]
    _check(
        q,
        "slice",
        {"start_indices": tuple(start), "limit_indices": tuple(limit), "strides": tuple(strides)},
        lambda x: lax.slice(x, start, limit, strides),
    )


def test_dynamic_slice_of_stacked_weight():
    q = _q((3, 4, 6), channel_axes=(0, -1))
    i = jnp.int32(1)
    out = _check(
        q,
        "dynamic_slice",
        {"slice_sizes": (1, 4, 6)},
        lambda x: lax.dynamic_slice(x, (i, 0, 0), (1, 4, 6)),
        operands=(i, jnp.int32(0), jnp.int32(0)),
    )
    assert out.scale.shape == (1, 1, 6)


def test_unpacked_round_trip():
    q = _q((5, 7), fmt=qjax.int4, channel_axes=(-1,))
    assert q.packed_axis is not None
    np.testing.assert_array_equal(unpacked(q).dequantize(), q.dequantize())


@pytest.mark.parametrize("dims", [(0,), (1,), (0, 1)])
def test_rev_and_identity_ops(dims):
    for q in (
        _q((8, 6), channel_axes=(-1,)),
        _q((8, 6), fmt=qjax.int4, channel_axes=(-1,), group_size=4, group_axis=0),
    ):
        out = _check(q, "rev", {"dimensions": dims}, lambda x: lax.rev(x, dims))
        assert out.group_axis == q.group_axis
        for name in ("stop_gradient", "optimization_barrier"):
            _check(q, name, {}, lambda x: x)
    # reversing a group axis that is not a whole number of groups would shift every group
    ragged = qjax.quantize(
        jnp.ones((6, 4)), qjax.QuantSpec(qjax.int8, group_size=4, group_axis=0, pad_groups=True)
    )
    assert apply_layout(ragged, "rev", {"dimensions": (0,)}) is None
