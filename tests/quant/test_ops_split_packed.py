"""Method "split" (a float activation cut into int8 pieces): the pieces against
``qjax.quantize``, reconstruction precision, and non-finite / all-zero tokens. The lean
dynamic activation quantizer against ``qjax.quantize``. Packed
int4/int2 weights (contracted one operand per bit field, concatenated into one dot or
one dot per field): every layout, size-1 and odd axes, groups and zero points, against
the int64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis_budget import examples
from test_ops import check_float, check_int_dot

import qjax
from qjax.quant.ops import quantized_dot_general as qdot
from qjax.quant.ops_common import split_pieces

MM = (((1,), (0,)), ((), ()))
TOKENS = qjax.QuantSpec(qjax.int8, channel_axes=(0,))
finite = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=examples(5), deadline=None)  # each shape compiles (~2 s): make fuzz scales it up
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=finite))
@example(np.array([[1.1754944e-38, 0.0], [0.0, -3e-37]], np.float32))  # scales below the smallest normal
def test_first_piece_is_quantize_and_pieces_reconstruct(x):
    # jitted: one compile per shape (eager, each primitive compiles for it: ~2 s an example)
    codes, scales = jax.jit(split_pieces, static_argnums=1)(jnp.asarray(x), (0,))
    assert codes.dtype == jnp.int8 and codes.shape == (3, *x.shape)
    q = jax.jit(lambda x: qjax.quantize(x, TOKENS))(jnp.asarray(x))
    live = np.abs(x).max(axis=1) > 0  # all-zero tokens: codes 0 whatever the scale
    np.testing.assert_array_equal(np.asarray(codes[0])[live], np.asarray(q.values)[live])
    np.testing.assert_array_equal(np.asarray(scales[0])[live], np.asarray(q.scale)[live])
    rebuilt = np.sum(np.asarray(codes, np.float64) * np.asarray(scales, np.float64), axis=0)
    amax = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
    # XLA:CPU flushes subnormals: the finer pieces of tokens below ~1e-32 lose them
    assert np.all(np.abs(rebuilt - x) <= amax * 2.0**-22 + 1e-32)


def test_non_finite_token_gives_nan_row_only():
    rng = np.random.default_rng(0)
    w = qjax.quantize(jnp.asarray(rng.normal(size=(64, 24)), jnp.float32), qjax.QuantSpec(qjax.int4))
    x = rng.normal(size=(4, 64)).astype(np.float32)
    x[1, 5], x[2, 7], x[3] = np.nan, np.inf, 0.0
    y = np.asarray(qdot(jnp.asarray(x), w, MM, method="split"))
    ref = x[0].astype(np.float64) @ np.asarray(w.dequantize(), np.float64)
    np.testing.assert_allclose(y[0], ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    np.testing.assert_array_equal(y[3], 0.0)


@settings(max_examples=examples(4), deadline=None)  # each shape compiles (~3 s): make fuzz scales it up
@given(
    k=st.integers(1, 70),
    n=st.integers(1, 9),
    m=st.sampled_from([1, 3]),
    fmt=st.sampled_from(["int4", "uint4", "int2"]),
    pack_axis=st.sampled_from([0, 1]),
    group=st.sampled_from([None, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_packed_weight_matches_int64_reference(k, n, m, fmt, pack_axis, group, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    kw = dict(channel_axes=(1,), pack_axis=pack_axis, symmetric=fmt != "uint4")
    if group is not None:
        kw.update(group_size=group, group_axis=0, pad_groups=True)
    qw = qjax.quantize(w, qjax.QuantSpec(getattr(qjax, fmt), **kw))
    assert qw.packed_axis % 2 == pack_axis
    # integer activations: exact against the int64 reference
    tokens = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    y = jax.jit(lambda x, w: qdot(x, w, MM, lhs_spec=tokens))(x, qw)  # jitted: one compile per shape
    check_int_dot(y, qjax.quantize(x, TOKENS), qw, MM, exact=group is None)
    # float activations (weight-only), every formulation: the float64 reference
    wd, xd = np.asarray(qw.dequantize(), np.float64), np.asarray(x, np.float64)
    mag = np.abs(xd) @ np.abs(wd)
    check_float(jax.jit(lambda x, w: qdot(x, w, MM, method="convert"))(x, qw), xd @ wd, mag)
    # "split" rebuilds each token to 2^-22 of its absmax (test above), so an element far
    # below its token's absmax carries that absolute error into every output it feeds
    piece_err = np.abs(xd).max(axis=1, keepdims=True) * 2.0**-21 * np.abs(wd).sum(axis=0, keepdims=True)
    y = np.asarray(jax.jit(lambda x, w: qdot(x, w, MM, method="split"))(x, qw), np.float64)
    np.testing.assert_array_less(np.abs(y - xd @ wd), 64 * 2.0**-23 * mag + piece_err + 1e-30)


@settings(max_examples=examples(5), deadline=None)  # each shape compiles; make fuzz scales it up
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=24), elements=finite),
    st.sampled_from(["per_token", "per_tensor", "last_axis"]),
    st.sampled_from([np.float32, "bfloat16"]),
)
def test_dynamic_activation_quantizer_is_quantize(x, granularity, dtype):
    """The ops quantize activations with a lean absmax quantizer (no clip, no NaN guard):
    its codes and scales must be ``qjax.quantize``'s for finite inputs."""
    from qjax.quant.ops_common import _lean_dynamic, _quantize_dynamic_absmax

    axes = {"per_token": qjax.PER_TOKEN, "per_tensor": (), "last_axis": (-1,)}[granularity]
    spec = qjax.QuantSpec(qjax.int8, channel_axes=axes)
    xs = jnp.asarray(x).astype(dtype)
    if axes is qjax.PER_TOKEN:
        spec = spec.replace(channel_axes=tuple(range(x.ndim - 1)))
    assert _lean_dynamic(spec)
    lean, ref = _quantize_dynamic_absmax(xs, spec), qjax.quantize(xs, spec)
    np.testing.assert_array_equal(np.asarray(lean.values), np.asarray(ref.values))
    np.testing.assert_array_equal(np.asarray(lean.scale), np.asarray(ref.scale))
    assert lean.dtype == ref.dtype and lean.channel_axes == ref.channel_axes


def test_dynamic_activation_quantizer_non_finite_and_excluded_specs():
    from qjax.quant.ops_common import _lean_dynamic

    assert not _lean_dynamic(qjax.QuantSpec(qjax.int8, calibration=qjax.calib.absmax(half_step=True)))
    assert not _lean_dynamic(qjax.QuantSpec(qjax.int8, symmetric=False))
    assert not _lean_dynamic(qjax.QuantSpec(qjax.fp8_e4m3))
    assert not _lean_dynamic(qjax.QuantSpec(qjax.int8, channel_axes=(0,), group_size=8, group_axis=1))
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    w = qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(1,)))
    x = rng.normal(size=(3, 32)).astype(np.float32)
    x[1, 3], x[2, 0] = np.inf, np.nan
    tokens = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    y = np.asarray(qdot(jnp.asarray(x), w, MM, lhs_spec=tokens))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all() and np.isnan(y[2]).all()


def test_split_error_is_relative_to_the_token_absmax():
    """The case hypothesis found: an output fed only by an element 700x below its token's
    absmax (int2 weight zero elsewhere) carries the pieces' absmax-relative error."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(1, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    qw = qjax.quantize(w, qjax.QuantSpec(qjax.int2, channel_axes=(1,), pack_axis=0))
    wd, xd = np.asarray(qw.dequantize(), np.float64), np.asarray(x, np.float64)
    assert np.count_nonzero(wd[:, 1]) == 1 and abs(xd[0, np.flatnonzero(wd[:, 1])[0]]) < 0.01
    y = np.asarray(qdot(x, qw, MM, method="split"), np.float64)
    bound = np.abs(xd).max() * 2.0**-21 * np.abs(wd).sum(axis=0)
    assert np.all(np.abs(y - xd @ wd)[0] <= bound)
