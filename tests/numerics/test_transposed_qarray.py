"""TransposedQArray: a QArray stored with its last two axes swapped stands for the same array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax
from qjax.numerics import (
    QArray,
    QuantSpec,
    TransposedQArray,
    dequantize,
    is_quantized,
    quantize,
    transpose_storage,
)

RNG = np.random.default_rng(11)


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _same_qarray(a: QArray, b: QArray):
    assert a.tree_flatten()[1] == b.tree_flatten()[1]  # format, dtype, axes, packing
    for x, y in zip(a.tree_flatten()[0], b.tree_flatten()[0]):
        assert (x is None) == (y is None)
        if x is not None:
            _eq(x, y)


@st.composite
def quantized_weights(draw):
    lead = draw(st.sampled_from([(), (3,)]))
    # few distinct shapes: every new one compiles quantize and the repacking again
    k, n = draw(st.sampled_from([1, 6, 9])), draw(st.sampled_from([1, 4, 7]))
    fmt = draw(st.sampled_from([qjax.int8, qjax.int4, qjax.int2, qjax.uint4]))
    gran = draw(st.sampled_from(["tensor", "out", "in", "group"]))
    kw = {"tensor": {}, "out": {"channel_axes": (-1,)}, "in": {"channel_axes": (-2,)}}.get(gran)
    if kw is None:
        kw = {
            "channel_axes": (-1,),
            "group_axis": -2,
            "group_size": draw(st.sampled_from([1, 4])),
            "pad_groups": True,
        }
    spec = QuantSpec(fmt, symmetric=fmt.signed, pack_axis=draw(st.sampled_from([-1, -2])), **kw)
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    x = jnp.asarray(RNG.standard_normal((*lead, k, n)) * 3, dtype)
    return quantize(x, spec)


@settings(max_examples=examples(8))  # each new layout compiles
@given(quantized_weights())
def test_stands_for_the_same_array_and_round_trips_exactly(q):
    t = transpose_storage(q)
    assert t.shape == q.shape and t.dtype == q.dtype and t.ndim == q.ndim and t.size == q.size
    assert t.stored.shape == (*q.shape[:-2], q.shape[-1], q.shape[-2])
    _eq(t.dequantize(), q.dequantize())
    _eq(dequantize(t), q.dequantize())
    _eq(t.stored.unpacked_values(), jnp.swapaxes(q.unpacked_values(), -1, -2))
    assert (t.stored.packed_axis is None) == (q.packed_axis is None)
    assert t.nbytes == q.nbytes and t.format == q.format
    _same_qarray(t.as_qarray(), q)


def test_packed_codes_stay_packed_along_the_same_logical_axis():
    x = jnp.asarray(RNG.standard_normal((64, 48)), jnp.float32)
    along_n = quantize(x, QuantSpec(qjax.int4, channel_axes=(-1,)))  # packed along N
    along_k = quantize(x, QuantSpec(qjax.int4, channel_axes=(-1,), pack_axis=0))
    assert transpose_storage(along_n).stored.packed_axis == -2
    assert transpose_storage(along_n).stored.values.shape == (24, 64)
    assert transpose_storage(along_k).stored.packed_axis == -1
    assert transpose_storage(along_k).stored.values.shape == (48, 32)


def test_static_activation_scale_is_kept():
    q = quantize(jnp.ones((8, 4)), QuantSpec(qjax.int8, channel_axes=(-1,))).with_act_scale(
        jnp.float32(0.5), jnp.int32(3)
    )
    t = transpose_storage(q)
    assert float(t.stored.act_scale) == 0.5 and int(t.stored.act_zero_point) == 3


def test_is_a_pytree_through_jit_vmap_and_tree_map():
    q = quantize(
        jnp.asarray(RNG.standard_normal((3, 8, 6)), jnp.float32), QuantSpec(qjax.int8, channel_axes=(-1,))
    )
    t = transpose_storage(q)
    tj = jax.jit(lambda t: t)(t)
    assert isinstance(tj, TransposedQArray)
    _eq(tj.dequantize(), q.dequantize())
    _eq(jax.jit(dequantize)(t), q.dequantize())
    per_layer = jax.vmap(lambda x: transpose_storage(quantize(x, QuantSpec(qjax.int8, channel_axes=(-1,)))))(
        jnp.asarray(RNG.standard_normal((3, 8, 6)), jnp.float32)
    )
    assert isinstance(per_layer, TransposedQArray) and per_layer.shape == (3, 8, 6)
    doubled = jax.tree.map(lambda a: a, t)
    assert isinstance(doubled, TransposedQArray) and doubled.stored.shape == (3, 6, 8)
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
    assert keys[0] == ".stored.values"
    assert is_quantized(t) and is_quantized(q) and not is_quantized(jnp.ones(2))
    assert not qjax.is_qarray(t)
    assert "TransposedQArray(shape=(3, 8, 6)" in repr(t)


def test_bad_input_gets_clear_errors():
    q1 = quantize(jnp.ones(5), QuantSpec(qjax.int8))
    with pytest.raises(ValueError, match="rank >= 2"):
        transpose_storage(q1)
    with pytest.raises(TypeError, match=r"expects a qjax\.QArray"):
        transpose_storage(jnp.ones((2, 2)))
    t = transpose_storage(quantize(jnp.ones((2, 3)), QuantSpec(qjax.int8)))
    with pytest.raises(TypeError, match="stored transposed already"):
        transpose_storage(t)
    with pytest.raises(TypeError, match="stores a QArray"):
        TransposedQArray(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="rank >= 2"):
        TransposedQArray(q1)


def test_empty_axes():
    q = quantize(jnp.zeros((0, 4)), QuantSpec(qjax.int8, channel_axes=(-1,)))
    t = transpose_storage(q)
    assert t.shape == (0, 4) and t.stored.shape == (4, 0)
    assert t.dequantize().shape == (0, 4)


@pytest.mark.parametrize(
    "spec", [QuantSpec(qjax.int8, channel_axes=(-1,)), QuantSpec(qjax.int4, channel_axes=(-1,))]
)
def test_vmapped_quantize_output_can_be_stored_transposed(spec):
    # jax.vmap(quantize) over stacked layers returns a scale (3, 1, 6) while channel_axes
    # lists only -1: the swap reads the channel axes off the scale instead of failing
    w = RNG.standard_normal((3, 8, 6)).astype(np.float32)
    qv = jax.vmap(lambda a: quantize(a, spec))(jnp.asarray(w))
    assert qv.scale.shape == (3, 1, 6)
    s = np.abs(w.astype(np.float64)).max(axis=1, keepdims=True) / spec.format.qmax  # per layer, per channel
    ref = np.clip(np.round(w / s), spec.format.qmin, spec.format.qmax) * s  # float64 reference
    for t in (transpose_storage(qv), qjax.store_transposed({"k": qv}, "k")["k"]):
        assert t.shape == (3, 8, 6) and t.stored.scale.shape == (3, 6, 1)
        assert t.stored.channel_axes == (-3, -2)
        np.testing.assert_allclose(
            np.asarray(t.dequantize(), np.float64), ref, rtol=1e-6, atol=1e-6 * s.max()
        )
        back = t.as_qarray()
        assert back.channel_axes == (-3, -1)
        _eq(back.unpacked_values(), qv.unpacked_values())
        _eq(back.scale, qv.scale)
