"""Channel-coupling groups: hand-derived groups for MLP, CNN+BN, residual, attention, concat,
split, depthwise conv, control flow; non-prunable groups carry the reason."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from qjax.graph import nnx_apply
from qjax.graph.coupling import channel_groups, format_groups


def _members(g):
    return {(m.path, m.axis, m.unit) for m in g.members}


def _by_member(groups, path, axis, k=0):
    """The k-th group (in group order) that has ``path``'s ``axis`` as a member."""
    found = [g for g in groups if any(m.path == path and m.axis == axis for m in g.members)]
    return found[k]


def _rand(key, *shape):
    return jnp.asarray(np.random.default_rng(key).standard_normal(shape), jnp.float32)


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


MLP_PARAMS = {"w1": _rand(0, 6, 16), "b1": _rand(1, 16), "w2": _rand(2, 16, 12), "b2": _rand(3, 12),
              "w3": _rand(4, 12, 3), "b3": _rand(5, 3)}  # fmt: skip


def test_mlp_groups_match_hand_derivation():
    groups = channel_groups(mlp, MLP_PARAMS, jnp.ones((2, 6)))
    assert {g.name: (g.size, g.prunable) for g in groups} == {
        "w1:0": (6, False),
        "w1:1": (16, True),
        "w2:1": (12, True),
        "w3:1": (3, False),
    }
    h1 = _by_member(groups, "w1", 1)
    assert _members(h1) == {("w1", 1, 1), ("b1", 0, 1), ("w2", 0, 1)}
    assert _members(_by_member(groups, "w2", 1)) == {("w2", 1, 1), ("b2", 0, 1), ("w3", 0, 1)}
    assert "input axis" in _by_member(groups, "w1", 0).reason
    logits = _by_member(groups, "w3", 1)
    assert "output axis" in logits.reason and logits.reasons
    np.testing.assert_array_equal(h1.members[0].positions[:, 0], np.arange(16))
    assert "w1:1 (size 16): prunable" in format_groups(groups)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_cnn_batchnorm_and_flatten():
    model, x = CNN(), jnp.ones((2, 8, 8, 1))
    v = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes suffice
    groups = channel_groups(model.apply, v, x, train=False)
    g0 = _by_member(groups, "params/Conv_0/kernel", 3)
    assert g0.prunable and g0.name == "params/Conv_0/kernel:3" and g0.size == 8
    assert _members(g0) == {
        ("params/Conv_0/kernel", 3, 1), ("params/Conv_0/bias", 0, 1), ("params/BatchNorm_0/scale", 0, 1),
        ("params/BatchNorm_0/bias", 0, 1), ("batch_stats/BatchNorm_0/mean", 0, 1),
        ("batch_stats/BatchNorm_0/var", 0, 1), ("params/Conv_1/kernel", 2, 1),
    }  # fmt: skip
    g1 = _by_member(groups, "params/Conv_1/kernel", 3)
    assert g1.prunable and ("params/Dense_0/kernel", 0, 64) in _members(g1)
    dense = next(m for m in g1.members if m.path == "params/Dense_0/kernel")
    np.testing.assert_array_equal(dense.positions[2], np.arange(64) * 6 + 2)  # flatten: strided rows
    spatial = _by_member(groups, "params/Conv_0/kernel", 0)
    assert not spatial.prunable and "spatial" in spatial.reason


def test_batchnorm_training_mode_makes_stats_outputs():
    model, x = CNN(), jnp.ones((2, 8, 8, 1))
    v = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes suffice
    f = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    g0 = _by_member(channel_groups(f, v, x), "params/Conv_0/kernel", 3)
    assert not g0.prunable and "output axis" in g0.reason


def residual(p, x):
    h = jax.nn.relu(x @ p["w0"])
    h = h + jax.nn.relu(h @ p["a1"]) @ p["a2"]
    h = h + jax.nn.relu(h @ p["b1"]) @ p["b2"] + p["bias"]
    return h @ p["out"]


RES_PARAMS = {"w0": _rand(0, 5, 8), "a1": _rand(1, 8, 4), "a2": _rand(2, 4, 8), "b1": _rand(3, 8, 6),
              "b2": _rand(4, 6, 8), "bias": _rand(5, 8), "out": _rand(6, 8, 2)}  # fmt: skip


def test_residual_adds_couple_layers():
    groups = channel_groups(residual, RES_PARAMS, jnp.ones((3, 5)))
    stream = _by_member(groups, "w0", 1)
    assert stream.prunable
    assert _members(stream) == {("w0", 1, 1), ("a1", 0, 1), ("a2", 1, 1), ("b1", 0, 1), ("b2", 1, 1),
                                ("bias", 0, 1), ("out", 0, 1)}  # fmt: skip
    assert _by_member(groups, "a1", 1).prunable and _by_member(groups, "b1", 1).prunable


def attention(p, x, *, head_dim=4):
    b, s, _ = x.shape
    q = (x @ p["wq"] + p["bq"]).reshape(b, s, -1, head_dim)
    k = (x @ p["wk"]).reshape(b, s, -1, head_dim)
    v = (x @ p["wv"]).reshape(b, s, -1, head_dim)
    a = jax.nn.softmax(jnp.einsum("bshd,bthd->bhst", q, k) / head_dim**0.5, axis=-1)
    o = jnp.einsum("bhst,bthd->bshd", a, v).reshape(b, s, -1)
    return o @ p["wo"]


ATT_PARAMS = {"wq": _rand(0, 8, 12), "bq": _rand(1, 12), "wk": _rand(2, 8, 12), "wv": _rand(3, 8, 12),
              "wo": _rand(4, 12, 8)}  # fmt: skip


def test_attention_heads_are_a_group_in_units_of_head_dim():
    groups = channel_groups(attention, ATT_PARAMS, jnp.ones((2, 5, 8)))
    heads = _by_member(groups, "wq", 1, 0)
    assert heads.prunable and heads.size == 3
    assert _members(heads) == {("wq", 1, 4), ("bq", 0, 4), ("wk", 1, 4), ("wv", 1, 4), ("wo", 0, 4)}
    np.testing.assert_array_equal(heads.members[0].positions[1], [4, 5, 6, 7])
    head_dim = _by_member(groups, "wq", 1, 1)
    assert head_dim.size == 4 and not head_dim.prunable and "head_dim" in head_dim.reason
    assert "output axis" in _by_member(groups, "wo", 1).reason


def test_layernorm_reduced_channels_not_prunable():
    def f(p, x):
        h = x @ p["w1"]
        mu = h.mean(-1, keepdims=True)
        h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["g"]
        return h @ p["w2"]

    p = {"w1": _rand(0, 4, 6), "g": _rand(1, 6), "w2": _rand(2, 6, 3)}
    g = _by_member(channel_groups(f, p, jnp.ones((2, 4))), "w1", 1)
    assert not g.prunable and "reduced over by reduce_sum" in g.reason
    assert _members(g) == {("w1", 1, 1), ("g", 0, 1), ("w2", 0, 1)}


def test_concat_and_split():
    def f(p, x):
        c = jnp.concatenate([jax.nn.relu(x @ p["a"]), jax.nn.relu(x @ p["b"])], axis=-1)
        u, v = jnp.split(c @ p["w"], 2, axis=-1)  # a GLU: both halves are one group
        return (u * jax.nn.sigmoid(v)) @ p["o"]

    p = {"a": _rand(0, 3, 4), "b": _rand(1, 3, 5), "w": _rand(2, 9, 12), "o": _rand(3, 6, 2)}
    groups = channel_groups(f, p, jnp.ones((2, 3)))
    ga, gb = _by_member(groups, "a", 1), _by_member(groups, "b", 1)
    assert ga.prunable and gb.prunable and ga is not gb
    w_rows = lambda g: next(m for m in g.members if m.path == "w").positions
    np.testing.assert_array_equal(w_rows(ga)[:, 0], np.arange(4))
    np.testing.assert_array_equal(w_rows(gb)[:, 0], 4 + np.arange(5))
    glu = _by_member(groups, "w", 1)
    assert glu.prunable and glu.size == 6 and ("w", 1, 2) in _members(glu)
    np.testing.assert_array_equal(next(m for m in glu.members if m.path == "w").positions[1], [1, 7])


def _const_concat(p, x):
    h = jnp.concatenate([x @ p["w1"], jnp.ones((x.shape[0], 2))], 1)  # appended constant features
    return jax.nn.relu(h) @ p["w3"]


def test_concatenated_constant_block_is_not_prunable():
    """A block broadcast from a constant has a size fixed in the model: the consumer rows it
    meets were a prunable group of their own, and shrinking them broke the model."""
    p = {"w1": _rand(0, 5, 3), "w3": _rand(1, 5, 4)}
    groups = channel_groups(_const_concat, p, jnp.ones((4, 5)))
    assert _by_member(groups, "w1", 1).prunable
    const = [g for g in groups if not any(m.path == "w1" for m in g.members) and g.size == 2]
    assert len(const) == 1 and "filled from a constant" in const[0].reason
    rows = next(m for m in const[0].members if m.path == "w3").positions[:, 0]
    np.testing.assert_array_equal(rows, [3, 4])


def test_weight_concatenated_from_leaves_is_a_weight():
    """``h @ concatenate([a, b], 1)`` (fused gates, OptimizedLSTMCell) couples like ``h @ a``,
    ``h @ b``; a concatenation with an activation part is still refused."""
    fused = lambda p, x: jax.nn.relu(x @ p["w0"]) @ jnp.concatenate([p["a"], p["b"]], 1)
    separate = lambda p, x: jnp.concatenate([jax.nn.relu(x @ p["w0"]) @ p[k] for k in "ab"], 1)
    p, x = {"w0": _rand(0, 3, 8), "a": _rand(1, 8, 4), "b": _rand(2, 8, 5)}, jnp.ones((2, 3))
    got = [(g.size, g.prunable, _members(g)) for g in channel_groups(fused, p, x)]
    assert got == [(g.size, g.prunable, _members(g)) for g in channel_groups(separate, p, x)]
    hidden = _by_member(channel_groups(fused, p, x), "w0", 1)
    assert hidden.prunable and _members(hidden) == {("w0", 1, 1), ("a", 0, 1), ("b", 0, 1)}

    def mixed(p, x):  # one part of the contracted operand is an activation
        h = jax.nn.relu(x @ p["w0"])
        return h @ jnp.concatenate([p["a"], h.T @ x], 1)

    g = _by_member(channel_groups(mixed, {"w0": p["w0"], "a": p["a"]}, x), "w0", 1)
    assert not g.prunable and "between two activations" in g.reason


def test_uneven_split_not_prunable():
    def f(p, x):
        u, v = jnp.split(x @ p["w"], 2, axis=-1)
        return u @ p["a"] + v @ p["b"]

    p = {"w": _rand(0, 3, 8), "a": _rand(1, 4, 2), "b": _rand(2, 4, 2)}
    g = _by_member(channel_groups(f, p, jnp.ones((2, 3))), "a", 0)
    assert not g.prunable and "split" in g.reason


def test_depthwise_conv_couples_in_and_out():
    class DW(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (1, 1))(x))
            x = nn.Conv(6, (3, 3), feature_group_count=6)(x)
            return nn.Conv(4, (1, 1))(x).mean((1, 2))

    model, x = DW(), jnp.ones((1, 5, 5, 2))
    groups = channel_groups(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
    g = _by_member(groups, "params/Conv_0/kernel", 3)
    assert g.prunable
    assert {
        ("params/Conv_1/kernel", 3, 1),
        ("params/Conv_1/bias", 0, 1),
        ("params/Conv_2/kernel", 2, 1),
    } <= _members(g)


def test_grouped_conv_whole_groups_not_prunable():
    def f(p, x):
        dn = ("NWC", "WIO", "NWC")
        y = jax.lax.conv_general_dilated(
            x @ p["w"], p["k"], (1,), "SAME", dimension_numbers=dn, feature_group_count=2
        )
        return y.sum(1)

    p = {"w": _rand(0, 3, 8), "k": _rand(1, 3, 4, 6)}
    groups = channel_groups(f, p, jnp.ones((1, 5, 3)))
    whole, per_group = sorted(
        [_by_member(groups, "w", 1, 0), _by_member(groups, "w", 1, 1)], key=lambda g: g.size
    )
    assert whole.size == 2 and not whole.prunable and "feature groups" in whole.reason
    assert per_group.size == 4 and per_group.prunable and ("k", 1, 1) in _members(per_group)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda g: g,
        jax.jit,
        jax.checkpoint,
        lambda g: lambda p, x: jax.lax.cond(x.sum() > 0, g, lambda p, x: -g(p, x), p, x),
    ],
    ids=["plain", "jit", "remat", "cond"],
)
def test_higher_order_primitives_give_the_same_groups(wrap):
    @jax.custom_vjp
    def act(h):
        return jnp.tanh(h)

    act.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (g * (1 - jnp.tanh(h) ** 2),))
    inner = lambda p, x: act(x @ p["w1"] + p["b1"]) @ p["w2"]
    groups = channel_groups(wrap(inner), MLP_PARAMS, jnp.ones((2, 6)))
    g = _by_member(groups, "w1", 1)
    assert g.prunable and _members(g) == {("w1", 1, 1), ("b1", 0, 1), ("w2", 0, 1)}


def test_scan_over_stacked_layers():
    def f(p, x):
        h = x @ p["w_in"]
        h, _ = jax.lax.scan(lambda c, w: (jax.nn.relu(c @ w), None), h, p["stack"])
        return h @ p["w_out"]

    p = {"w_in": _rand(0, 3, 8), "stack": _rand(1, 4, 8, 8), "w_out": _rand(2, 8, 2)}
    groups = channel_groups(f, p, jnp.ones((2, 3)))
    width = _by_member(groups, "w_in", 1)
    assert width.prunable
    assert _members(width) == {("w_in", 1, 1), ("stack", 1, 1), ("stack", 2, 1), ("w_out", 0, 1)}
    layers = _by_member(groups, "stack", 0)
    assert not layers.prunable and "scanned" in layers.reason


def test_while_loop_does_not_crash():
    def f(p, x):
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x @ p["w_in"]) @ p["w_out"]

    p = {"w_in": _rand(0, 3, 5), "w": _rand(1, 5, 5), "w_out": _rand(2, 5, 2)}
    g = _by_member(channel_groups(f, p, jnp.ones((2, 3))), "w_in", 1)
    assert g.prunable and ("w", 0, 1) in _members(g) and ("w", 1, 1) in _members(g)


@pytest.mark.parametrize(
    "op, reason",
    [
        (lambda h: jnp.roll(h, 1, axis=1), "sliced"),
        (lambda h: jnp.pad(h, ((0, 0), (0, 1)))[:, :-1], "padded"),
        (lambda h: jnp.sort(h, axis=-1), "does not model"),
        (lambda h: jnp.take(h, jnp.array([2, 0, 1, 3, 4, 5]), axis=1), "gathered along"),
        (lambda h: jnp.cumsum(h, axis=-1), "accumulated"),
        (lambda h: h + jnp.arange(6.0), "iota"),
        (lambda h: jax.nn.sigmoid(h) * jax.nn.sigmoid(h).sum(-1, keepdims=True), "reduced"),
    ],
)
def test_non_prunable_reasons(op, reason):
    f = lambda p, x: op(x @ p["w"]) @ p["v"]
    groups = channel_groups(f, {"w": _rand(0, 3, 6), "v": _rand(1, 6, 2)}, jnp.ones((2, 3)))
    g = _by_member(groups, "w", 1)
    assert not g.prunable and reason in g.reason, g.reason


def test_contraction_of_two_nonzero_channels_not_prunable():
    def f(p, x):
        a, b = jax.nn.sigmoid(x @ p["w1"]), jax.nn.sigmoid(x @ p["w2"])
        return jnp.einsum("bc,bc->b", a, b)[:, None] * p["s"]

    p = {"w1": _rand(0, 3, 4), "w2": _rand(1, 3, 4), "s": _rand(2, 2)}
    g = _by_member(channel_groups(f, p, jnp.ones((2, 3))), "w1", 1)
    assert not g.prunable and "neither operand is zero" in g.reason
    # relu zeroes masked channels, so masked == shrunk arithmetically; but a contraction of
    # two activations is refused anyway (models scale such products by the axis size)
    acts = lambda p, x: jnp.einsum("bc,bc->b", jax.nn.relu(x @ p["w1"]), jax.nn.sigmoid(x @ p["w2"]))
    g = _by_member(channel_groups(acts, p, jnp.ones((2, 3))), "w1", 1)
    assert not g.prunable and "between two activations" in g.reason
    assert "neither operand is zero" not in g.reason
    # against a weight (cast or scaled: still a weight) it stays prunable
    for weight in (lambda u: u, lambda u: u.astype(jnp.bfloat16).astype(jnp.float32), lambda u: u * 2.0):
        ok = lambda p, x, weight=weight: jnp.einsum("bc,cd->bd", jax.nn.relu(x @ p["w1"]), weight(p["u"]))
        p_ok = {"w1": p["w1"], "u": _rand(3, 4, 2)}
        assert _by_member(channel_groups(ok, p_ok, jnp.ones((2, 3))), "w1", 1).prunable


def test_nnx_paths():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.fc2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.bn(self.fc1(x))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    g = _by_member(channel_groups(nnx_apply(graphdef), state, jnp.ones((2, 4))), "fc1/kernel", 1)
    assert g.prunable and g.name == "fc1/kernel:1"
    bn = {"bn/scale", "bn/bias", "bn/mean", "bn/var"}
    assert {m.path for m in g.members} == {"fc1/kernel", "fc1/bias", "fc2/kernel"} | bn


def _min_pool(h, window, strides):
    return jax.lax.reduce_window(h, jnp.inf, jax.lax.min, (1, *window, 1), (1, *strides, 1), "SAME")


@pytest.mark.parametrize("pool", [nn.max_pool, nn.avg_pool, _min_pool])
def test_pooling_passes_channels_and_fixes_windowed_axes(pool):
    def f(p, x):
        h = jax.lax.conv_general_dilated(
            x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return pool(jax.nn.relu(h), (2, 2), (2, 2)).mean((1, 2)) @ p["w"]

    p = {"k": _rand(0, 3, 3, 2, 6), "w": _rand(1, 6, 3)}
    assert _by_member(channel_groups(f, p, jnp.ones((2, 8, 8, 2))), "k", 3).prunable
    # a window along the channels (maxout-like) fixes them
    maxout = lambda p, x: (
        jax.lax.reduce_window(x @ p["w"], -jnp.inf, jax.lax.max, (1, 2), (1, 1), "SAME") @ p["v"]
    )
    g = _by_member(
        channel_groups(maxout, {"w": _rand(0, 3, 6), "v": _rand(1, 6, 2)}, jnp.ones((2, 3))), "w", 1
    )
    assert not g.prunable and "pooled by reduce_window_max" in g.reason


@pytest.mark.parametrize(
    "act", [jax.nn.elu, lambda h: jnp.where(h > 0, h, 0.0), lambda h: h * jnp.ones_like(h)]
)
def test_broadcast_scalars_follow_their_partner(act):
    p = {"w1": _rand(0, 4, 6), "w2": _rand(1, 6, 3)}
    assert _by_member(
        channel_groups(lambda p, x: act(x @ p["w1"]) @ p["w2"], p, jnp.ones((2, 4))), "w1", 1
    ).prunable
