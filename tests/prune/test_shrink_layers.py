"""Physical shrinking of architectures whose layers carry size hyperparameters beyond the
kernels: GroupNorm, depthwise convs with a channel multiplier, transposed convs, pooling,
scalar and mask broadcasts, NNX attention; the shrunk model equals the masked model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from qjax.graph import nnx_apply
from qjax.prune.masks import apply_masks
from qjax.prune.rebuild import linen_apply, shrink_nnx
from qjax.prune.shrink import shrink

from .test_shrink import _close, _col_mask, _masked_equals_shrunk, _nnx_shrinks_like_masked, _rand, attention


class GN(nn.Module):
    groups: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.GroupNorm(num_groups=self.groups)(nn.Conv(16, (3, 3))(x)))
        return nn.Conv(3, (1, 1))(h)


def _gn_mask(dead_groups, size=4):
    """Zero whole GroupNorm groups (of ``size`` channels) of a (3, 3, 3, 16) conv kernel."""
    return _col_mask((3, 3, 3, 16), [g * size + i for g in dead_groups for i in range(size)])


def _gn_masks(v, dead_groups):
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Conv_0"]["kernel"] = _gn_mask(dead_groups)
    return masks


def test_group_norm_keeps_its_group_size_linen():
    model, x = GN(), _rand(1, 2, 6, 6, 3)
    v = model.init(jax.random.key(0), x)
    v["params"]["GroupNorm_0"]["scale"] = _rand(2, 16)
    small, plan = shrink(model.apply, v, _gn_masks(v, [1, 3]), x, vote="any")
    want = model.apply(apply_masks(v, plan.group_masks(v)), x)
    _close(jax.jit(linen_apply(model, plan=plan))(small, x), want)
    assert small["params"]["GroupNorm_0"]["scale"].shape == (8,)
    with pytest.raises(ValueError, match=r"GroupNorm_0.*num_groups=4.*plan=plan"):
        linen_apply(model)(small, x)
    small3, plan3 = shrink(model.apply, v, _gn_masks(v, [1]), x, vote="any")
    with pytest.raises(ValueError, match=r"GroupNorm_0.*12 channels.*whole groups of 8"):
        linen_apply(GN(groups=2), plan=plan3)(small3, x)


def test_group_norm_keeps_its_group_size_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c0 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.gn = nnx.GroupNorm(16, num_groups=4, rngs=rngs)
            self.c1 = nnx.Conv(16, 3, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.c1(nnx.relu(self.gn(self.c0(x))))

    model, x = Net(nnx.Rngs(0)), _rand(1, 2, 6, 6, 3)
    model.gn.scale[...] = _rand(2, 16)
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["c0"]["kernel"] = nnx.Param(_gn_mask([0, 2]))
    f = nnx_apply(graphdef)
    _, plan = shrink(f, state, masks, x, vote="any")
    want = f(apply_masks(state, plan.group_masks(state)), x)
    shrink_nnx(model, plan)
    _close(model(x), want)
    assert (model.gn.num_features, model.gn.num_groups, model.gn.group_size) == (8, 2, 4)


@pytest.mark.parametrize("dead", [range(1, 16, 2), [2, 3, 8, 9]], ids=["multiplier", "groups"])
def test_nnx_depthwise_with_channel_multiplier(dead):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)  # multiplier 2
            self.pw = nnx.Conv(16, 4, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.pw(nnx.relu(self.dw(x)))

    model, x = Net(nnx.Rngs(0)), _rand(1, 2, 6, 6, 8)
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["dw"]["kernel"] = nnx.Param(_col_mask((3, 3, 1, 16), dead))
    f = nnx_apply(graphdef)
    _, plan = shrink(f, state, masks, x, vote="any")
    want = f(apply_masks(state, plan.group_masks(state)), x)
    shrink_nnx(model, plan)
    _close(model(x), want)
    assert model.dw.in_features == model.dw.feature_group_count


def test_conv_transpose_linen_and_nnx():
    class Dec(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (1, 1))(nn.relu(nn.ConvTranspose(8, (2, 2), strides=(2, 2))(x)))

    model, x = Dec(), _rand(1, 2, 4, 4, 3)
    v = model.init(jax.random.key(0), x)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["ConvTranspose_0"]["kernel"] = _col_mask((2, 2, 3, 8), [0, 3, 5])
    small, _ = _masked_equals_shrunk(model.apply, v, masks, x, f_small=linen_apply(model))
    assert small["params"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 3, 5)

    class NDec(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(3, 8, (2, 2), strides=(2, 2), rngs=rngs)
            self.out = nnx.Conv(8, 2, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.up(x)))

    nmodel = NDec(nnx.Rngs(0))

    def set_masks(masks):
        masks["up"]["kernel"] = nnx.Param(_col_mask((2, 2, 3, 8), [0, 3, 5]))

    _nnx_shrinks_like_masked(nmodel, set_masks, x)
    assert (nmodel.up.in_features, nmodel.up.out_features, nmodel.up.kernel_shape) == (3, 5, (2, 2, 3, 5))


@pytest.mark.parametrize("pool", [nn.max_pool, nn.avg_pool])
def test_pooling_between_convs_shrinks(pool):
    class VGG(nn.Module):
        @nn.compact
        def __call__(self, x):
            for c in (8, 16):
                x = pool(nn.relu(nn.Conv(c, (3, 3))(x)), (2, 2), (2, 2))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    model, x = VGG(), _rand(1, 2, 8, 8, 3)
    v = model.init(jax.random.key(0), x)
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Conv_0"]["kernel"] = _col_mask((3, 3, 3, 8), [1, 2, 6])
    masks["params"]["Conv_1"]["kernel"] = _col_mask((3, 3, 8, 16), range(0, 16, 3))
    small, _ = _masked_equals_shrunk(model.apply, v, masks, x, f_small=linen_apply(model), vote="any")
    assert small["params"]["Conv_1"]["kernel"].shape == (3, 3, 5, 10)


def test_scalar_fills_and_broadcast_masks_follow_their_partner():
    """``jnp.where(h > 0, h, 0.)``, ``elu`` and a causal mask broadcast over heads."""
    p = {"wq": _rand(0, 8, 16), "bq": _rand(1, 16), "wk": _rand(2, 8, 16), "wv": _rand(3, 8, 16),
         "wo": _rand(4, 16, 8), "bo": _rand(5, 8)}  # fmt: skip
    masks = {k: None for k in p}
    masks["wq"] = masks["wk"] = masks["wv"] = _col_mask((8, 16), range(4, 8))
    small, _ = _masked_equals_shrunk(functools.partial(attention, causal=True), p, masks, _rand(6, 2, 5, 8))
    assert small["wo"].shape == (12, 8)

    def f(p, x):
        h = jnp.where(x @ p["w1"] > 0, x @ p["w1"], 0.0)
        return jax.nn.elu(h @ p["w2"]) @ p["w3"]

    p = {"w1": _rand(0, 6, 8), "w2": _rand(1, 8, 8), "w3": _rand(2, 8, 3)}
    masks = {"w1": _col_mask((6, 8), [1, 5]), "w2": _col_mask((8, 8), [0, 2, 3]), "w3": None}
    small, _ = _masked_equals_shrunk(f, p, masks, _rand(3, 4, 6), vote="any")
    assert small["w2"].shape == (6, 5) and small["w3"].shape == (5, 3)


def test_nnx_attention_heads_shrink_and_value_head_dim_is_refused():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.att = nnx.MultiHeadAttention(4, 8, qkv_features=16, decode=False, rngs=rngs)
            self.fc = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x + self.att(x))

    x = _rand(1, 2, 5, 8)
    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    f = nnx_apply(graphdef)
    masks = jax.tree.map(lambda a: None, state)
    head = np.ones((8, 4, 4), bool)
    head[:, 1] = False
    for k in ("query", "key", "value"):
        masks["att"][k]["kernel"] = nnx.Param(jnp.asarray(head))
    _, plan = shrink(f, state, masks, x)
    want = f(apply_masks(state, plan.group_masks(state)), x)
    shrink_nnx(model, plan)
    _close(model(x), want)
    assert (model.att.num_heads, model.att.qkv_features, model.att.head_dim) == (3, 12, 4)

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    f = nnx_apply(graphdef)
    masks = jax.tree.map(lambda a: None, state)
    masks["att"]["out"]["kernel"] = nnx.Param(_col_mask((4, 4, 8), [1, 3], axis=1))
    _, plan = shrink(f, state, masks, x)
    assert any(g.name == "att/out/kernel:1" for g in plan.groups)
    with pytest.raises(ValueError, match=r"'att' would keep 2 of 4 value channels.*att/value/kernel"):
        shrink_nnx(model, plan)
    assert model.att.value.kernel.shape == (8, 4, 4)  # refused before anything changed
