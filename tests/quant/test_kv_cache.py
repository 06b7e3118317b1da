"""``qjax.KVCache``: a KV cache stored as codes. Written tokens against an independent
numpy quantizer, attention on the codes against float64 attention over the dequantized
cache, chunked writes against one write, decode loops against one causal pass."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax

B, T, H, D = 2, 12, 2, 8
R = np.random.default_rng(0)
INT8_TOKEN = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)


def _normal(*shape, scale=1.0):
    return jnp.asarray(scale * R.normal(size=shape), jnp.float32)


def _reference(q, k, v, index, mask=None, softmax_scale=None):
    """float64 softmax attention, one query head at a time; query head j reads kv head
    j // (q_heads // kv_heads); query s of batch b sees positions <= index[b] + s."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, hq, d = q.shape
    t, h = k.shape[1], k.shape[2]
    index = np.broadcast_to(np.asarray(index), (b,))
    scale = 1 / np.sqrt(d) if softmax_scale is None else softmax_scale
    out = np.zeros_like(q)
    for bi in range(b):
        for si in range(s):
            for j in range(hq):
                kv = j // (hq // h)
                logits = scale * (k[bi, :, kv] @ q[bi, si, j])
                seen = np.arange(t) <= index[bi] + si
                if mask is not None:
                    seen &= np.broadcast_to(mask, (b, hq, s, t))[bi, j, si]
                if not seen.any():
                    continue
                logits = np.where(seen, logits, -np.inf)
                p = np.exp(logits - logits.max())
                out[bi, si, j] = (p / p.sum()) @ v[bi, :, kv]
    return out


def _int8_token_ref(x):
    """Independent per-(token, head) symmetric int8 fake quantization."""
    x = np.asarray(x, np.float64)
    s = np.abs(x).max(axis=-1, keepdims=True) / 127
    s = np.where(s == 0, 1, s)
    return np.clip(np.round(x / s), -127, 127) * s


def test_written_tokens_match_an_independent_int8_quantizer():
    k, v = _normal(B, 5, H, D), _normal(B, 5, H, D, scale=3.0)
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(k, v, 4)
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(np.asarray(kd[:, 4:9]), _int8_token_ref(k), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(vd[:, 4:9]), _int8_token_ref(v), rtol=1e-6, atol=1e-7)
    for arr in (kd, vd):
        assert not np.asarray(arr[:, :4]).any() and not np.asarray(arr[:, 9:]).any()
    assert cache.k.values.dtype == jnp.int8 and cache.shape == (B, T, H, D)


CHANNEL8 = qjax.QuantSpec(qjax.int8, channel_axes=(2, 3))
CHANNEL4 = qjax.QuantSpec(qjax.int4, channel_axes=(2, 3), symmetric=False)


def _calibrated(spec):
    """Static scales (and zero points) from sample keys / values narrower than the test data."""
    kw = {}
    for side in "kv":
        scale, zero = qjax.compute_scale(_normal(4, 8, H, D, scale=0.8), spec)
        kw[f"{side}_scale"] = scale
        if zero is not None:
            kw[f"{side}_zero_point"] = zero
    return kw


SPECS = {
    "int8/token": (INT8_TOKEN, {}),
    "int4/g4 packed": (qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=4, group_axis=3), {}),
    # groups of 3 split a byte of packed int4: the values product runs on unpacked codes
    "int4/g3 asym": (
        qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=4, group_axis=-1, symmetric=False),
        {},
    ),
    "uint8 asym": (qjax.QuantSpec(qjax.uint8, channel_axes=qjax.PER_TOKEN, symmetric=False), {}),
    "fp8/token": (qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=qjax.PER_TOKEN), {}),
    "fp4/g4": (qjax.QuantSpec(qjax.fp4_e2m1, channel_axes=(0, 1, 2), group_size=4, group_axis=3), {}),
    "nf4/token": (qjax.QuantSpec(qjax.nf4, channel_axes=qjax.PER_TOKEN), {}),
    "int8/static tensor": (qjax.QuantSpec(qjax.int8), dict(k_scale=0.02, v_scale=0.05)),
    "fp8/static head bf16 scale": (
        qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(2,), scale_dtype="bfloat16"),
        dict(k_scale=jnp.array([0.01, 0.02]).reshape(1, 1, 2, 1), v_scale=0.02),
    ),
    # per-channel static scales (outlier key channels): keys' fold into q, values' onto the output
    "int8/static channel": (CHANNEL8, _calibrated(CHANNEL8)),
    "int4/static channel asym": (CHANNEL4, _calibrated(CHANNEL4)),
    "uint8/static asym": (
        qjax.QuantSpec(qjax.uint8, symmetric=False),
        dict(k_scale=0.03, k_zero_point=128, v_scale=0.04, v_zero_point=120),
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("group", [3])  # query heads per cache head (GQA; 1 in the mask and ragged tests)
def test_attention_on_codes_matches_float64_attention_over_the_dequantized_cache(name, group):
    spec, scales = SPECS[name]
    cache = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32, **scales)
    cache = cache.update(_normal(B, 6, H, D), _normal(B, 6, H, D), 0)
    index = jnp.array([6, 9])
    cache = jax.jit(lambda c, k, v: c.update(k, v, index))(cache, _normal(B, 3, H, D), _normal(B, 3, H, D))
    q = _normal(B, 3, H * group, D)
    out = jax.jit(lambda c, q: c.attend(q, index))(cache, q)
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(np.asarray(out), _reference(q, kd, vd, index), rtol=2e-5, atol=2e-6)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_packed_int4_with_groups_that_split_bytes():
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=3, group_axis=3)
    cache = qjax.KVCache.init(spec, batch=1, length=5, heads=1, head_dim=6, dtype=jnp.float32)
    cache = cache.update(_normal(1, 5, 1, 6), _normal(1, 5, 1, 6), 0)
    assert cache.v.packed_axis == -1
    q = _normal(1, 2, 1, 6)
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(np.asarray(cache.attend(q, 3)), _reference(q, kd, vd, 3), rtol=2e-5, atol=2e-6)


def test_bfloat16_cache_and_queries():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D)
    assert cache.k.dtype == jnp.bfloat16
    cache = cache.update(_normal(B, T, H, D).astype(jnp.bfloat16), _normal(B, T, H, D), 0)
    q = _normal(B, 2, 2 * H, D).astype(jnp.bfloat16)
    out = cache.attend(q, T - 2)
    kd, vd = cache.dequantize()
    assert out.dtype == jnp.bfloat16 and kd.dtype == jnp.bfloat16
    ref = _reference(q.astype(jnp.float32), kd.astype(jnp.float32), vd.astype(jnp.float32), T - 2)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=1e-2)


def test_quantized_queries_run_against_an_int8_per_token_reference():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(_normal(B, T, H, D), _normal(B, T, H, D), 0)
    q = _normal(B, 2, 2 * H, D)
    out = cache.attend(q, 5, q_spec=INT8_TOKEN)
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(
        np.asarray(out), _reference(_int8_token_ref(q), kd, vd, 5), rtol=2e-5, atol=2e-6
    )
    assert not np.allclose(np.asarray(out), _reference(q, kd, vd, 5), rtol=1e-6, atol=1e-7)


def test_mask_alone_and_with_index_and_fully_masked_queries_give_zeros():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(_normal(B, T, H, D), _normal(B, T, H, D), 0)
    q = _normal(B, 3, H, D)
    mask = jnp.asarray(R.random((B, 1, 3, T)) < 0.5).at[0, 0, 1].set(False)
    kd, vd = cache.dequantize()
    big = np.full((B,), T)  # the reference's causal bound then hides nothing
    out = cache.attend(q, mask=mask)
    np.testing.assert_allclose(np.asarray(out), _reference(q, kd, vd, big, mask=mask), rtol=2e-5, atol=2e-6)
    assert not np.asarray(out[0, 1]).any()
    both = cache.attend(q, 4, mask=mask, softmax_scale=0.3)
    ref = _reference(q, kd, vd, 4, mask=mask, softmax_scale=0.3)
    np.testing.assert_allclose(np.asarray(both), ref, rtol=2e-5, atol=2e-6)


_KV = (_normal(B, T, H, D), _normal(B, T, H, D))


@settings(max_examples=examples(6))
@given(cuts=st.lists(st.integers(1, T - 1), max_size=4, unique=True))
def test_chunked_writes_store_the_same_codes_as_one_write(cuts):
    """Per-token scales depend on the token only: a prompt written in pieces (prefill in
    chunks, then decoding) stores bit-identical codes and scales."""
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=4, group_axis=3, symmetric=False)
    k, v = _KV
    init = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    update = jax.jit(lambda c, k, v, a: c.update(k, v, a))  # one compile per chunk length
    whole = update(init, k, v, 0)
    pieces = init
    bounds = [0, *sorted(cuts), T]
    for a, b in itertools.pairwise(bounds):
        pieces = update(pieces, k[:, a:b], v[:, a:b], a)
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(pieces)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_token_by_token_decoding_equals_one_causal_pass():
    """A decode loop (``lax.fori_loop``, one token per step) gives the outputs of one
    causal pass over the whole sequence: the same codes, the same visible positions."""
    k, v = _KV
    q = _normal(B, T, 2 * H, D)
    init = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)

    @jax.jit
    def decode(cache):
        def step(i, carry):
            cache, out = carry
            ki, vi, qi = (jax.lax.dynamic_slice_in_dim(a, i, 1, axis=1) for a in (k, v, q))
            cache = cache.update(ki, vi, i)
            return cache, jax.lax.dynamic_update_slice_in_dim(out, cache.attend(qi, i), i, axis=1)

        return jax.lax.fori_loop(0, T, step, (cache, jnp.zeros_like(q)))

    cache, stepped = decode(init)
    once = init.update(k, v, 0).attend(q, 0)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(once), rtol=1e-5, atol=1e-6)
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(np.asarray(once), _reference(q, kd, vd, 0), rtol=2e-5, atol=2e-6)


def test_a_stack_of_caches_scans_over_layers():
    layers = 3
    make = lambda _: qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    stack = jax.vmap(make)(jnp.arange(layers))
    ks, vs, q = _normal(layers, B, 4, H, D), _normal(layers, B, 4, H, D), _normal(B, 4, H, D)

    def layer(x, inputs):
        cache, k, v = inputs
        cache = cache.update(k, v, 2)
        return x + cache.attend(x, 2), cache

    out, stack = jax.lax.scan(layer, q, (stack, ks, vs))
    x = q
    for i in range(layers):
        cache = make(i).update(ks[i], vs[i], 2)
        x = x + cache.attend(x, 2)
        np.testing.assert_array_equal(np.asarray(stack.k.values[i]), np.asarray(cache.k.values))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"a stack of caches .*leading axes \(3,\).*scan"):
        stack.update(ks[0], vs[0], 0)  # forgot the scan: said so (it was "too many values to unpack")


def test_gradient_with_respect_to_queries_matches_float64():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=1, length=6, heads=1, head_dim=4, dtype=jnp.float32)
    cache = cache.update(_normal(1, 6, 1, 4), _normal(1, 6, 1, 4), 0)
    kd, vd = (np.asarray(a, np.float64) for a in cache.dequantize())
    q = _normal(1, 2, 2, 4)
    w = _normal(1, 2, 2, 4)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(w * cache.attend(q, 3))))(q)
    with jax.enable_x64(True):

        def ref(q):  # float64 attention in jnp, query head j on kv head 0
            logits = jnp.einsum("bsjd,btd->bjst", q, kd[:, :, 0]) / 2.0
            seen = jnp.arange(6)[None, :] <= 3 + jnp.arange(2)[:, None]
            p = jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1)
            return jnp.sum(np.asarray(w, np.float64) * jnp.einsum("bjst,btd->bsjd", p, vd[:, :, 0]))

        want = jax.grad(ref)(jnp.asarray(q, jnp.float64))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_nan_in_one_token_reaches_only_the_queries_that_read_it():
    k = _normal(B, 4, H, D).at[0, 2, 0, 3].set(jnp.nan)
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(k, _normal(B, 4, H, D), 0)
    out = np.asarray(cache.attend(_normal(B, 4, H, D), 0))
    assert np.isnan(out[0, 2:, 0]).all()  # batch 0, head 0, queries that see position 2
    assert np.isfinite(out[0, :2]).all() and np.isfinite(out[0, :, 1]).all() and np.isfinite(out[1]).all()


def test_traced_writes_past_the_end_are_dropped_not_wrapped():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(_normal(B, T, H, D), _normal(B, T, H, D), 0)
    before = cache.dequantize()
    update = jax.jit(lambda c, k, v, i: c.update(k, v, i))
    new = _normal(B, 2, H, D)
    after = update(cache, new, new, jnp.array([T - 1, -1])).dequantize()
    # batch 0 writes positions T-1 (kept) and T (dropped); batch 1 writes -1 (dropped) and 0
    for old, cur in zip(before, after):
        np.testing.assert_array_equal(np.asarray(cur[0, : T - 1]), np.asarray(old[0, : T - 1]))
        np.testing.assert_array_equal(np.asarray(cur[1, 1:]), np.asarray(old[1, 1:]))
    np.testing.assert_allclose(np.asarray(after[0][0, T - 1]), _int8_token_ref(new[0, 0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(after[0][1, 0]), _int8_token_ref(new[1, 1]), rtol=1e-6)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("blocks", [False, True])
def test_sharded_cache_matches_the_unsharded_one(axis_type, blocks):
    """Batch on one mesh axis, heads on another; in Explicit mode the shardings are part
    of the types (the writes keep the batch axis sharded)."""
    mesh = jax.make_mesh(
        (2, 2), ("data", "model"), axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 2
    )
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=4, group_axis=3)
    cache = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    if blocks:
        cache = qjax.KVCache.init(
            KIVI4, value_spec=spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32
        )
    k, v = _KV
    q = _normal(B, 3, 2 * H, D)
    step = lambda c, k, v, q: (lambda c: (c, c.attend(q, 4)))(c.update(k[:, :7], v[:, :7], 0))
    want_cache, want = jax.jit(step)(cache, k, v, q)
    P = jax.sharding.PartitionSpec
    place = lambda x: jax.device_put(
        x, jax.sharding.NamedSharding(mesh, P("data", None, "model") if x.ndim == 4 else P())
    )
    with jax.set_mesh(mesh):
        got_cache, got = jax.jit(step)(jax.tree.map(place, cache), *map(place, (k, v, q)))
    assert got_cache.k.values.sharding.spec[:3] == ("data", None, "model")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    for x, y in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nbytes_of_an_int8_per_token_cache():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=1, length=64, heads=4, head_dim=128)
    bf16_bytes = 2 * 64 * 4 * 128 * 2
    assert cache.nbytes == 2 * (64 * 4 * 128 + 64 * 4 * 4)  # int8 codes + a float32 scale per token-head
    assert cache.nbytes / bf16_bytes == pytest.approx((128 + 4) / 256)


def test_model_with_a_cache_under_quantized_weights():
    """``qjax.quantized`` quantizes the projections; the cache's products, already on
    codes, are left to the cache (an OpRule on the other matmuls does not reach them)."""
    params = {"wq": _normal(D, H * D), "wo": _normal(H * D, D)}
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(*_KV, 0)
    x = _normal(B, 2, D)

    def model(p, cache, x):
        q = (x @ p["wq"]).reshape(B, 2, H, D)
        with jax.named_scope("attn"):
            o = cache.attend(q, 5).reshape(B, 2, H * D)
            gate = jnp.einsum("bsd,bsd->bs", o, o)[..., None]
        return (o * gate) @ p["wo"]

    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(".*", weight=w8), qjax.OpRule("attn/.*", lhs=INT8_TOKEN, rhs=INT8_TOKEN)])
    got = jax.jit(qjax.quantized(model, policy))(params, cache, x)
    dq = jax.tree.map(lambda w: qjax.quantize(w, w8).dequantize(), params)
    o = cache.attend((x @ dq["wq"]).reshape(B, 2, H, D), 5).reshape(B, 2, H * D)
    ref_o = _int8_token_ref(o)
    gate = np.einsum("bsd,bsd->bs", ref_o, ref_o)[..., None]
    want = (np.asarray(o, np.float64) * gate) @ np.asarray(dq["wo"], np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    cache = qjax.KVCache.init(
        qjax.QuantSpec(qjax.int4, channel_axes=qjax.PER_TOKEN), batch=1, length=4, heads=1, head_dim=4
    )
    cache = cache.update(_normal(1, 3, 1, 4), _normal(1, 3, 1, 4), 0)
    qjax.checkpoint.save(tmp_path / "c", {"cache": cache})
    back = qjax.checkpoint.restore(tmp_path / "c", {"cache": cache})["cache"]
    assert isinstance(back, qjax.KVCache) and back.k_spec == cache.k_spec
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- errors ---------------------------------------------------------------------------------


def _init(spec=INT8_TOKEN, **kw):
    dims = dict(batch=B, length=T, heads=H, head_dim=D) | kw
    return qjax.KVCache.init(spec, **dims)


@pytest.mark.parametrize(
    "spec, kw, match",
    [
        (qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, 3)), {}, "along head_dim only per group"),
        (qjax.QuantSpec(qjax.int8, channel_axes=(0, 1), group_size=2, group_axis=2), {}, "along head_dim"),
        (
            qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, 2), group_size=3, group_axis=3, pad_groups=True),
            {},
            "must divide head_dim",
        ),
        (qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), pack_axis=1), {}, "packed along head_dim"),
        (qjax.QuantSpec(qjax.int8, channel_axes=(1, 2)), {}, "also be per batch row"),
        (INT8_TOKEN, dict(k_scale=0.1), "computes its scales from each written token"),
        (qjax.QuantSpec(qjax.int8), {}, "needs a static scale"),
        (
            qjax.QuantSpec(qjax.int8, channel_axes=(0,)),
            dict(k_scale=0.1, v_scale=0.1),
            "not along\nthe batch",
        ),
        (
            qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic"),
            {},
            "rounds to nearest",
        ),
        ("int8", {}, "expected a qjax.QuantSpec"),
        (INT8_TOKEN, dict(length=0), "length must be a positive int"),
        (INT8_TOKEN, dict(dtype=jnp.int8), "dtype must be a float dtype"),
    ],
)
def test_bad_specs_and_shapes_are_refused_by_name(spec, kw, match):
    with pytest.raises((ValueError, TypeError), match=match.replace("\n", " ")):
        _init(spec, **kw)


def test_bad_update_and_attend_arguments_are_refused_by_name():
    cache = _init()
    k = _normal(B, 2, H, D)
    with pytest.raises(ValueError, match=r"k must have shape \(batch, new_tokens"):
        cache.update(k[:, :, :1], k, 0)
    with pytest.raises(ValueError, match="same number of tokens"):
        cache.update(k, k[:, :1], 0)
    with pytest.raises(TypeError, match="v must be a float array"):
        cache.update(k, k.astype(jnp.int32), 0)
    with pytest.raises(ValueError, match=r"writes outside the cache's length 12"):
        cache.update(k, k, T - 1)
    with pytest.raises(ValueError, match=r"writes outside"):
        cache.update(k, k, jnp.array([0, -1]))
    with pytest.raises(ValueError, match=r"index must be a scalar or have shape \(2,\)"):
        cache.update(k, k, jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="index must be an integer"):
        cache.update(k, k, 1.0)
    assert cache.update(k[:, :0], k[:, :0], 0) is cache
    q = _normal(B, 1, 3, D)
    with pytest.raises(ValueError, match="a multiple of 2"):
        cache.attend(q, 0)
    with pytest.raises(ValueError, match=r"needs index= .* or mask="):
        cache.attend(_normal(B, 1, H, D))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast"):
        cache.attend(_normal(B, 1, H, D), mask=jnp.ones((3,), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        cache.attend(_normal(B, 1, H, D), mask=jnp.ones((T,)))


# -- keys scaled per channel over blocks of tokens (KIVI) ------------------------------------

KIVI4 = qjax.QuantSpec(qjax.int4, channel_axes=(0, 2, 3), group_size=4, group_axis=1, symmetric=False)
BLOCK_SPECS = {
    "int4 k/channel-block asym, v/token": (KIVI4, qjax.QuantSpec(qjax.int4, channel_axes=qjax.PER_TOKEN)),
    "int8 k and v/head-block": (qjax.QuantSpec(qjax.int8, channel_axes=(0, 2), group_size=6, group_axis=1),)
    * 2,
    "uint4 k and v/channel-block": (
        qjax.QuantSpec(qjax.uint4, channel_axes=(0, 2, 3), group_size=4, group_axis=1, symmetric=False),
    )
    * 2,
    "int2 k/channel-block, v/g4": (
        qjax.QuantSpec(qjax.int2, channel_axes=(0, 2, 3), group_size=4, group_axis=1),
        qjax.QuantSpec(qjax.int2, channel_axes=(0, 1, 2), group_size=4, group_axis=3),
    ),
}


def _block_ref(x, block, bits, symmetric):
    """Independent per-(batch, block of tokens, head, channel) fake quantization (numpy)."""
    x = np.asarray(x, np.float64)
    b, t, h, d = x.shape
    xb = x.reshape(b, t // block, block, h, d)
    if symmetric:
        s = np.abs(xb).max(axis=2, keepdims=True) / (2 ** (bits - 1) - 1)
        s = np.where(s == 0, 1, s)
        q = np.clip(np.round(xb / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    else:
        lo, hi = np.minimum(xb.min(axis=2, keepdims=True), 0), np.maximum(xb.max(axis=2, keepdims=True), 0)
        s = (hi - lo) / (2**bits - 1)
        s = np.where(s == 0, 1, s)
        z = -(2 ** (bits - 1)) - np.round(lo / s)
        q = (np.clip(np.round(xb / s) + z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) - z) * s
    return q.reshape(b, t, h, d)


def test_block_scaled_keys_match_an_independent_quantizer_after_chunked_writes():
    k, v = _KV
    cache = qjax.KVCache.init(KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    for a, b in itertools.pairwise([0, 3, 4, 9, 12]):
        cache = cache.update(k[:, a:b], v[:, a:b])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T, T])
    kd, _ = cache.dequantize()
    np.testing.assert_allclose(np.asarray(kd), _block_ref(k, 4, 4, False), rtol=1e-5, atol=1e-6)
    # a partial block is quantized over the tokens written so far
    part = qjax.KVCache.init(KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32).update(
        k[:, :6], v[:, :6]
    )
    np.testing.assert_allclose(
        np.asarray(part.dequantize()[0][:, :6]),
        _block_ref(k[:, :8].at[:, 6:].set(0), 4, 4, False)[:, :6],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(part.k_tail[:, :2]), np.asarray(k[:, 4:6]))


@pytest.mark.parametrize("name", list(BLOCK_SPECS))
def test_block_scaled_attention_matches_float64_and_one_write(name):
    k_spec, v_spec = BLOCK_SPECS[name]
    init = qjax.KVCache.init(
        k_spec, value_spec=v_spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32
    )
    k, v = _KV
    one = init.update(k[:, :11], v[:, :11], 0)
    cache = init
    for a, b in itertools.pairwise([0, 1, 2, 7, 11]):
        cache = jax.jit(lambda c, k, v: c.update(k, v))(cache, k[:, a:b], v[:, a:b])
    for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(one)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    q = _normal(B, 3, 2 * H, D)
    kd, vd = cache.dequantize()
    out = jax.jit(lambda c, q: c.attend(q, 8))(cache, q)
    np.testing.assert_allclose(np.asarray(out), _reference(q, kd, vd, 8), rtol=2e-5, atol=2e-6)


def test_block_scaled_keys_with_quantized_queries():
    """With ``q_spec`` the queries are quantized after each block's key scales are folded
    in: ``Q(q ⊙ s_j) · (c_t - z_j)`` for the tokens t of block j."""
    cache = qjax.KVCache.init(KIVI4, batch=1, length=8, heads=1, head_dim=4, dtype=jnp.float32)
    cache = cache.update(_normal(1, 8, 1, 4), _normal(1, 8, 1, 4))
    q = _normal(1, 1, 1, 4)
    out = cache.attend(q, 7, q_spec=INT8_TOKEN, softmax_scale=1.0)
    codes = np.asarray(cache.k.unpacked_values(), np.float64)[0, :, 0]  # (8, 4)
    scale = np.asarray(cache.k.scale, np.float64)[0, :, 0]  # (2 blocks, 4)
    zero = np.asarray(cache.k.zero_point, np.float64)[0, :, 0]
    logits = np.zeros(8)
    for j in range(2):
        qs = np.asarray(q, np.float64)[0, 0, 0] * scale[j]
        qq = _int8_token_ref(qs[None])[0]
        logits[4 * j : 4 * j + 4] = (codes[4 * j : 4 * j + 4] - zero[j]) @ qq
    p = np.exp(logits - logits.max())
    want = (p / p.sum()) @ np.asarray(cache.dequantize()[1], np.float64)[0, :, 0]
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], want, rtol=2e-5, atol=2e-6)


def test_block_scaled_decode_loop_and_scan_stack():
    k, v = _KV
    q = _normal(B, T, H, D)
    init = qjax.KVCache.init(KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)

    def step(i, carry):
        cache, out = carry
        ki, vi, qi = (jax.lax.dynamic_slice_in_dim(a, i, 1, axis=1) for a in (k, v, q))
        cache = cache.update(ki, vi)
        return cache, jax.lax.dynamic_update_slice_in_dim(out, cache.attend(qi, i), i, axis=1)

    cache, stepped = jax.jit(lambda c: jax.lax.fori_loop(0, T, step, (c, jnp.zeros_like(q))))(init)
    # each query read its block as it stood then (scales from the tokens written so far);
    # at block ends that equals the final cache
    final = init.update(k, v).attend(q, 0)
    ends = [3, 7, 11]
    np.testing.assert_allclose(np.asarray(stepped[:, ends]), np.asarray(final[:, ends]), rtol=1e-5, atol=1e-6)
    stack = jax.vmap(lambda _: init)(jnp.arange(2))
    stack = jax.lax.scan(lambda _, c: (None, c.update(k, v)), None, stack)[1]
    np.testing.assert_array_equal(np.asarray(stack.lengths), [[T, T], [T, T]])
    np.testing.assert_array_equal(np.asarray(stack.k.values[1]), np.asarray(cache.k.values))


def test_block_scaled_cache_errors_and_bytes():
    with pytest.raises(ValueError, match="must divide length=12"):
        _init(qjax.QuantSpec(qjax.int8, channel_axes=(0, 2, 3), group_size=5, group_axis=1, pad_groups=True))
    with pytest.raises(ValueError, match="must also be per batch row"):
        _init(qjax.QuantSpec(qjax.int8, channel_axes=(2, 3), group_size=4, group_axis=1))
    with pytest.raises(ValueError, match="only absmax and minmax"):
        _init(
            qjax.QuantSpec(
                qjax.int8,
                channel_axes=(0, 2, 3),
                group_size=4,
                group_axis=1,
                calibration=qjax.calib.percentile(99.0),
            )
        )
    with pytest.raises(ValueError, match="drop the static scale"):
        _init(KIVI4, k_scale=0.1)
    cache = _init(KIVI4, dtype=jnp.float32)
    k = _normal(B, 5, H, D)
    with pytest.raises(ValueError, match=r"appends at the tokens written so far, lengths=\[0, 0\]"):
        cache.update(k, k, 3)
    cache = cache.update(k, k, 0).update(k, k, jnp.array([5, 5]))
    with pytest.raises(ValueError, match="writes outside the cache's length 12"):
        cache.update(k, k)
    codes = 2 * B * T * H * D // 2  # int4 keys and values, packed
    blocks = B * (T // 4) * H * D * (4 + 1)  # float32 scale + int8 zero point per block and channel
    assert cache.nbytes == cache.k.nbytes + cache.v.nbytes + 2 * B * 4 * H * D * 4 + B * 4
    assert cache.k.nbytes + cache.v.nbytes == codes + 2 * blocks


# -- review findings (twentieth session) ------------------------------------------------------


def test_a_nan_written_to_a_static_cache_stays_in_its_token():
    spec = qjax.QuantSpec(qjax.int8)
    cache = qjax.KVCache.init(
        spec, batch=2, length=4, heads=1, head_dim=4, dtype=jnp.float32, k_scale=0.01, v_scale=0.01
    )
    k = jnp.full((2, 2, 1, 4), 0.5).at[0, 1, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"k holds NaN/Inf \(first at \[0, 1, 0, 0\]\)"):
        cache.update(k, jnp.ones((2, 2, 1, 4)), 0)
    kd = jax.jit(lambda c, k: c.update(k, k, 0))(cache, k).dequantize()[0]
    np.testing.assert_allclose(np.asarray(kd[1, :2]), 0.5)  # the other row and token are intact
    np.testing.assert_allclose(np.asarray(kd[0, 0]), 0.5)
    fp8 = qjax.KVCache.init(
        qjax.QuantSpec(qjax.fp8_e4m3),
        batch=2,
        length=4,
        heads=1,
        head_dim=4,
        dtype=jnp.float32,
        k_scale=0.01,
        v_scale=0.01,
    )
    kd = jax.jit(lambda c, k: c.update(k, k, 0))(fp8, k).dequantize()[0]
    assert np.isnan(np.asarray(kd[0, 1])).all() and np.isfinite(np.asarray(kd[1])).all()
    np.testing.assert_allclose(np.asarray(kd[0, 0]), 0.5, rtol=0.07)


def test_empty_positions_dequantize_to_zero_for_every_scale_layout():
    e8m0 = qjax.mx_spec(qjax.fp8_e4m3, block_axis=3, channel_axes=(0, 1, 2), block_size=4)
    asym = qjax.QuantSpec(qjax.uint8, symmetric=False)
    for spec, kw in ((e8m0, {}), (asym, dict(k_scale=0.03, k_zero_point=100, v_scale=0.02, v_zero_point=7))):
        cache = qjax.KVCache.init(spec, batch=B, length=6, heads=H, head_dim=D, dtype=jnp.float32, **kw)
        for part in cache.dequantize():
            np.testing.assert_array_equal(np.asarray(part), 0.0)
        cache = cache.update(_normal(B, 3, H, D), _normal(B, 3, H, D), 0)
        q = _normal(B, 1, H, D)
        kd, vd = cache.dequantize()
        out = cache.attend(q, 2)
        np.testing.assert_allclose(np.asarray(out), _reference(q, kd, vd, 2), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "q_spec",
    [
        qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, 2)),
        qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, 2), group_size=4, group_axis=3),
        qjax.QuantSpec(qjax.int4, channel_axes=(1, 2), symmetric=False),
    ],
)
def test_q_spec_axes_are_those_of_the_queries(q_spec):
    """With 3 query heads per cache head, ``channel_axes=(0, 1, 2)`` is one scale per query
    token and query head (not per cache head)."""
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(*_KV, 0)
    q = _normal(B, 2, 3 * H, D) * jnp.arange(1, 3 * H + 1).reshape(1, 1, -1, 1)
    out = cache.attend(q, 4, q_spec=q_spec)
    kd, vd = cache.dequantize()
    want = _reference(qjax.quantize(q, q_spec).dequantize(), kd, vd, 4)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-6)


def test_integer_method_runs_q_k_as_int8_and_bad_q_specs_are_named():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(*_KV, 0)
    q = _normal(B, 1, H, D)
    auto = cache.attend(q, 3, q_spec=INT8_TOKEN)
    np.testing.assert_allclose(
        np.asarray(cache.attend(q, 3, q_spec=INT8_TOKEN, method="int")),
        np.asarray(auto),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(
        ValueError, match=r"q_spec \(over q of shape \(2, 1, 2, 8\)\): group_size=3 does not divide"
    ):
        cache.attend(
            q, 3, q_spec=qjax.QuantSpec(qjax.int8, channel_axes=(0, 1, 2), group_size=3, group_axis=3)
        )
    with pytest.raises(TypeError, match=r"q_spec must be a qjax\.QuantSpec"):
        cache.attend(q, 3, q_spec="int8")
    with pytest.raises(ValueError, match=r"with 1 queries reads outside the cache's length 12"):
        cache.attend(q, T)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k_scale=0.0, v_scale=0.1), "k_scale must be finite and positive"),
        (dict(k_scale=0.1, v_scale=-1.0), "v_scale must be finite and positive"),
        (dict(k_scale=jnp.nan, v_scale=0.1), "k_scale must be finite"),
    ],
)
def test_bad_static_scales_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _init(qjax.QuantSpec(qjax.int8), **kw)


def test_fractional_static_zero_points_are_refused():
    with pytest.raises(ValueError, match="k_zero_point must hold integers"):
        _init(
            qjax.QuantSpec(qjax.uint8, symmetric=False),
            k_scale=0.1,
            k_zero_point=2.5,
            v_scale=0.1,
            v_zero_point=3,
        )


# -- second review (twentieth session) --------------------------------------------------------


def _attention_at(q, kd, vd, index):
    """jnp float attention over a dequantized cache (query head j on kv head j // R)."""
    r = q.shape[2] // kd.shape[2]
    k, v = jnp.repeat(kd, r, axis=2), jnp.repeat(vd, r, axis=2)
    logits = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    seen = jnp.arange(k.shape[1])[None, :] <= index + jnp.arange(q.shape[1])[:, None]
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), -1), v)


@pytest.mark.parametrize("layout", ["token", "static", "block"])
def test_quantized_queries_pass_straight_through_gradients(layout):
    specs = {
        "token": (INT8_TOKEN, {}),
        "static": (CHANNEL8, _calibrated(CHANNEL8)),
        "block": (KIVI4, {}),
    }
    spec, kw = specs[layout]
    cache = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32, **kw)
    cache = cache.update(*_KV, 0)
    q, w = _normal(B, 2, 2 * H, D), _normal(B, 2, 2 * H, D)
    loss = lambda q, q_spec: jnp.sum(w * cache.attend(q, 6, q_spec=q_spec))
    # eager: jitted, the block layout's gradient comes out NaN for one query under the test
    # suite's --xla_backend_optimization_level=0 (XLA:CPU), and finite at levels 1 and 2
    got = jax.grad(loss)(q, INT8_TOKEN)
    floats = jax.grad(loss)(q, None)
    assert np.abs(np.asarray(got)).max() > 0.1 * np.abs(np.asarray(floats)).max()
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(floats), atol=0.05 * np.abs(np.asarray(floats)).max()
    )
    if layout == "token":  # the STE: the float attention's gradient at the quantized queries
        kd, vd = cache.dequantize()
        fq = qjax.quantize(q, INT8_TOKEN).dequantize()
        want = jax.grad(lambda x: jnp.sum(w * _attention_at(x, kd, vd, 6)))(fq)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_second_review_refusals():
    with pytest.raises(ValueError, match="packed along head_dim"):
        _init(qjax.QuantSpec(qjax.int4, channel_axes=(0, 2, 3), group_size=4, group_axis=1, pack_axis=2))
    with pytest.raises(ValueError, match="k_scale must be finite and positive in the scale dtype"):
        _init(qjax.QuantSpec(qjax.int8), k_scale=1e-50, v_scale=0.1)
    with pytest.raises(ValueError, match="update needs index="):
        _init().update(_normal(B, 1, H, D), _normal(B, 1, H, D))
    block = _init(KIVI4).update(*_KV)
    q = _normal(B, 1, H, D)
    for method in ("int", "bogus"):
        with pytest.raises(ValueError, match="block-scaled keys are read dequantized unless q_spec"):
            block.attend(q, 3, method=method)
    np.testing.assert_allclose(
        np.asarray(block.attend(q, 3, method="dequant"), np.float32),
        np.asarray(block.attend(q, 3), np.float32),
    )


@pytest.mark.parametrize(
    "spec, kw",
    [
        (
            qjax.QuantSpec(qjax.uint8, symmetric=False),
            dict(k_scale=0.05, k_zero_point=128, v_scale=0.05, v_zero_point=3),
        ),
        (qjax.QuantSpec(qjax.nf4, channel_axes=(2,)), dict(k_scale=0.5, v_scale=0.5)),
    ],
)
def test_a_nan_token_in_a_static_cache_without_nan_codes_reads_zero(spec, kw):
    cache = qjax.KVCache.init(spec, batch=2, length=4, heads=H, head_dim=D, dtype=jnp.float32, **kw)
    k = jnp.full((2, 2, H, D), 0.5).at[0, 1, 0, 0].set(jnp.inf)
    kd = jax.jit(lambda c, k: c.update(k, k, 0))(cache, k).dequantize()[0]
    np.testing.assert_array_equal(np.asarray(kd[0, 1]), 0.0)
    np.testing.assert_allclose(np.asarray(kd[1, :2]), 0.5, rtol=0.1)


# -- ragged writes (count=) --------------------------------------------------------------------


@pytest.mark.parametrize("k_spec", [KIVI4, INT8_TOKEN], ids=["block", "token"])
def test_ragged_prompts_then_decoding_equal_one_cache_per_sequence(k_spec):
    """Prompts of 5 and 2 tokens padded to 6, then three decode steps in which the second
    sequence skips one: each row equals a batch-1 cache fed only its real tokens."""
    k, v = _KV
    kw = dict(length=T, heads=H, head_dim=D, dtype=jnp.float32)
    ragged = qjax.KVCache.init(k_spec, value_spec=KIVI4, batch=2, **kw)
    starts = jnp.zeros((2,), jnp.int32)
    ragged = ragged.update(k[:, :6], v[:, :6], starts, count=jnp.array([5, 2]))
    pos = jnp.array([5, 2])
    step = jax.jit(lambda c, k, v, i, n: c.update(k, v, i, count=n))
    for j, counts in enumerate(([1, 1], [1, 0], [1, 1])):
        counts = jnp.array(counts)
        ragged = step(ragged, k[:, 6 + j : 7 + j], v[:, 6 + j : 7 + j], pos, counts)
        pos = pos + counts
    np.testing.assert_array_equal(np.asarray(ragged.lengths), [8, 4])
    rows = {0: [0, 1, 2, 3, 4, 6, 7, 8], 1: [0, 1, 6, 8]}  # the real tokens of each row
    for r, taken in rows.items():
        single = qjax.KVCache.init(k_spec, value_spec=KIVI4, batch=1, **kw)
        for p, tok in enumerate(taken):
            single = single.update(k[r : r + 1, tok : tok + 1], v[r : r + 1, tok : tok + 1], p)
        n = len(taken)  # positions past a row's tokens are unwritten: codes may differ, values are 0
        for side, one in ((ragged.k, single.k), (ragged.v, single.v)):
            np.testing.assert_array_equal(np.asarray(side.values[r, :n]), np.asarray(one.values[0, :n]))
            np.testing.assert_array_equal(np.asarray(side.dequantize()[r]), np.asarray(one.dequantize()[0]))
        for x, y in (
            (ragged.k_tail, single.k_tail),
            (ragged.v_tail, single.v_tail),
            (ragged.lengths, single.lengths),
        ):
            if x is not None:
                np.testing.assert_array_equal(np.asarray(x[r : r + 1]), np.asarray(y))
    q = _normal(2, 1, H, D)
    kd, vd = ragged.dequantize()
    np.testing.assert_allclose(
        np.asarray(ragged.attend(q, pos - 1)), _reference(q, kd, vd, pos - 1), rtol=2e-5, atol=2e-6
    )


def test_count_checks():
    cache = _init()
    k = _normal(B, 3, H, D)
    with pytest.raises(ValueError, match=r"count \[4, 1\] must lie in \[0, 3\]"):
        cache.update(k, k, 0, count=jnp.array([4, 1]))
    with pytest.raises(TypeError, match="count must be an integer"):
        cache.update(k, k, 0, count=1.5)
    with pytest.raises(ValueError, match=r"writes outside the cache's length 12"):
        cache.update(k, k, jnp.array([9, 11]), count=jnp.array([3, 2]))
    cache = cache.update(k, k, jnp.array([9, 11]), count=jnp.array([3, 1]))  # fits
    kd = cache.dequantize()[0]
    assert np.asarray(kd[0, 9:12]).any() and np.asarray(kd[1, 11]).any()
    assert not np.asarray(kd[0, :9]).any() and not np.asarray(kd[1, :11]).any()


def test_padding_tokens_are_never_read_even_when_nan():
    spec = qjax.QuantSpec(qjax.int8)
    cache = qjax.KVCache.init(
        spec, batch=2, length=4, heads=1, head_dim=4, dtype=jnp.float32, k_scale=0.01, v_scale=0.01
    )
    k = jnp.full((2, 2, 1, 4), 0.5).at[1, 1].set(jnp.nan)  # row 1's second token is padding
    cache = cache.update(k, k, 0, count=jnp.array([2, 1]))
    kd = np.asarray(cache.dequantize()[0])
    np.testing.assert_allclose(kd[0, :2], 0.5)
    np.testing.assert_allclose(kd[1, 0], 0.5)
    np.testing.assert_array_equal(kd[1, 1:], 0.0)


def test_a_traced_count_outside_the_tokens_given_is_clipped():
    k, v = _KV
    cache = qjax.KVCache.init(KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = jax.jit(lambda c, n: c.update(k[:, :6], v[:, :6], count=n))(cache, jnp.array([7, -1]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 0])
    want = qjax.KVCache.init(KIVI4, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    want = want.update(k[:, :6], v[:, :6], count=jnp.array([6, 0]))
    for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_op_rule_that_only_a_cache_read_could_match_says_why():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
    cache = cache.update(*_KV, 0)
    params = {"w": _normal(D, D)}
    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(".*", weight=w8), qjax.OpRule(".*", lhs=INT8_TOKEN)])
    f = lambda p, c, x: c.attend(x @ p["w"], 3)
    with pytest.raises(ValueError, match=r"none outside custom_jvp / custom_vjp bodies.*KVCache\.attend"):
        jax.jit(qjax.quantized(f, policy))(params, cache, _normal(B, 1, H, D))  # the trace raises


# -- quantized attention weights (p_spec) ------------------------------------------------------

U8_ROWS = qjax.QuantSpec(qjax.uint8, channel_axes=qjax.PER_TOKEN)


def _probs(q, kd, index):
    """float64 attention weights (B, q_heads, S, T) over dequantized keys."""
    q, kd = np.asarray(q, np.float64), np.asarray(kd, np.float64)
    r = q.shape[2] // kd.shape[2]
    logits = np.einsum("bshd,bthd->bhst", q, np.repeat(kd, r, axis=2)) / np.sqrt(q.shape[-1])
    seen = np.arange(kd.shape[1])[None, :] <= index + np.arange(q.shape[1])[:, None]
    logits = np.where(seen, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _u8_rows(p):
    s = p.max(-1, keepdims=True) / 255
    return np.clip(np.round(p / np.where(s == 0, 1, s)), 0, 255) * s


def test_quantized_weights_with_static_values_match_an_independent_reference():
    spec = qjax.QuantSpec(qjax.int8)
    cache = qjax.KVCache.init(
        spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32, k_scale=0.03, v_scale=0.02
    )
    cache = cache.update(*_KV, 0)
    q = _normal(B, 2, 2 * H, D)
    kd, vd = (np.asarray(a, np.float64) for a in cache.dequantize())
    out = cache.attend(q, 5, p_spec=U8_ROWS)
    p = _u8_rows(_probs(q, kd, 5))
    want = np.einsum("bhst,bthd->bshd", p, np.repeat(vd, 2, axis=2))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_quantized_weights_fold_per_token_value_scales_first():
    cache = qjax.KVCache.init(INT8_TOKEN, batch=1, length=6, heads=1, head_dim=4, dtype=jnp.float32)
    cache = cache.update(_normal(1, 6, 1, 4), _normal(1, 6, 1, 4), 0)
    q = _normal(1, 1, 1, 4)
    kd = np.asarray(cache.dequantize()[0], np.float64)
    codes = np.asarray(cache.v.values, np.float64)[0, :, 0]  # (6, 4)
    scale = np.asarray(cache.v.scale, np.float64)[0, :, 0, 0]  # (6,)
    out = cache.attend(q, 5, p_spec=U8_ROWS, q_spec=INT8_TOKEN)
    q_kd = _probs(qjax.quantize(q, INT8_TOKEN).dequantize(), kd, 5)[0, 0, 0]
    want = _u8_rows((q_kd * scale)[None])[0] @ codes
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], want, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda q: jnp.sum(cache.attend(q, 5, p_spec=U8_ROWS) ** 2))(q)
    assert np.abs(np.asarray(grad)).max() > 0


def test_p_spec_refusals():
    q = _normal(B, 1, H, D)
    with pytest.raises(ValueError, match="p_spec: block-scaled values are read dequantized"):
        _init(KIVI4).update(*_KV).attend(q, 3, p_spec=U8_ROWS)
    with pytest.raises(ValueError, match="one scale per call"):
        _init().update(*_KV, 0).attend(q, 3, p_spec=qjax.QuantSpec(qjax.uint8, channel_axes=(0, 1)))
    with pytest.raises(TypeError, match="p_spec must be"):
        _init().update(*_KV, 0).attend(q, 3, p_spec="uint8")


def test_op_rules_leave_every_cache_layout_alone():
    """The cache's products, on codes or (block layouts) on dequantized codes, are not
    matched by an OpRule: quantizing them again would add error silently."""
    params = {"w": _normal(D, D)}
    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(".*", weight=w8), qjax.OpRule(".*", lhs=INT8_TOKEN)])
    for spec in (INT8_TOKEN, KIVI4):
        cache = qjax.KVCache.init(spec, batch=B, length=T, heads=H, head_dim=D, dtype=jnp.float32)
        cache = cache.update(*_KV, 0)
        f = lambda p, c, x: c.attend(x @ p["w"], 3)
        with pytest.raises(ValueError, match="none outside custom_jvp / custom_vjp bodies"):
            jax.jit(qjax.fake_quantized(f, policy))(params, cache, _normal(B, 1, H, D))  # the trace raises


def test_stochastic_query_or_weight_specs_are_refused():
    cache = _init().update(*_KV, 0)
    q = _normal(B, 1, H, D)
    for name in ("q_spec", "p_spec"):
        spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
        with pytest.raises(ValueError, match=f"{name}: attend takes no PRNG key"):
            cache.attend(q, 3, **{name: spec})
