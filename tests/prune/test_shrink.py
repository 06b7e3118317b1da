"""Physical shrinking: the shrunk model equals the masked model; plans serialise, replay on
fresh inits and slice optimizer state; Linen and NNX rebuilds; validation errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax.graph import nnx_apply
from qjax.graph.coupling import channel_groups
from qjax.prune._paths import _trainable
from qjax.prune.masks import apply_masks, pack_masks
from qjax.prune.rebuild import feature_counts, linen_apply, shrink_nnx
from qjax.prune.shrink import ShrinkPlan, make_plan, shrink


def _rand(key, *shape):
    return jnp.asarray(np.random.default_rng(key).standard_normal(shape), jnp.float32)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def _col_mask(shape, dead, axis=-1):
    """A bool mask of ``shape`` that zeroes the slices ``dead`` along ``axis``."""
    m = np.ones(shape, bool)
    idx = [slice(None)] * len(shape)
    idx[axis] = list(dead)
    m[tuple(idx)] = False
    return jnp.asarray(m)


def _masked_equals_shrunk(f, params, masks, *args, f_small=None, multiple=1, vote="all"):
    small, plan = shrink(f, params, masks, *args, multiple=multiple, vote=vote)
    masked = jax.jit(lambda p, m, *a: f(apply_masks(p, m), *a))(params, plan.group_masks(params), *args)
    _close(jax.jit(f_small or f)(small, *args), masked)
    return small, plan


def _nnx_shrinks_like_masked(model, set_masks, x):
    """Shrink an NNX ``model`` in place by the masks ``set_masks`` writes into a tree of
    ``None`` over its state; the shrunk model must equal the masked one. Returns the plan."""
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    set_masks(masks)
    f = nnx_apply(graphdef)
    _, plan = shrink(f, state, masks, x)
    want = f(apply_masks(state, plan.group_masks(state)), x)
    shrink_nnx(model, plan)
    _close(model(x), want)
    return plan


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


MLP = {"w1": _rand(0, 6, 16), "b1": _rand(1, 16), "w2": _rand(2, 16, 12), "b2": _rand(3, 12),
       "w3": _rand(4, 12, 3), "b3": _rand(5, 3)}  # fmt: skip
X = _rand(9, 4, 6)


def _mlp_masks(dead1, dead2):
    return {"w1": _col_mask((6, 16), dead1), "b1": None, "w2": _col_mask((16, 12), dead2), "b2": None,
            "w3": None, "b3": None}  # fmt: skip


@settings(max_examples=examples(8))
@given(
    dead1=st.sets(st.integers(0, 15), max_size=16),
    dead2=st.sets(st.integers(0, 11), max_size=11),  # 12: w2 all zero, its rows vote group 1 away
    multiple=st.sampled_from([1, 4]),
)
def test_mlp_random_keep_sets(dead1, dead2, multiple):
    small, plan = _masked_equals_shrunk(mlp, MLP, _mlp_masks(dead1, dead2), X, multiple=multiple, vote="any")
    for dead, size, key in ((dead1, 16, "b1"), (dead2, 12, "b2")):
        n = small[key].shape[0]
        expect = min(-(-max(size - len(dead), 1) // multiple) * multiple, size)
        assert n == expect and 1 <= n <= size
        if multiple == 1:  # exactly the live channels survive
            kept = next(
                (g.kept for g in plan.groups if any(m[0] == key for m in g.members)), tuple(range(size))
            )
            live = set(range(size)) - dead
            assert set(kept) == live if live else len(kept) == 1


def test_packed_masks_give_the_same_plan():
    masks = _mlp_masks({1, 5, 9}, {0, 11})
    _, plan = shrink(mlp, MLP, masks, X)
    _, plan_packed = shrink(mlp, MLP, pack_masks(masks), X)
    assert plan_packed.groups == plan.groups


def test_vote_all_needs_every_masked_member():
    masks = {**_mlp_masks({0, 1}, ()), "w2": _col_mask((16, 12), [1], axis=0)}  # w2's in-rows vote too
    assert [g.kept for g in shrink(mlp, MLP, masks, X)[1].groups] == [(0, *range(2, 16))]
    assert [g.kept for g in shrink(mlp, MLP, masks, X, vote="any")[1].groups] == [tuple(range(2, 16))]
    assert shrink(mlp, MLP, _mlp_masks({0, 1}, ()), X)[1].groups == ()  # w2's mask keeps every row
    with pytest.raises(ValueError, match="vote"):
        shrink(mlp, MLP, masks, X, vote="most")


def test_multiple_adds_back_largest_norm_channels():
    p = dict(MLP, w1=MLP["w1"].at[:, 3].mul(100.0))  # channel 3: the largest norm among the dead
    small, plan = shrink(mlp, p, _mlp_masks({1, 2, 3, 4, 5}, set()), X, multiple=4, vote="any")
    (g,) = plan.groups
    assert g.kept == (0, 3, *range(6, 16)) and small["w1"].shape == (6, 12)


def test_all_channels_masked_keeps_one_and_unmasked_group_untouched():
    small, plan = shrink(mlp, MLP, _mlp_masks(range(16), set()), X, vote="any")
    assert small["w1"].shape == (6, 1) and small["w2"].shape == (1, 12)
    assert [g.name for g in plan.groups] == ["w1:1"]
    with pytest.raises(ValueError, match="multiple"):
        shrink(mlp, MLP, _mlp_masks((), ()), X, multiple=0)


def test_logits_mask_is_reported_as_skipped():
    masks = {**_mlp_masks((), ()), "w3": _col_mask((12, 3), [0])}
    small, plan = shrink(mlp, MLP, masks, X)
    assert small["w3"].shape == (12, 3) and not plan.groups
    ((name, reason),) = plan.skipped
    assert name == "w3:1" and "output axis" in reason


def test_plan_json_round_trip_replay_and_optimizer_state():
    small, plan = shrink(mlp, MLP, _mlp_masks({0, 5, 7}, {1}), X, vote="any")
    again = ShrinkPlan.from_json(plan.to_json())
    assert again == plan and again.summary()["elements_after"] < again.summary()["elements_before"]
    fresh = {k: _rand(20 + i, *v.shape) for i, (k, v) in enumerate(MLP.items())}
    replayed = again.apply(fresh)
    assert jax.tree.map(jnp.shape, replayed) == jax.tree.map(jnp.shape, small)
    np.testing.assert_array_equal(
        replayed["w2"], np.asarray(fresh["w2"])[np.ix_(again.leaves["w2"][0], again.leaves["w2"][1])]
    )
    # optimizer state: adam moments shrink consistently; a step runs on the small params
    tx = optax.adam(1e-2)
    grads = jax.jit(jax.grad(lambda p: mlp(p, X).sum()))(MLP)
    _, state = jax.jit(tx.update)(grads, tx.init(MLP), MLP)
    small_state = plan.apply(state)
    np.testing.assert_array_equal(small_state[0].mu["w1"], plan.apply(state[0].mu)["w1"])
    assert small_state[0].count == state[0].count
    assert jax.tree.map(jnp.shape, small_state[0].nu) == jax.tree.map(jnp.shape, small)
    updates, _ = jax.jit(tx.update)(plan.apply(grads), small_state, small)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, small)
    # masks with None leaves
    small_masks = plan.apply(_mlp_masks({0, 5, 7}, {1}))
    assert small_masks["b1"] is None and small_masks["w1"].shape == small["w1"].shape


class Nested(nn.Module):
    """``Conv_0`` at the top and inside ``Block_0``: ``Conv_0/kernel`` is a suffix of both."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        return nn.Dense(2)(_NestedBlock()(x).mean((1, 2)))


class _NestedBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Conv(8, (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x)))


def test_replay_over_params_prefers_the_collection_prefix():
    model, x = Nested(), _rand(1, 1, 6, 6, 3)
    v = model.init(jax.random.key(0), x)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Conv_0"]["kernel"] = _col_mask((3, 3, 3, 8), [1, 4, 6])
    masks["params"]["_NestedBlock_0"]["Conv_0"]["kernel"] = _col_mask((3, 3, 8, 8), [0, 2])
    small, plan = _masked_equals_shrunk(model.apply, v, masks, x, f_small=linen_apply(model), vote="any")
    replayed = plan.apply(v["params"], strict=False)
    assert jax.tree.map(jnp.shape, replayed) == jax.tree.map(jnp.shape, small["params"])
    _close(linen_apply(model)({"params": replayed}, x), linen_apply(model)(small, x))
    mu = plan.apply(optax.adam(1e-3).init(v["params"]), strict=False)[0].mu
    assert jax.tree.map(jnp.shape, mu) == jax.tree.map(jnp.shape, small["params"])
    twins = ShrinkPlan((), {"a/m/w": {0: (0,)}, "b/m/w": {0: (0,)}}, {"a/m/w": (2,), "b/m/w": (2,)})
    with pytest.raises(ValueError, match=r"'m/w'.*\['a/m/w', 'b/m/w'\]"):
        twins.apply({"m": {"w": np.ones(2)}}, strict=False)


def test_validation_errors_name_the_leaf():
    _, plan = shrink(mlp, MLP, _mlp_masks({0}, ()), X, vote="any")
    with pytest.raises(KeyError, match="w2"):
        plan.apply({k: v for k, v in MLP.items() if k != "w2"})
    with pytest.raises(ValueError, match=r"'w1'.*shape"):
        plan.apply(dict(MLP, w1=jnp.ones((6, 15))))
    with pytest.raises(ValueError, match="mask of 'w1'"):
        make_plan(channel_groups(mlp, MLP, X), MLP, dict(_mlp_masks((), ()), w1=jnp.ones((6, 3), bool)))
    with pytest.raises(ValueError, match="'nope'"):
        make_plan(channel_groups(mlp, MLP, X), MLP, dict(_mlp_masks((), ()), nope=None))
    with pytest.raises(ValueError, match="version"):
        ShrinkPlan.from_dict({"version": 99})


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(12)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _init(model, x):
    v = jax.jit(model.init)(jax.random.key(0), x)
    if "batch_stats" not in v:
        return v
    rng = np.random.default_rng(3)
    bs = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32), v["batch_stats"])
    return {**v, "batch_stats": bs}


def test_cnn_batchnorm_linen():
    model, x = CNN(), _rand(7, 3, 8, 8, 1)
    v = _init(model, x)
    f = functools.partial(model.apply, train=False)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Conv_0"]["kernel"] = _col_mask((3, 3, 1, 8), [1, 4, 6])
    masks["params"]["Conv_1"]["kernel"] = _col_mask((3, 3, 8, 6), [0, 5])
    masks["params"]["Dense_0"]["kernel"] = _col_mask((96, 12), [3])
    f_small = functools.partial(linen_apply(model), train=False)
    small, plan = _masked_equals_shrunk(f, v, masks, x, f_small=f_small, vote="any")
    assert small["batch_stats"]["BatchNorm_0"]["var"].shape == (5,)
    assert small["params"]["Conv_1"]["kernel"].shape == (3, 3, 5, 4)
    assert small["params"]["Dense_0"]["kernel"].shape == (64, 11)  # flatten rows: 4x4 positions x 4 channels
    assert feature_counts(plan) == {"Conv_0": 5, "BatchNorm_0": 5, "Conv_1": 4, "Dense_0": 11}
    with pytest.raises(Exception, match="kernel"):  # Linen checks param shapes against `features`
        model.apply(small, x)
    # optimizer state over variables["params"] only: paths lack "params/", batch_stats are absent
    tx = optax.adam(1e-3)
    small_state = plan.apply(tx.init(v["params"]), strict=False)
    assert jax.tree.map(jnp.shape, small_state[0].mu) == jax.tree.map(jnp.shape, small["params"])
    with pytest.raises(KeyError, match=r"batch_stats/BatchNorm_0/mean.*strict=False"):
        plan.apply(tx.init(v["params"]))
    rebuilt = CNN2(**{k: feature_counts(plan)[k] for k in ("Conv_0", "Conv_1", "Dense_0")})
    _close(rebuilt.apply(small, x), linen_apply(model)(small, x))


def test_masks_over_the_params_collection():
    """Masks over ``variables["params"]`` (e.g. from an optimizer state) plan like wrapped ones."""
    model, x = CNN(), _rand(7, 3, 8, 8, 1)
    v = _init(model, x)
    f = functools.partial(model.apply, train=False)
    masks = jax.tree.map(lambda a: None, v["params"])
    masks["Conv_0"]["kernel"] = _col_mask((3, 3, 1, 8), [1, 4, 6])
    masks["BatchNorm_0"]["bias"] = _col_mask((8,), [1, 4])
    small, plan = _masked_equals_shrunk(
        f, v, masks, x, f_small=functools.partial(linen_apply(model), train=False), vote="any"
    )
    assert plan == shrink(f, v, {"params": masks}, x, vote="any")[1]
    assert small["batch_stats"]["BatchNorm_0"]["var"].shape == (5,)
    with pytest.raises(ValueError, match=r"mask path 'nope/kernel'.*\{'params': masks\}"):
        shrink(f, v, {**masks, "nope": {"kernel": None}}, x)


def test_multiple_ranks_added_back_channels_by_trainable_weights_only():
    """BatchNorm running statistics do not decide which pruned channels come back."""
    model, x = CNN(), _rand(7, 3, 8, 8, 1)
    v = _init(model, x)
    v["params"]["Conv_0"]["kernel"] = v["params"]["Conv_0"]["kernel"].at[..., 4].mul(10.0)
    v["batch_stats"]["BatchNorm_0"]["var"] = v["batch_stats"]["BatchNorm_0"]["var"].at[1].set(1e6)
    masks = {"params": jax.tree.map(lambda a: None, v["params"])}
    masks["params"]["Conv_0"]["kernel"] = _col_mask((3, 3, 1, 8), [1, 4, 6])
    groups = channel_groups(functools.partial(model.apply, train=False), v, x)
    (g,) = make_plan(groups, v, masks, multiple=2, vote="any").groups
    # reference: squared L2 over the params-collection members (kernels in and out, BN scale/bias)
    flat = {"/".join(str(k.key) for k in kp): np.asarray(a, np.float64)
            for kp, a in jax.tree_util.tree_flatten_with_path(v["params"])[0]}  # fmt: skip
    members = [m for m in next(h for h in groups if h.name == g.name).members if m.path.startswith("params/")]
    norms = {c: sum(float((np.take(flat[m.path[len("params/"):]], [c], m.axis) ** 2).sum()) for m in members)
             for c in (1, 4, 6)}  # fmt: skip
    assert g.kept == (0, 2, 3, max(norms, key=norms.get), 5, 7) == (0, 2, 3, 4, 5, 7)
    bn_state = nnx.split(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))[1]  # NNX: Params, not BatchStats
    assert _trainable(bn_state) == {"bias", "scale"} and _trainable({"w": 1, "mean": 2}) == {"w", "mean"}


class CNN2(nn.Module):
    """CNN built from a config (the `feature_counts` route)."""

    Conv_0: int = 8
    Conv_1: int = 6
    Dense_0: int = 12

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.Conv_0, (3, 3))(x)))
        x = nn.relu(nn.Conv(self.Conv_1, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(self.Dense_0)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def residual(p, x):
    h = jax.nn.relu(x @ p["w0"])
    h = h + jax.nn.relu(h @ p["a1"]) @ p["a2"]
    h = h + jax.nn.relu(h @ p["b1"]) @ p["b2"] + p["bias"]
    return h @ p["out"]


def test_residual_block():
    p = {"w0": _rand(0, 5, 8), "a1": _rand(1, 8, 4), "a2": _rand(2, 4, 8), "b1": _rand(3, 8, 6),
         "b2": _rand(4, 6, 8), "bias": _rand(5, 8), "out": _rand(6, 8, 2)}  # fmt: skip
    masks = {k: None for k in p}
    masks["w0"] = _col_mask((5, 8), [1, 2, 6])
    masks["a2"] = _col_mask((4, 8), [1, 2, 6])  # every voter zeroes 1, 2, 6 ...
    masks["b2"] = _col_mask((6, 8), [1, 6, 7])  # ... but b2 keeps 2 and 7 alive
    small, _ = _masked_equals_shrunk(residual, p, masks, _rand(8, 3, 5))
    assert small["w0"].shape == (5, 6) and small["b2"].shape == (6, 6) and small["bias"].shape == (6,)
    assert small["a1"].shape == (6, 4) and small["a2"].shape == (4, 6)


def attention(p, x, *, head_dim=4, causal=False):
    b, s, _ = x.shape
    q = (x @ p["wq"] + p["bq"]).reshape(b, s, -1, head_dim)
    k = (x @ p["wk"]).reshape(b, s, -1, head_dim)
    v = (x @ p["wv"]).reshape(b, s, -1, head_dim)
    logits = jnp.einsum("bshd,bthd->bhst", q, k) / head_dim**0.5
    if causal:  # a (b, 1, s, s) mask broadcast over heads, a scalar fill
        logits = jnp.where(jnp.tril(jnp.ones((b, 1, s, s), bool)), logits, -1e9)
    a = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhst,bthd->bshd", a, v).reshape(b, s, -1)
    return o @ p["wo"] + p["bo"]


@settings(max_examples=examples(6))
@given(dead=st.sets(st.integers(0, 3), max_size=4))
def test_attention_head_pruning(dead):
    p = {"wq": _rand(0, 8, 16), "bq": _rand(1, 16), "wk": _rand(2, 8, 16), "wv": _rand(3, 8, 16),
         "wo": _rand(4, 16, 8), "bo": _rand(5, 8)}  # fmt: skip
    cols = [h * 4 + d for h in dead for d in range(4)]
    masks = {k: None for k in p}
    masks["wq"], masks["wo"] = _col_mask((8, 16), cols), _col_mask((16, 8), cols, axis=0)
    masks["wv"] = _col_mask((8, 16), cols[:-1])  # a head keeps one live column in wv: stays
    small, _ = _masked_equals_shrunk(attention, p, masks, _rand(6, 2, 5, 8))
    heads = 4 - max(len(dead) - 1, 0) if dead else 4
    assert small["wq"].shape == (8, heads * 4) and small["wo"].shape == (heads * 4, 8)


def test_flax_attention_query_key_head_dim_is_not_pruned():
    """Flax's MultiHeadDotProductAttention divides q by sqrt(head_dim) computed from the
    shape: shrinking q/k's head_dim would change the scale (masked != shrunk by 0.14), so
    that group is refused; value/out's head_dim (contracted with a weight) shrinks exactly."""

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)

    model, x = Attention(), jax.random.normal(jax.random.key(1), (2, 5, 6))
    v = model.init(jax.random.key(0), x)
    groups = channel_groups(model.apply, v, x)
    qk = [g for g in groups if any("/query/kernel" in m.path and m.axis == 2 for m in g.members)]
    vo = [g for g in groups if any("/value/kernel" in m.path and m.axis == 2 for m in g.members)]
    assert qk and not qk[0].prunable and "between two activations" in qk[0].reason
    assert vo and vo[0].prunable
    masks = jax.tree_util.tree_map_with_path(
        lambda kp, a: (
            (jnp.ones(a.shape, bool).at[..., 3].set(False) if a.ndim == 3 else None)
            if "value/kernel" in jax.tree_util.keystr(kp, simple=True, separator="/")
            else None
        ),
        v,
    )
    small, plan = shrink(model.apply, v, masks, x)
    assert small["params"]["MultiHeadDotProductAttention_0"]["value"]["kernel"].shape == (6, 2, 3)
    want = model.apply(apply_masks(v, plan.group_masks(v)), x)
    np.testing.assert_allclose(linen_apply(model)(small, x), want, rtol=1e-5, atol=1e-6)


def test_concat_and_glu_split():
    def f(p, x):
        c = jnp.concatenate([jax.nn.relu(x @ p["a"]), jax.nn.relu(x @ p["b"])], axis=-1)
        u, v = jnp.split(c @ p["w"], 2, axis=-1)
        return (u * jax.nn.sigmoid(v)) @ p["o"]

    p = {"a": _rand(0, 3, 4), "b": _rand(1, 3, 5), "w": _rand(2, 9, 12), "o": _rand(3, 6, 2)}
    w_mask = np.asarray(_col_mask((9, 12), [2, 8, 4])) & np.asarray(_col_mask((9, 12), [1, 4, 8], axis=0))
    masks = {"a": _col_mask((3, 4), [1]), "b": _col_mask((3, 5), [0, 4]), "w": jnp.asarray(w_mask), "o": None}
    small, _ = _masked_equals_shrunk(f, p, masks, _rand(4, 2, 3))
    # rows: a's 1, b's 0 and 4 (w rows 4, 8) go; columns: the GLU pair 2/8 goes, 4 alone stays
    assert small["w"].shape == (6, 10) and small["o"].shape == (5, 2) and small["b"].shape == (3, 3)


def test_concatenated_constant_block_is_skipped_and_the_rest_shrinks():
    # the constant block's consumer rows were a prunable group; shrinking them broke the model
    from qjax.prune import Magnitude, group_scores, masks_from_group_scores

    def f(p, x):
        h = jnp.concatenate([x @ p["w1"], jnp.ones((x.shape[0], 2))], 1)
        return jax.nn.relu(h) @ p["w3"]

    p, x = {"w1": _rand(0, 5, 4), "w3": _rand(1, 6, 2)}, _rand(2, 3, 5)
    groups = channel_groups(f, p, x)
    masks = masks_from_group_scores(group_scores(groups, Magnitude().scores(p)), 0.5, groups, p)
    assert np.asarray(masks["w3"])[4:].all()  # the constant's rows are kept
    small, _ = _masked_equals_shrunk(f, p, masks, x)
    assert small["w1"].shape == (5, 2) and small["w3"].shape == (4, 2)


def test_depthwise_conv_linen():
    class DW(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (1, 1))(x))
            x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=6)(x))
            return nn.Conv(4, (1, 1))(x).mean((1, 2))

    model, x = DW(), _rand(1, 2, 5, 5, 2)
    v = _init(model, x)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Conv_1"]["kernel"] = _col_mask((3, 3, 1, 6), [0, 3])
    small, _ = _masked_equals_shrunk(model.apply, v, masks, x, f_small=linen_apply(model))
    assert small["params"]["Conv_0"]["kernel"].shape == (1, 1, 2, 4)
    assert small["params"]["Conv_2"]["kernel"].shape == (1, 1, 4, 4)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.dw(nnx.relu(self.bn(self.conv(x)))))
        x = self.ln(x.mean((1, 2)))
        return self.out(nnx.relu(self.fc(x)))


def test_nnx_shrink_in_place():
    model, x = NNXNet(nnx.Rngs(0)), _rand(2, 2, 6, 6, 1)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 8)
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["conv"]["kernel"] = nnx.Param(_col_mask((3, 3, 1, 8), [2, 5]))
    masks["fc"]["kernel"] = nnx.Param(_col_mask((8, 6), [0, 1, 2]))
    f = nnx_apply(graphdef)
    small, plan = shrink(f, state, masks, x, vote="any")
    expect = f(apply_masks(state, plan.group_masks(state)), x)
    groups = {g.name: g for g in channel_groups(f, state, x)}
    assert not groups["conv/kernel:3"].prunable and "reduced" in groups["conv/kernel:3"].reason  # LayerNorm
    assert [s[0] for s in plan.skipped] == ["conv/kernel:3"]
    shrink_nnx(model, plan)
    _close(model(x), expect)
    assert (model.fc.in_features, model.fc.out_features, model.out.in_features) == (8, 3, 3)
    assert model.conv.out_features == 8 and model.bn.num_features == 8 and model.dw.feature_group_count == 8
    _close(nnx.merge(graphdef, small)(x), expect)


def test_nnx_channel_pruning_through_batchnorm_and_depthwise():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
            self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
            self.fc = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.dw(nnx.relu(self.bn(self.conv(x)))))
            return self.fc(x.mean((1, 2)))

    model, x = Net(nnx.Rngs(1)), _rand(3, 2, 6, 6, 1)

    def set_masks(masks):
        masks["conv"]["kernel"] = nnx.Param(_col_mask((3, 3, 1, 8), [2, 5, 7]))

    _nnx_shrinks_like_masked(model, set_masks, x)
    assert model.conv.out_features == model.bn.num_features == model.dw.feature_group_count == 5
    assert model.dw.in_features == model.dw.out_features == model.fc.in_features == 5


def test_weight_concatenated_from_leaves_shrinks_like_the_masked_model():
    fused = lambda p, x: jax.nn.relu(x @ p["w0"]) @ jnp.concatenate([p["a"], p["b"]], 1)
    p = {"w0": _rand(0, 3, 8), "a": _rand(1, 8, 4), "b": _rand(2, 8, 5)}
    masks = {"w0": _col_mask((3, 8), [1, 6]), "a": None, "b": None}
    small, _ = _masked_equals_shrunk(fused, p, masks, _rand(3, 2, 3))
    assert small["a"].shape == (6, 4) and small["b"].shape == (6, 5)


class _RNN(nn.Module):
    cell: type
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.RNN(self.cell(self.hidden))(x)[:, -1])


def test_optimized_lstm_cell_hidden_units_shrink():
    """OptimizedLSTMCell fuses its gate kernels with a concatenate; its hidden units prune."""
    model, x = _RNN(nn.OptimizedLSTMCell), _rand(0, 2, 5, 3)
    v = jax.jit(model.init)(jax.random.key(0), x)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Dense_0"]["kernel"] = _col_mask((16, 4), [1, 5, 9], axis=0)
    # rebuilt from a config: linen_apply does not resize an RNN cell's carry (Known limits)
    small_model = _RNN(nn.OptimizedLSTMCell, 13)
    small, plan = _masked_equals_shrunk(model.apply, v, masks, x, f_small=small_model.apply)
    assert [len(g.kept) for g in plan.groups] == [13]
    assert small["params"]["OptimizedLSTMCell_0"]["hi"]["kernel"].shape == (13, 13)


def test_scan_over_stacked_layers_shrinks_uniformly():
    def f(p, x):
        h = jax.nn.relu(x @ p["w_in"] + p["b_in"])
        h, _ = jax.lax.scan(
            lambda c, lw: (jax.nn.relu(c @ lw[0] + lw[1]), None), h, (p["stack"], p["stack_b"])
        )
        return h @ p["w_out"]

    p = {"w_in": _rand(0, 3, 8), "b_in": _rand(1, 8), "stack": _rand(2, 4, 8, 8), "stack_b": _rand(3, 4, 8),
         "w_out": _rand(4, 8, 2)}  # fmt: skip
    masks = {k: None for k in p}
    masks["w_in"] = _col_mask((3, 8), [1, 3, 4])
    small, _ = _masked_equals_shrunk(f, p, masks, _rand(5, 2, 3))
    assert (
        small["stack"].shape == (4, 5, 5)
        and small["stack_b"].shape == (4, 5)
        and small["w_out"].shape == (5, 2)
    )
