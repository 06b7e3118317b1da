"""Pruners and the one-shot ``magnitude`` helper: properties, references, edge cases."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax.prune.masks import apply_masks, summary
from qjax.prune.pruners import Magnitude, Movement, Pruner, Saliency, magnitude
from qjax.prune.sparsity import NM, Block, Channel, LeafConfig, Unstructured
from qjax.rules import leaves_with_paths


def params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    return {
        "params": {
            "Dense_0": {"kernel": normal(8, 12), "bias": normal(12)},
            "Conv_0": {"kernel": normal(3, 3, 4, 8), "bias": normal(8)},
        }
    }


def flat(masks):
    return {p: np.asarray(m) for p, m in leaves_with_paths(masks)}


def np_global_keep(tree, s):
    """Reference: stable ascending argsort of |w| over all targeted elements, prune the first k."""
    leaves = [(p, np.abs(np.asarray(x, np.float64))) for p, x in leaves_with_paths(tree) if np.ndim(x) >= 2]
    allw = np.concatenate([x.ravel() for _, x in leaves])
    k = math.floor(s * allw.size + 0.5)
    keep = np.ones(allw.size, bool)
    keep[np.argsort(allw, kind="stable")[:k]] = False
    out, i = {}, 0
    for p, x in leaves:
        out[p] = keep[i : i + x.size].reshape(x.shape)
        i += x.size
    return out


def test_design_example_global():
    p = params()
    masks = magnitude(p, sparsity=0.9, scope="global")
    ref = np_global_keep(p, 0.9)
    got = flat(masks)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert masks["params"]["Dense_0"]["bias"] is None
    assert summary(masks).zeros == math.floor(0.9 * (96 + 288) + 0.5)


@given(st.floats(0, 1), st.floats(0, 1), st.sampled_from(["layer", "global"]))
@settings(max_examples=examples(15))
def test_monotone_in_sparsity(s1, s2, scope):
    lo, hi = sorted((s1, s2))
    p = params(1)
    m_lo, m_hi = flat(magnitude(p, lo, scope=scope)), flat(magnitude(p, hi, scope=scope))
    for k in m_lo:
        assert not (m_hi[k] & ~m_lo[k]).any()  # kept at higher sparsity => kept at lower


@given(
    st.sampled_from(
        [
            (Unstructured(), "layer"),
            (Unstructured(), "global"),
            (Block((2, 4)), "global"),
            (Channel(-1), "layer"),
            (NM(2, 4, axis=-1), "layer"),
        ]
    ),
    st.floats(0, 1),
)
@settings(max_examples=examples(20))
def test_idempotent(case, s):
    stype, scope = case
    p = params(2)
    m1 = magnitude(p, s, scope=scope, sparsity_type=stype)
    m2 = magnitude(apply_masks(p, m1), s, scope=scope, sparsity_type=stype)
    for k, v in flat(m1).items():
        np.testing.assert_array_equal(flat(m2)[k], v)


def test_jit_traced_sparsity_matches_eager_all_types():
    p = params(3)
    cases = [(NM(1, 4, axis=-1), "global"), (Block((3, 5)), "global"), (Unstructured(per_slice=-1), "layer")]
    for stype, scope in cases:
        f = jax.jit(lambda p, s, stype=stype, scope=scope: magnitude(p, s, scope=scope, sparsity_type=stype))
        for s in (0.35, 0.9):
            got, want = flat(f(p, jnp.float32(s))), flat(magnitude(p, s, scope=scope, sparsity_type=stype))
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{stype} {scope} {s} {k}")


def test_sparsity_zero_and_one():
    p = params(4)
    for scope in ("layer", "global"):
        assert summary(magnitude(p, 0.0, scope=scope)).zeros == 0
        full = summary(magnitude(p, 1.0, scope=scope))
        assert full.zeros == full.total
        ch = flat(magnitude(p, 1.0, scope=scope, sparsity_type=Channel(-1)))
        for m in ch.values():  # one output channel survives per leaf (min_keep=1)
            assert m.reshape(-1, m.shape[-1]).any(0).sum() == 1
        blk = summary(magnitude(p, 1.0, scope=scope, sparsity_type=Block((2, 2))))
        assert blk.zeros == blk.total


def test_nan_pruned_first_and_zeros():
    p = params(5)
    k = np.asarray(p["params"]["Dense_0"]["kernel"]).copy()
    k[0, :3] = np.nan
    k[1, :] = 0.0
    p["params"]["Dense_0"]["kernel"] = jnp.asarray(k)
    m = np.asarray(magnitude(p, 0.05, rules=[(r".*Conv.*", None)])["params"]["Dense_0"]["kernel"])
    # 5 pruned (round(0.05*96 = 4.8)): the 3 NaN, then the first 2 zeros by index
    assert (~m).sum() == 5
    assert not m[0, :3].any() and not m[1, :2].any() and m[1, 2:].all()
    sparse = apply_masks(p, magnitude(p, 0.05, rules=[(r".*Conv.*", None)]))
    assert not np.isnan(np.asarray(sparse["params"]["Dense_0"]["kernel"])).any()


def test_bf16_weights():
    p = params(6, jnp.bfloat16)
    m = magnitude(p, 0.5, scope="global")
    ref = np_global_keep(jax.tree.map(lambda x: np.asarray(x, np.float32), p), 0.5)
    for k, v in flat(m).items():
        np.testing.assert_array_equal(v, ref[k])
    assert apply_masks(p, m)["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16


def test_channel_prunes_output_channels_of_dense_and_conv():
    p = params(7)
    m = flat(magnitude(p, 0.5, sparsity_type=Channel(-1)))
    for path, mask in m.items():
        w = np.abs(np.asarray(dict(leaves_with_paths(p))[path]))
        out = mask.reshape(-1, mask.shape[-1])
        assert (out.all(0) | ~out.any(0)).all()
        n = mask.shape[-1]
        means = w.reshape(-1, n).mean(0)
        pruned = np.argsort(means, kind="stable")[: math.floor(0.5 * n + 0.5)]
        assert set(np.flatnonzero(~out.any(0))) == set(pruned)


def test_linen_and_nnx_trees():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    v = model.init(jax.random.key(0), jnp.ones((1, 8)))
    m = magnitude(v, 0.75, scope="global")
    assert summary(m).zeros == math.floor(0.75 * (8 * 16 + 16 * 4) + 0.5)
    assert model.apply(apply_masks(v, m), jnp.ones((2, 8))).shape == (2, 4)

    mdl = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(mdl)
    ms = magnitude(state, 0.75, scope="global", sparsity_type=Block((4, 4)))
    assert isinstance(ms["layers"][0]["kernel"], nnx.Variable)
    merged = nnx.merge(graphdef, apply_masks(state, ms))
    assert merged(jnp.ones((2, 8))).shape == (2, 4)
    assert summary(ms).zeros == 8 * 16 * 3 // 4 + 16 * 4 * 3 // 4


def test_pruner_is_frozen_hashable_and_validated():
    pr = Magnitude(sparsity=0.5, rules=[[r".*/bias", None]])
    assert pr.rules == ((r".*/bias", None),)
    hash(pr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pr.sparsity = 0.1
    with pytest.raises(ValueError, match="unknown scope 'net'"):
        Magnitude(scope="net")
    with pytest.raises(ValueError, match="unknown distribution 'er'"):
        Magnitude(distribution="er")
    with pytest.raises(ValueError, match=r"Magnitude\.sparsity"):
        Magnitude(sparsity=1.5)
    with pytest.raises(ValueError, match="scope='layer'"):
        Magnitude(scope="global", distribution="erk")
    with pytest.raises(TypeError):
        Magnitude(sparsity_type="2:4")
    assert Pruner().init_state(params()) == ()
    assert not Magnitude.needs_grads and Saliency.needs_grads and Movement.needs_grads


def test_rules_override_and_unused_rule():
    p = params(8)
    rules = [(r".*/Conv_0/kernel", LeafConfig(0.25, Block((3, 2)))), (r".*/Dense_0/bias", 0.5)]
    m = magnitude(p, 0.5, rules=rules)
    s = summary(m).leaves
    assert s["params/Dense_0/bias"].zeros == 6 and s["params/Dense_0/kernel"].zeros == 48
    assert abs(s["params/Conv_0/kernel"].zeros - 72) <= 3
    with pytest.raises(ValueError, match=r"params/Dense_1/kernel"):
        magnitude(p, 0.5, rules=[(r"params/Dense_1/kernel", None)])


def test_movement_accumulates_gradients():
    p = params(9)
    pr = Movement(sparsity=0.5, rules=[(r".*Conv.*", None)])
    st = pr.init_state(p)
    assert st["params"]["Dense_0"]["bias"] is None and st["params"]["Conv_0"]["kernel"] is None
    rng = np.random.default_rng(0)
    gs = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p) for _ in range(3)]
    update = jax.jit(pr.update_state)
    for g in gs:
        st = update(st, p, g)
    gsum = sum(np.asarray(g["params"]["Dense_0"]["kernel"]) for g in gs)
    np.testing.assert_allclose(st["params"]["Dense_0"]["kernel"], gsum, rtol=1e-5, atol=1e-6)
    score = -np.asarray(p["params"]["Dense_0"]["kernel"]) * gsum
    keep = np.asarray(pr.masks(p, state=st)["params"]["Dense_0"]["kernel"])
    expect = np.ones(96, bool)
    expect[np.argsort(score.ravel(), kind="stable")[:48]] = False
    np.testing.assert_array_equal(keep.ravel(), expect)
    # jit with a traced sparsity and state
    f = jax.jit(lambda p, s, st: pr.masks(p, s, state=st))
    np.testing.assert_array_equal(f(p, jnp.float32(0.5), st)["params"]["Dense_0"]["kernel"], keep)
    with pytest.raises(ValueError, match="grads have no leaf 'params/Dense_0/kernel'"):
        pr.update_state(st, p, {"params": {}})


def test_saliency_masks_match_reference():
    p = params(10)
    rng = np.random.default_rng(1)
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    m = flat(Saliency(sparsity=0.7, scope="global").masks(p, grads=g))
    pw, gw = dict(leaves_with_paths(p)), dict(leaves_with_paths(g))
    sal = {k: np.abs(np.asarray(pw[k]) * np.asarray(gw[k])) for k in m}
    allv = np.concatenate([sal[k].ravel() for k in m])
    keep = np.ones(allv.size, bool)
    keep[np.argsort(allv, kind="stable")[: math.floor(0.7 * allv.size + 0.5)]] = False
    np.testing.assert_array_equal(np.concatenate([m[k].ravel() for k in m]), keep)
