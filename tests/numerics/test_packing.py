"""Packing narrow integers into bytes: exact round trips, the documented bit layout,
errors, and packing inside QArray (int2/int3/int4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax.numerics import QuantSpec, dequantize, pack, quantize, unpack
from qjax.numerics.packing import packed_length

from .reference import ref_quantize

SHAPES = [(7,), (3, 5), (2, 3, 4), (4, 1, 9), (1,), (6, 2)]


def _np_pack(v, bits, axis):
    """Reference: element j of each run of 8 // bits sits at bits [j*bits, (j+1)*bits)."""
    per = 8 // bits
    v = np.moveaxis(np.asarray(v).astype(np.int64) & ((1 << bits) - 1), axis, -1)
    n = v.shape[-1]
    pad = (-n) % per
    v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), np.int64)], axis=-1)
    v = v.reshape((*v.shape[:-1], -1, per))
    out = np.zeros(v.shape[:-1], np.int64)
    for j in range(per):
        out |= v[..., j] << (j * bits)
    return np.moveaxis(out.astype(np.uint8), -1, axis)


_pack = jax.jit(pack, static_argnums=(1, 2))
_unpack = jax.jit(unpack, static_argnums=(1, 2, 3, 4))


@st.composite
def _packable(draw):
    bits = draw(st.sampled_from([1, 2, 4]))
    signed = draw(st.booleans())
    shape = draw(st.sampled_from(SHAPES))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    n = int(np.prod(shape))
    vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    return bits, signed, axis, np.asarray(vals, np.int8 if signed else np.uint8).reshape(shape)


@given(_packable())
def test_pack_unpack_round_trip(case):
    bits, signed, axis, v = case
    p = _pack(v, bits, axis)
    assert p.dtype == jnp.uint8
    want_shape = list(v.shape)
    want_shape[axis] = packed_length(v.shape[axis], bits)
    assert p.shape == tuple(want_shape)
    np.testing.assert_array_equal(np.asarray(p), _np_pack(v, bits, axis))
    u = _unpack(p, bits, v.shape[axis], axis, signed)
    assert u.dtype == (jnp.int8 if signed else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(u), v)


def test_int4_layout_low_nibble_first():
    v = np.array([1, 2, -1, 7, -8], np.int8)
    p = np.asarray(pack(v, 4))
    # element 2i is the low nibble: (2 << 4) | 1, (7 << 4) | 0xF, (0 << 4) | 0x8
    assert p.tolist() == [0x21, 0x7F, 0x08]
    assert np.asarray(unpack(p, 4, 5)).tolist() == v.tolist()
    assert np.asarray(unpack(p, 4, 5, signed=False)).tolist() == [1, 2, 15, 7, 8]
    p2 = np.asarray(pack(np.array([1, -2, 0, 3, -1], np.int8), 2))
    assert p2.tolist() == [1 | (2 << 2) | (0 << 4) | (3 << 6), 3]


def test_packed_length():
    assert [packed_length(n, 4) for n in range(6)] == [0, 1, 1, 2, 2, 3]
    assert [packed_length(n, 2) for n in range(6)] == [0, 1, 1, 1, 1, 2]
    assert packed_length(9, 1) == 2


@pytest.mark.parametrize(
    "shape,axis", [((0, 4), -1), ((4, 0), -1), ((0, 4), 0), ((0, 3), 1), ((2, 0, 3), -1)]
)
def test_empty_axes(shape, axis):
    v = np.zeros(shape, np.int8)
    p = pack(v, 4, axis)
    want = list(shape)
    want[axis] = packed_length(shape[axis], 4)
    assert p.shape == tuple(want)
    assert unpack(p, 4, shape[axis], axis).shape == shape


def test_pack_errors():
    with pytest.raises(ValueError, match="bits=3"):
        pack(np.zeros(4, np.int8), 3)
    with pytest.raises(ValueError, match="bits=8"):
        unpack(np.zeros(4, np.uint8), 8, 4)
    with pytest.raises(TypeError, match="integer"):
        pack(np.zeros(4, np.float32), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(np.zeros(4, np.int8), 4, 8)
    with pytest.raises(ValueError, match="pack axis=2"):
        pack(np.zeros((2, 2), np.int8), 4, axis=2)
    with pytest.raises(ValueError, match="into 9"):
        unpack(np.zeros(4, np.uint8), 4, 9)
    with pytest.raises(ValueError, match="into 6"):
        unpack(np.zeros(4, np.uint8), 4, 6)


def test_pack_keeps_only_low_bits():
    v = np.array([0x13, -0x7F, 0x7F], np.int16)
    np.testing.assert_array_equal(np.asarray(unpack(pack(v, 4), 4, 3, signed=False)), v & 0xF)


# --------------------------------------------------------------------------------
# packing inside QArray


@pytest.mark.parametrize(
    "fmt,pack_bits,pack_axis",
    [
        (qjax.int4, 4, -1),
        (qjax.uint4, 4, 0),
        (qjax.int3, 4, -1),
        (qjax.uint3, 4, 0),
        (qjax.int2, 2, 0),
        (qjax.uint2, 2, -1),
    ],
    ids=["int4", "uint4", "int3", "uint3", "int2", "uint2"],
)
def test_qarray_packs_narrow_formats(fmt, pack_bits, pack_axis):
    shape = (5, 7)
    spec = QuantSpec(fmt, channel_axes=(-1,), symmetric=fmt.signed, pack_axis=pack_axis)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    q = quantize(x, spec)
    assert q.values.dtype == jnp.uint8 and q.shape == shape
    want = list(shape)
    want[pack_axis] = -(-shape[pack_axis] * pack_bits // 8)
    assert q.values.shape == tuple(want)
    codes, _, _, dq = ref_quantize(x, fmt.qmin, fmt.qmax, channel_axes=(-1,), symmetric=fmt.signed)
    np.testing.assert_array_equal(np.asarray(q.unpacked_values(), np.int64), codes)
    np.testing.assert_array_equal(np.asarray(q.values), _np_pack(codes, pack_bits, pack_axis))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), dq)
    # unpacked storage gives the same numbers
    qu = quantize(x, spec.replace(pack=False))
    assert qu.values.dtype == fmt.storage_dtype and qu.values.shape == shape
    np.testing.assert_array_equal(np.asarray(qu.values, np.int64), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(qu)), dq)


def test_scalar_is_not_packed():
    q = quantize(np.float32(0.3), QuantSpec(qjax.int4))
    assert q.values.shape == () and q.values.dtype == jnp.int8 and q.packed_axis is None
    assert float(dequantize(q)) == pytest.approx(0.3, rel=1e-6)
