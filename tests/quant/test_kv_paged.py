"""``qjax.PagedKVCache``: pages of a pool shared through page tables. Every read equals a
contiguous ``qjax.KVCache`` that received the same tokens, bit for bit, and attention over it
equals float64 attention over the independently fake-quantized tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_cache import _int8_token_ref, _reference

import qjax

B, H, D, PAGE, PAGES_PER_SEQ = 2, 2, 8, 4, 3
POOL = 10
INT8_TOKEN = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
R = np.random.default_rng(1)


def _normal(*shape, scale=1.0):
    return jnp.asarray(scale * R.normal(size=shape), jnp.float32)


def _table():
    return jnp.asarray(R.permutation(POOL)[: B * PAGES_PER_SEQ].reshape(B, PAGES_PER_SEQ), jnp.int32)


SPECS = {
    "int8 per token": dict(spec=INT8_TOKEN),
    "int4 per token, groups, zero points": dict(
        spec=qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=4, group_axis=3, symmetric=False)
    ),
    "fp8 static per head": dict(
        spec=qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(2,)),
        k_scale=jnp.array([0.01, 0.02]).reshape(1, 1, H, 1),
        v_scale=jnp.array([0.03, 0.01]).reshape(1, 1, H, 1),
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_prefill_and_decode_equal_a_contiguous_cache(name):
    kw = SPECS[name]
    paged = qjax.PagedKVCache.init(
        num_pages=POOL, page_size=PAGE, heads=H, head_dim=D, dtype=jnp.float32, **kw
    )
    flat = qjax.KVCache.init(
        batch=B, length=PAGES_PER_SEQ * PAGE, heads=H, head_dim=D, dtype=jnp.float32, **kw
    )
    table = _table()
    lengths = jnp.array([5, 3])  # a ragged prompt batch, padded to 5
    k, v = _normal(B, 5, H, D), _normal(B, 5, H, D)
    paged = paged.update(k, v, table, index=0, count=lengths)
    flat = flat.update(k, v, index=0, count=lengths)
    for _ in range(3):  # decode steps, each sequence at its own position
        k, v = _normal(B, 1, H, D), _normal(B, 1, H, D)
        paged, flat = paged.update(k, v, table, index=lengths), flat.update(k, v, index=lengths)
        lengths = lengths + 1
    gathered = paged.gather(table)
    for a, b in zip(gathered.dequantize(), flat.dequantize()):
        np.testing.assert_array_equal(a, b)
    q = _normal(B, 1, 2 * H, D)
    np.testing.assert_array_equal(
        paged.attend(q, table, index=lengths - 1), flat.attend(q, index=lengths - 1)
    )
    assert paged.nbytes == paged.pool.nbytes


def test_attention_against_float64_and_a_shared_prefix_page():
    # both sequences start with the same PAGE-token prompt, stored once in page 7
    paged = qjax.PagedKVCache.init(
        INT8_TOKEN, num_pages=POOL, page_size=PAGE, heads=H, head_dim=D, dtype=jnp.float32
    )
    table = jnp.array([[7, 2, 5], [7, 0, 9]], jnp.int32)
    prefix_k, prefix_v = _normal(1, PAGE, H, D), _normal(1, PAGE, H, D)
    paged = paged.update(prefix_k, prefix_v, table[:1], index=0)  # sequence 0 writes the prefix
    tail_k, tail_v = _normal(B, 2, H, D), _normal(B, 2, H, D)
    paged = paged.update(tail_k, tail_v, table, index=PAGE)  # each its own continuation
    k = np.concatenate([np.broadcast_to(prefix_k, (B, PAGE, H, D)), tail_k], axis=1)
    v = np.concatenate([np.broadcast_to(prefix_v, (B, PAGE, H, D)), tail_v], axis=1)
    q = _normal(B, 2, 2 * H, D)
    got = paged.attend(q, table, index=PAGE)
    kq = np.concatenate([_int8_token_ref(k), np.zeros((B, 2 * PAGE - 2, H, D))], axis=1)
    vq = np.concatenate([_int8_token_ref(v), np.zeros((B, 2 * PAGE - 2, H, D))], axis=1)
    np.testing.assert_allclose(got, _reference(q, kq, vq, PAGE), rtol=1e-5, atol=1e-5)


def test_jit_drops_positions_past_the_pages():
    paged = qjax.PagedKVCache.init(
        INT8_TOKEN, num_pages=POOL, page_size=PAGE, heads=H, head_dim=D, dtype=jnp.float32
    )
    table = _table()
    write = jax.jit(lambda c, k, v, i: c.update(k, v, table, index=i))
    full = write(paged, _normal(B, 3, H, D), _normal(B, 3, H, D), jnp.array([PAGES_PER_SEQ * PAGE - 1, 0]))
    # sequence 0 wrote one token (the last slot of its last page); the two past it were dropped
    used = np.asarray(full.pool.k.scale != 1).any(axis=(1, 2, 3))
    assert used.sum() == 2 and used[int(table[0, -1])] and used[int(table[1, 0])]


def test_bad_arguments_are_refused():
    paged = qjax.PagedKVCache.init(INT8_TOKEN, num_pages=POOL, page_size=PAGE, heads=H, head_dim=D)
    k = _normal(B, 2, H, D)
    with pytest.raises(
        ValueError, match="page_table must be an integer array of shape \\(2, pages_per_sequence\\)"
    ):
        paged.update(k, k, jnp.zeros((3, 2), jnp.int32), index=0)
    with pytest.raises(ValueError, match="page 10, outside the pool's 10 pages"):
        paged.update(k, k, jnp.full((B, 2), 10, jnp.int32), index=0)
    with pytest.raises(ValueError, match="index"):
        paged.update(k, k, _table(), index=PAGES_PER_SEQ * PAGE - 1)
    kivi = qjax.QuantSpec(qjax.int4, channel_axes=(0, 2, 3), group_size=PAGE, group_axis=1)
    with pytest.raises(ValueError, match="not paged"):
        qjax.PagedKVCache.init(kivi, num_pages=POOL, page_size=PAGE, heads=H, head_dim=D)


def test_traced_out_of_range_ids_and_positions_touch_no_page():
    # a traced padding id (-1) or a negative position is dropped on write and never reads
    # fill values (a NaN scale would reach the query through 0 x NaN)
    paged = qjax.PagedKVCache.init(
        INT8_TOKEN, num_pages=4, page_size=2, heads=1, head_dim=4, dtype=jnp.float32
    )
    ones = jnp.ones((1, 2, 1, 4))
    paged = paged.update(5 * ones, 5 * ones, jnp.array([[3, 2]]), index=0)  # page 3 holds 5s
    write = jax.jit(lambda c, t, i: c.update(ones, ones, t, index=i))
    after = write(paged, jnp.array([[0, -1]]), jnp.array([1]))  # positions 1 and 2: page 0 and -1
    np.testing.assert_array_equal(after.pool.k.dequantize()[3], paged.pool.k.dequantize()[3])
    negative = write(paged, jnp.array([[0, 1]]), jnp.array([-1]))  # positions -1 (dropped) and 0
    np.testing.assert_array_equal(negative.pool.k.dequantize()[0, 1], jnp.zeros((1, 4)))
    read = jax.jit(lambda c, t: c.attend(jnp.ones((1, 1, 1, 4)), t, index=0))
    assert bool(jnp.all(jnp.isfinite(read(after, jnp.array([[0, 9]])))))


def test_clear_errors_for_pool_sizes_repeated_pages_and_batches():
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        qjax.PagedKVCache.init(INT8_TOKEN, num_pages=2, page_size=0, heads=1, head_dim=4)
    kivi = qjax.QuantSpec(qjax.int4, channel_axes=(0, 2, 3), group_size=4, group_axis=1)
    with pytest.raises(ValueError, match="not paged"):
        qjax.PagedKVCache.init(kivi, num_pages=2, page_size=2, heads=1, head_dim=4)
    paged = qjax.PagedKVCache.init(INT8_TOKEN, num_pages=4, page_size=2, heads=1, head_dim=4)
    ones = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match="holds a page twice"):
        paged.update(ones, ones, jnp.array([[1, 1]]), index=0)
    with pytest.raises(ValueError, match="page_table has 1 rows"):
        paged.attend(jnp.ones((2, 1, 1, 4)), jnp.array([[0, 1]]), index=0)
    with pytest.raises(ValueError, match="k must have shape"):
        paged.update(jnp.ones((2, 1, 4)), jnp.ones((2, 1, 4)), jnp.array([[0, 1]]), index=0)
