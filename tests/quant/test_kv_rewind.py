"""``KVCache.rewind``: forgetting each sequence's last tokens (speculative decoding), against
caches that never received them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax

B, T, H, D = 2, 16, 2, 8
R = np.random.default_rng(0)
KIVI4 = qjax.QuantSpec(qjax.int4, channel_axes=(0, 2, 3), group_size=4, group_axis=1, symmetric=False)
TOKEN4 = qjax.QuantSpec(qjax.int4, channel_axes=qjax.PER_TOKEN)
TOKEN8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
STATIC_ASYM = qjax.QuantSpec(qjax.uint8, channel_axes=(2, 3), symmetric=False)


def _normal(*shape):
    return jnp.asarray(R.normal(size=shape), jnp.float32)


def _kivi():
    return qjax.KVCache.init(
        KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32, value_spec=TOKEN4
    )


def _same(a, b):
    """The same cache as far as anything reads it: what it dequantizes to (unwritten positions
    are 0 in both, whether as an empty cache's codes or as quantized zeros), the tails a next
    write continues from, and the lengths."""
    for x, y in zip(
        (*a.dequantize(), a.k_tail, a.v_tail, a.lengths), (*b.dequantize(), b.k_tail, b.v_tail, b.lengths)
    ):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("written,kept", [(15, 13), (15, 12), (12, 12), (7, 5), (9, 8), (3, 0)])
def test_inside_the_block_being_written_the_cache_is_the_one_that_never_got_the_tokens(written, kept):
    k, v = _normal(B, written, H, D), _normal(B, written, H, D)
    more_k, more_v = _normal(B, 3, H, D), _normal(B, 3, H, D)
    assert kept // 4 == written // 4  # inside the block being written
    got = _kivi().update(k, v).rewind(kept)
    want = _kivi().update(k[:, :kept], v[:, :kept])
    _same(got, want)
    _same(got.update(more_k, more_v), want.update(more_k, more_v))  # and it goes on the same


def test_inside_a_quantized_block_the_kept_tokens_continue_from_their_dequantized_values():
    k, v = _normal(B, 15, H, D), _normal(B, 15, H, D)
    more_k, more_v = _normal(B, 3, H, D), _normal(B, 3, H, D)
    full = _kivi().update(k, v)
    got = full.rewind(6)  # block 4..7 was quantized when token 7 arrived
    kd = full.dequantize()[0]
    want = _kivi().update(k[:, :4], v[:, :4]).update(kd[:, 4:6], v[:, 4:6])
    np.testing.assert_array_equal(got.lengths, [6, 6])
    np.testing.assert_array_equal(got.k_tail, want.k_tail)
    _same(got.update(more_k, more_v), want.update(more_k, more_v))
    # everything from position 6 on reads as unwritten
    gk, gv = got.dequantize()
    np.testing.assert_array_equal(gk[:, 6:], 0.0)
    np.testing.assert_array_equal(gv[:, 6:], 0.0)
    np.testing.assert_array_equal(gk[:, :4], kd[:, :4])


def test_speculative_decoding_loop_under_jit_with_per_sequence_acceptance():
    """Each step writes 3 draft tokens and keeps a per-sequence number of them; the cache
    stands for one that was written only the kept tokens: exactly for the per-token values,
    and for the block-scaled keys within the rounding that reopening a quantized block adds
    (sequence 1 at step 2 rewinds from 5 tokens to 2, into the block finished at 4)."""
    drafts = _normal(4, B, 3, H, D)
    accepted = np.array([[1, 2], [3, 0], [0, 2], [2, 3]])  # per step and sequence
    step = jax.jit(lambda c, d, a: c.update(d, d).rewind(c.lengths + a))
    cache = _kivi()
    for i in range(4):
        cache = step(cache, drafts[i], jnp.asarray(accepted[i], jnp.int32))
    np.testing.assert_array_equal(cache.lengths, accepted.sum(0))
    for b in range(B):  # one sequence at a time, written only its kept tokens
        kept = jnp.concatenate([drafts[i, b : b + 1, : accepted[i, b]] for i in range(4)], axis=1)
        ref = qjax.KVCache.init(
            KIVI4, batch=1, length=T, heads=H, head_dim=D, dtype=jnp.float32, value_spec=TOKEN4
        )
        ref = ref.update(kept, kept)
        got_k, got_v = (np.asarray(x)[b : b + 1] for x in cache.dequantize())
        want_k, want_v = ref.dequantize()
        n = int(accepted[:, b].sum())
        # the kept tokens re-quantized only with blocks reopened mid-way: compare within a code
        step_size = float(np.max(np.asarray(cache.k.scale)))  # one code of the coarsest block
        np.testing.assert_allclose(got_k[:, :n], want_k[:, :n], atol=step_size)
        np.testing.assert_array_equal(got_v[:, :n], want_v[:, :n])  # per-token: exact
        np.testing.assert_array_equal(got_k[:, n:], 0.0)


@pytest.mark.parametrize("spec,kw", [(TOKEN8, {}), (STATIC_ASYM, "calibrated")])
def test_an_indexed_cache_reads_the_forgotten_positions_as_unwritten(spec, kw):
    if kw == "calibrated":
        scale, zero = qjax.compute_scale(_normal(4, 8, H, D), spec)
        kw = dict(k_scale=scale, k_zero_point=zero, v_scale=scale, v_zero_point=zero)
    init = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32, **kw)
    k = _normal(B, 10, H, D)
    got = init.update(k, k, 0).rewind(jnp.asarray([7, 3]))
    assert got.lengths is None
    want = [init.update(k[:, :n], k[:, :n], 0) for n in (7, 3)]
    for b, w in enumerate(want):  # codes and every per-sequence array equal a cache written n tokens
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(w)):
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_array_equal(x[b] if x.shape[0] == B else x, y[b] if y.shape[0] == B else y)
    np.testing.assert_array_equal(got.dequantize()[0][1, 3:], 0.0)


def test_bad_lengths_are_refused_and_traced_ones_clipped():
    cache = _kivi().update(_normal(B, 5, H, D), _normal(B, 5, H, D))
    with pytest.raises(ValueError, match=r"rewind: lengths \[6, 6\] must each lie in \[0, lengths=\[5, 5\]"):
        cache.rewind(6)  # forward
    with pytest.raises(ValueError, match="must each lie in"):
        cache.rewind(-1)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cache.rewind(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        cache.rewind(2.0)
    clipped = jax.jit(lambda c, n: c.rewind(n))(cache, jnp.asarray([9, -2]))
    np.testing.assert_array_equal(clipped.lengths, [5, 0])


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_a_sharded_cache_rewinds_like_the_unsharded_one(axis_type):
    mesh = jax.make_mesh(
        (2, 2), ("data", "model"), axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 2
    )
    k, v = _normal(B, 11, H, D), _normal(B, 11, H, D)
    step = lambda c, k, v, n: c.update(k, v).rewind(n).update(k[:, :2], v[:, :2])
    lengths = jnp.asarray([6, 9], jnp.int32)  # into a quantized block; inside the block being written
    want = jax.jit(step)(_kivi(), k, v, lengths)
    P = jax.sharding.PartitionSpec
    place = lambda x: jax.device_put(
        x,
        jax.sharding.NamedSharding(
            mesh, P("data", None, "model") if x.ndim == 4 else P("data") if x.ndim else P()
        ),
    )
    with jax.set_mesh(mesh):
        got = jax.jit(step)(jax.tree.map(place, _kivi()), place(k), place(v), place(lengths))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rewinding_twice_or_to_a_lower_block_boundary_and_bf16_fp8_blocks():
    fp8_blocks = qjax.QuantSpec(
        qjax.fp8_e4m3, channel_axes=(0, 2, 3), group_size=4, group_axis=1, scale_dtype="e8m0"
    )
    init = qjax.KVCache.init(fp8_blocks, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.bfloat16)
    k = _normal(B, 15, H, D).astype(jnp.bfloat16)
    full = init.update(k, k)
    _same(full.rewind(13).rewind(9), full.rewind(9))
    at_boundary = full.rewind(8)  # blocks 0-1 kept whole: nothing re-rounded
    np.testing.assert_array_equal(at_boundary.lengths, [8, 8])
    want = init.update(k[:, :8], k[:, :8])
    _same(at_boundary, want)
    more = _normal(B, 5, H, D).astype(jnp.bfloat16)
    _same(at_boundary.update(more, more), want.update(more, more))


def test_concrete_lengths_are_checked_under_jit_and_traced_ones_do_not_wrap():
    cache = _kivi().update(_normal(B, 10, H, D), _normal(B, 10, H, D))
    with pytest.raises(ValueError, match="must each lie in"):
        jax.jit(lambda c: c.rewind(-1))(cache)  # not "drop the last token": refused
    with pytest.raises(ValueError, match=r"must each lie in \[0, 16, the cache's length\]"):
        token = qjax.KVCache.init(TOKEN8, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
        jax.jit(lambda c: c.rewind(20))(token)
    huge = jax.jit(lambda c, n: c.rewind(n))(cache, jnp.asarray([2**32 - 1, 7], jnp.uint32))
    np.testing.assert_array_equal(huge.lengths, [10, 7])  # clipped, not wrapped to -1
