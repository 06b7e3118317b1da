"""Act-order (``desc_act=True``) GPTQ checkpoints: ``qjax.from_gptq_act_order`` sorts the
rows by group and ``qjax.with_input_permutation`` permutes the layer's input to match,
against float64 ``scales[g_idx] * (q - zeros[g_idx])`` (AutoGPTQ's reading)."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from test_interop import pack_gptq

import qjax

K, N, G = 64, 32, 16


def _act_order_checkpoint(bits=4, seed=0):
    """Rows quantized in a random (activation) order: row ``order[j]`` is in group ``j // G``."""
    r = np.random.default_rng(seed)
    order = r.permutation(K)
    g_idx = np.empty(K, np.int32)
    g_idx[order] = np.arange(K) // G
    q = r.integers(0, 1 << bits, (K, N))
    z = r.integers(1, 1 << bits, (K // G, N))  # v1 stores z - 1: no zero point of 0
    s = r.uniform(0.001, 0.02, (K // G, N)).astype(np.float16)
    ref = s.astype(np.float64)[g_idx] * (q - z[g_idx])  # what AutoGPTQ dequantizes
    qweight, qzeros = pack_gptq(q, z, bits)
    return qweight, qzeros, s, g_idx, ref


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_sorted_by_group_dequantize_to_the_checkpoint(bits):
    qweight, qzeros, s, g_idx, ref = _act_order_checkpoint(bits)
    kernel, perm = qjax.from_gptq_act_order(qweight, qzeros, s, g_idx, bits=bits)
    assert kernel.group_size == G and perm.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(kernel.dequantize(), np.float64), ref[perm])
    assert np.array_equal(g_idx[perm], np.arange(K) // G)


def test_a_permuted_dense_layer_serves_the_checkpoints_product():
    qweight, qzeros, s, g_idx, ref = _act_order_checkpoint(seed=3)
    kernel, perm = qjax.from_gptq_act_order(qweight, qzeros, s, g_idx, bits=4)
    model = nn.Sequential([nn.Dense(N, use_bias=False), nn.relu, nn.Dense(8, use_bias=False)])
    x = jax.random.normal(jax.random.key(0), (5, K))
    v = model.init(jax.random.key(1), x)
    v["params"]["layers_0"]["kernel"] = kernel
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=G, group_axis=0, symmetric=False)
    policy = qjax.Policy([qjax.Rule(".*layers_0/kernel", weight=spec)])
    f = qjax.with_input_permutation(model.apply, {"params/layers_0/kernel": perm})
    y = jax.jit(qjax.quantized(f, policy))(v, x)
    h = np.maximum(np.asarray(x, np.float64) @ ref, 0)
    want = h @ np.asarray(v["params"]["layers_2"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the permutation is needed: without it the product is another one
    wrong = qjax.quantized(model.apply, policy)(v, x)
    assert not np.allclose(wrong, y, rtol=1e-3)


def test_weight_on_the_right_of_a_transposed_read_and_errors():
    perm = np.random.default_rng(1).permutation(K).astype(np.int32)
    w = jax.random.normal(jax.random.key(2), (N, K))  # PyTorch (out, in), read as x @ w.T
    x = jax.random.normal(jax.random.key(3), (4, K))
    f = lambda p, x: x @ p["w"].T
    got = qjax.with_input_permutation(f, {"w": perm})({"w": w[:, perm]}, x)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a permutation"):
        qjax.with_input_permutation(f, {"w": np.zeros(K, np.int32)})
    with pytest.raises(ValueError, match=r"no matmul/conv reads \['v'\]"):
        qjax.with_input_permutation(f, {"v": perm})({"w": w}, x)
    with pytest.raises(ValueError, match="a permutation of 32 rows"):
        qjax.with_input_permutation(f, {"w": np.arange(32)})({"w": w}, x)
    assert qjax.with_input_permutation(f, {}) is f


def test_bad_g_idx_is_refused():
    qweight, qzeros, s, g_idx, _ = _act_order_checkpoint()
    bad = g_idx.copy()
    bad[:2] = 0  # group 0 gets too many rows
    with pytest.raises(ValueError, match="does not give each of the 4 groups 16 rows"):
        qjax.from_gptq_act_order(qweight, qzeros, s, bad, bits=4)
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        qjax.from_gptq_act_order(qweight, qzeros, s, g_idx[:8], bits=4)
    with pytest.raises(ValueError, match="from_gptq_act_order"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, g_idx=g_idx)
    # a plain checkpoint loads through it too, with the identity permutation
    kernel, perm = qjax.from_gptq_act_order(qweight, qzeros, s, np.arange(K) // G, bits=4)
    np.testing.assert_array_equal(perm, np.arange(K))
    np.testing.assert_array_equal(
        kernel.dequantize(), qjax.from_gptq(qweight, qzeros, s, bits=4).dequantize()
    )
