"""Transposes between a weight and its matmul (``x @ w.T``, PyTorch-layout weights) are
folded into the matmul's dimension numbers: the stored codes are read in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from jax import lax

import qjax
from qjax.quant.serve import _unfold_transpose

TOK8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
SPECS = {  # for a weight stored (N, K) = (48, 128)
    "int8 per channel": qjax.QuantSpec(qjax.int8, channel_axes=(0,)),
    "int4 packed along K": qjax.QuantSpec(qjax.int4, channel_axes=(0,)),
    "int4 packed along N": qjax.QuantSpec(qjax.int4, channel_axes=(0,), pack_axis=0),
    "int4 g32 packed along K": qjax.QuantSpec(qjax.int4, channel_axes=(0,), group_axis=1, group_size=32),
}


def _code_transposes(jaxpr: str) -> list[str]:
    """Transposes of integer arrays (the weight's codes) in a printed jaxpr."""
    return re.findall(r"[ui](?:4|8)\[[\d,]+\] = transpose", jaxpr)


CASES = [(name, None) for name in SPECS] + [("int8 per channel", TOK8)]  # W8A8 takes int8 weights


@pytest.mark.parametrize("name,act", CASES, ids=[f"{n}-{'w8a8' if a else 'weight-only'}" for n, a in CASES])
def test_x_at_w_transposed_matches_the_einsum_form_and_copies_no_codes(name, act):
    spec = SPECS[name]
    w = jax.random.normal(jax.random.key(0), (48, 128))
    x = jax.random.normal(jax.random.key(1), (2, 3, 128))
    pol = qjax.Policy([qjax.Rule("w", weight=spec, act=act)])
    qp = qjax.quantize_params({"w": w}, pol)
    transposed = jax.jit(qjax.quantized(lambda p, x: x @ p["w"].T, pol))
    einsum = jax.jit(qjax.quantized(lambda p, x: jnp.einsum("bsk,nk->bsn", x, p["w"]), pol))
    y = transposed(qp, x)
    assert y.shape == (2, 3, 48)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(einsum(qp, x)))  # the same program
    ref = qjax.fake_quantized(lambda p, x: x @ p["w"].T, pol)({"w": w}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    assert _code_transposes(str(jax.make_jaxpr(transposed)(qp, x))) == []


def test_multi_axis_permutation_and_output_order():
    """A 3-D weight stored (D, K, H) read as (K, H, D): the free axes come out as the
    original dot orders them."""
    w = jax.random.normal(jax.random.key(0), (6, 64, 5))
    x = jax.random.normal(jax.random.key(1), (4, 64))
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(0, 2))
    pol = qjax.Policy([qjax.Rule("w", weight=spec)])
    qp = qjax.quantize_params({"w": w}, pol)
    dn = (((1,), (0,)), ((), ()))
    f = lambda p, x: lax.dot_general(x, jnp.transpose(p["w"], (1, 2, 0)), dn)
    y = jax.jit(qjax.quantized(f, pol))(qp, x)
    deq = np.asarray(qp["w"].dequantize(), np.float64)
    ref = np.einsum("bk,dkh->bhd", np.asarray(x, np.float64), deq)
    assert y.shape == (4, 5, 6)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert _code_transposes(str(jax.make_jaxpr(qjax.quantized(f, pol))(qp, x))) == []


def test_weight_on_the_left_transposed():
    w = jax.random.normal(jax.random.key(0), (64, 24))  # (K, N); the program reads w.T @ x.T
    x = jax.random.normal(jax.random.key(1), (5, 64))
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(1,), pack_axis=0)
    pol = qjax.Policy([qjax.Rule("w", weight=spec)])
    qp = qjax.quantize_params({"w": w}, pol)
    f = lambda p, x: p["w"].T @ x.T
    y = jax.jit(qjax.quantized(f, pol))(qp, x)
    ref = np.asarray(qp["w"].dequantize(), np.float64).T @ np.asarray(x, np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert _code_transposes(str(jax.make_jaxpr(qjax.quantized(f, pol))(qp, x))) == []


def test_a_transpose_before_another_layout_op_is_replayed():
    """Only trailing transposes fold: ``w.T.reshape(...)`` replays both on the codes."""
    w = jax.random.normal(jax.random.key(0), (16, 32))  # (N, K)
    x = jax.random.normal(jax.random.key(1), (3, 32))
    pol = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0,)))])
    qp = qjax.quantize_params({"w": w}, pol)
    f = lambda p, x: x @ p["w"].T.reshape(32, 16)
    y = qjax.quantized(f, pol)(qp, x)
    ref = np.asarray(x, np.float64) @ np.asarray(qp["w"].dequantize(), np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@st.composite
def _dot_with_transposed_operand(draw):
    """A random ``dot_general`` whose operand ``wi`` is a transposed array."""
    nb, nc = draw(st.integers(0, 1)), draw(st.integers(1, 2))
    free = [draw(st.integers(0, 2)) for _ in range(2)]
    wi = draw(st.integers(0, 1))
    sizes = draw(st.lists(st.integers(1, 3), min_size=nb + nc + sum(free), max_size=nb + nc + sum(free)))
    b, c, f0, f1 = (
        sizes[:nb],
        sizes[nb : nb + nc],
        sizes[nb + nc : nb + nc + free[0]],
        sizes[nb + nc + free[0] :],
    )
    dims = []
    for fr in (f0, f1):  # each operand: batch, contracting and free axes, shuffled
        order = draw(st.permutations(range(nb + nc + len(fr))))
        shape = [([*b, *c, *fr])[i] for i in order]
        pos = {i: order.index(i) for i in range(len(order))}
        dims.append((shape, [pos[nb + i] for i in range(nc)], [pos[i] for i in range(nb)]))
    perm = draw(st.permutations(range(len(dims[wi][0]))))
    return dims, wi, tuple(perm)


@settings(max_examples=examples(60), deadline=None)
@given(_dot_with_transposed_operand(), st.integers(0, 2**31 - 1))
@example(case=([([1, 2, 2], [1, 2], [0]), ([2, 2, 1], [1, 0], [2])], 0, (1, 0, 2)), seed=0)  # CI regression
def test_unfold_transpose_matches_the_dot_on_the_transposed_operand(case, seed):
    (lhs, rhs), wi, perm = case
    rng = np.random.default_rng(seed)
    # small integers: every sum is exact in float32, whatever order XLA contracts in
    a, b = (rng.integers(-8, 9, size=s[0]).astype(np.float32) for s in (lhs, rhs))
    dn = ((tuple(lhs[1]), tuple(rhs[1])), (tuple(lhs[2]), tuple(rhs[2])))
    want = lax.dot_general(a, b, dn)
    view = (a, b)[wi]
    # the stored array: transposing it by `perm` gives the operand
    stored = np.transpose(view, np.argsort(perm))
    assert np.array_equal(np.transpose(stored, perm), view)
    new_dn, out_perm = _unfold_transpose(dn, wi, perm, (a.ndim, b.ndim))
    got = lax.dot_general(*((stored, b) if wi == 0 else (a, stored)), new_dn)
    np.testing.assert_array_equal(np.transpose(got, out_perm), want)
