"""fold_groups: where an input-channel factor of a matmul folds into params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.fold import fold_groups

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)


class Block(nn.Module):
    """Pre-LN attention (q, k, v with a head reshape, v→o) and a GELU MLP."""

    heads: int = 2

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        hd = c // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.Dense(c, name="q")(h).reshape(b, t, self.heads, hd)
        k = nn.Dense(c, name="k")(h).reshape(b, t, self.heads, hd)
        v = nn.Dense(c, name="v")(h).reshape(b, t, self.heads, hd)
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd), axis=-1)
        x = x + nn.Dense(c, name="o")(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, c))
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(c, name="fc2")(nn.gelu(nn.Dense(2 * c, name="fc1")(h)))


def by_path(groups):
    return {p: g for g in groups for p in g.paths}


def test_transformer_block_groups():
    m = Block()
    v = m.init(jax.random.key(0), X)
    groups = fold_groups(m.apply, v, X)
    g = by_path(groups)
    qkv = g["params/q/kernel"]
    assert qkv.paths == ("params/q/kernel", "params/k/kernel", "params/v/kernel") and qkv.foldable
    assert qkv.producer_paths == ("params/ln1/scale", "params/ln1/bias")
    np.testing.assert_array_equal(qkv.channel_ids, np.arange(8))
    o = g["params/o/kernel"]
    assert o.paths == ("params/o/kernel",) and o.foldable
    assert o.producer_paths == ("params/v/kernel", "params/v/bias")
    fc1 = g["params/fc1/kernel"]
    assert fc1.paths == ("params/fc1/kernel",) and fc1.foldable
    assert fc1.producer_paths == ("params/ln2/scale", "params/ln2/bias")
    fc2 = g["params/fc2/kernel"]
    assert not fc2.foldable and "integer_pow" in fc2.reason  # GELU's x³
    # Every weight is in exactly one group.
    paths = [p for grp in groups for p in grp.paths]
    assert sorted(paths) == sorted(p for p in g) and len(paths) == len(set(paths)) == 6
    # The v kernel's fold targets are its output columns (axis 1), the bias elementwise.
    ids = dict(o.targets)
    assert ids["params/v/kernel"].shape == (1, 8) and ids["params/v/bias"].shape == (8,)


def test_relu_folds_gelu_and_residual_do_not():
    def f(p, x):
        h = x @ p["a"]
        r = jax.nn.relu(h) @ p["b"]  # ReLU is positively homogeneous: a → b folds
        g = jax.nn.gelu(h @ p["c"]) @ p["d"]  # GELU: c → d does not
        return r + g + (x + h @ p["e"]) @ p["f"]  # residual add with the input: e → f does not

    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) for k in "abcdef"}
    g = by_path(fold_groups(f, params, jnp.ones((3, 4))))
    # h = x @ a is read by b (through relu), c and e: one group, folding into a's columns.
    assert g["b"].paths == ("b", "c", "e") and g["b"].foldable and g["b"].producer_paths == ("a",)
    assert not g["d"].foldable
    assert not g["f"].foldable and "'add'" in g["f"].reason  # the residual
    assert not g["a"].foldable and "argument" in g["a"].reason


def test_shared_producer_output_must_feed_only_consumers():
    def f(p, x):
        h = x @ p["a"]
        return h @ p["b"] + h @ p["c"]  # both consumers of a: one group

    params = {k: jnp.ones((4, 4)) for k in "abc"}
    g = by_path(fold_groups(f, params, jnp.ones((2, 4))))
    assert g["b"].paths == ("b", "c") and g["b"].foldable

    def leaky(p, x):
        h = x @ p["a"]
        return h @ p["b"], h.sum()  # the unscaled h is also an output (via a reduction)

    g = by_path(fold_groups(leaky, params, jnp.ones((2, 4))))
    assert not g["b"].foldable


def test_fused_qkv_slice_folds_v_only():
    c = 8

    def f(p, x):
        qkv = x @ p["qkv"] + p["qkv_b"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        att = jax.nn.softmax(q @ k.T)
        return (att @ v) @ p["o"]

    rng = np.random.default_rng(2)
    params = {
        "qkv": rng.normal(size=(c, 3 * c)),
        "qkv_b": rng.normal(size=(3 * c,)),
        "o": rng.normal(size=(c, c)),
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    g = by_path(fold_groups(f, params, jnp.ones((5, c))))
    o = g["o"]
    assert o.foldable, o.reason
    np.testing.assert_array_equal(o.channel_ids, np.arange(2 * c, 3 * c))  # the v columns
    # Fold targets map every producer column; only the v columns get factors ≠ 1.
    assert dict(o.targets)["qkv_b"].tolist() == list(range(3 * c)) and o.num_channels == 3 * c


def test_weight_read_twice_and_norm_scale_used_twice():
    def f(p, x):
        h = (x * p["g"]) @ p["w"]
        return h @ p["w2"] + x @ p["w2"]  # w2 read by two matmuls

    params = {"g": jnp.ones(4), "w": jnp.ones((4, 4)), "w2": jnp.ones((4, 4))}
    g = by_path(fold_groups(f, params, jnp.ones((2, 4))))
    assert g["w"].foldable and g["w"].producer_paths == ("g",)
    assert not g["w2"].foldable and "several matmuls" in g["w2"].reason

    def twice(p, x):
        return (x * p["g"]) @ p["w"] + (x * p["g"]).sum()

    g = by_path(fold_groups(twice, params, jnp.ones((2, 4))))
    assert not g["w"].foldable


def test_multi_head_attention_module_and_scan():
    mha = nn.MultiHeadDotProductAttention(num_heads=2)
    v = mha.init(jax.random.key(0), X)
    g = by_path(fold_groups(mha.apply, v, X))
    out = g["params/out/kernel"]  # DenseGeneral [H, D, C] contracting (H, D)
    assert out.foldable and out.producer_paths == ("params/value/kernel", "params/value/bias")
    np.testing.assert_array_equal(out.channel_ids, np.arange(8))

    def scanned(p, x):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, p["stack"])[0]

    g = by_path(fold_groups(scanned, {"stack": jnp.ones((2, 4, 4))}, jnp.ones((2, 4))))
    assert not g["stack"].foldable and "scan" in g["stack"].reason


def test_rmsnorm_and_transposed_heads_keep_channel_identity():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RMSNorm()(x)
            v = nn.Dense(8, name="v")(h).reshape(2, 3, 4, 2)  # [B, T, D, H]: heads last
            o = jnp.swapaxes(v, -1, -2).reshape(2, 3, 8)  # merged as H*D: a permutation
            return nn.Dense(8, name="o")(o)

    m = M()
    v = m.init(jax.random.key(0), X)
    g = by_path(fold_groups(m.apply, v, X))
    assert g["params/v/kernel"].producer_paths == ("params/RMSNorm_0/scale",)
    o = g["params/o/kernel"]
    assert o.foldable
    # o's input row h*4 + d is v's output column d*2 + h.
    want = np.array([d * 2 + h for h in range(2) for d in range(4)])
    np.testing.assert_array_equal(o.channel_ids, want)
