"""Group-level channel importance: scores combined over coupled members (against numpy),
exact channel counts per group (Linen and NNX residual blocks), global ranking against a
brute-force reference, shrunk == masked, errors that name the argument."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from qjax.graph import nnx_apply
from qjax.graph.coupling import channel_groups
from qjax.prune import Magnitude, apply_masks, group_scores, masks_from_group_scores, shrink
from qjax.prune.rebuild import linen_apply, shrink_nnx
from qjax.prune.shrink import make_plan

from .test_shrink import _close, _rand, residual


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        bn = functools.partial(nn.BatchNorm, use_running_average=True)
        x = nn.relu(bn()(nn.Conv(8, (3, 3))(x)))
        h = nn.relu(bn()(nn.Conv(6, (3, 3))(x)))
        x = nn.relu(x + bn()(nn.Conv(8, (3, 3))(h)))
        return nn.Dense(3)(x.mean((1, 2)))


class NNXResNet(nnx.Module):
    def __init__(self, rngs):
        bn = functools.partial(nnx.BatchNorm, use_running_average=True, rngs=rngs)
        self.c0, self.b0 = nnx.Conv(2, 8, (3, 3), rngs=rngs), bn(8)
        self.c1, self.b1 = nnx.Conv(8, 6, (3, 3), rngs=rngs), bn(6)
        self.c2, self.b2 = nnx.Conv(6, 8, (3, 3), rngs=rngs), bn(8)
        self.fc = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.b0(self.c0(x)))
        x = nnx.relu(x + self.b2(self.c2(nnx.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((1, 2)))


def _stats(v, key=3):
    rng = np.random.default_rng(key)
    return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32), v)


def test_linen_residual_block_exact_counts_per_group():
    model, x = ResNet(), _rand(0, 2, 6, 6, 2)
    rng = np.random.default_rng(0)  # random variables without compiling init
    v = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
                     jax.eval_shape(model.init, jax.random.key(0), x))  # fmt: skip
    groups = channel_groups(model.apply, v, x)
    gs = group_scores(groups, Magnitude().scores(v))
    for sparsity in (0.25, 0.5):
        masks = masks_from_group_scores(gs, sparsity, groups, v)
        plan = make_plan(groups, v, masks)  # what shrink does after channel_groups
        want = {n: s.size - int(np.floor(sparsity * s.size + 0.5)) for n, s in gs.items()}
        assert sorted(want.values()) == sorted([6 - int(6 * sparsity + 0.5), 8 - int(8 * sparsity + 0.5)])
        assert {g.name: len(g.kept) for g in plan.groups} == want
        for name, s in gs.items():  # the kept channels are each group's best
            kept = next(g.kept for g in plan.groups if g.name == name)
            assert set(kept) == set(np.argsort(-s, kind="stable")[: want[name]].tolist())
    small, plan = shrink(model.apply, v, masks, x)
    stream = want[_name(groups, "params/Conv_0/kernel", 3)]
    assert plan == make_plan(groups, v, masks)
    assert small["batch_stats"]["BatchNorm_2"]["var"].shape == (stream,)
    _close(jax.jit(linen_apply(model, plan=plan))(small, x), jax.jit(model.apply)(apply_masks(v, masks), x))


def _name(groups, path, axis):
    return next(g.name for g in groups if any(m.path == path and m.axis == axis for m in g.members))


def test_nnx_residual_block_exact_counts_and_shrunk_equals_masked():
    model, x = NNXResNet(nnx.Rngs(0)), _rand(1, 2, 6, 6, 2)
    for bn in (model.b0, model.b1, model.b2):
        bn.var[...], bn.mean[...] = _stats(bn.var[...], 4), _stats(bn.mean[...], 5)
    graphdef, state = nnx.split(model)
    f = nnx_apply(graphdef)
    groups = channel_groups(f, state, x)
    gs = group_scores(groups, Magnitude().scores(state), reduction="mean", normalize="max")
    masks = masks_from_group_scores(gs, 0.5, groups, state, multiple=2)
    _, plan = shrink(f, state, masks, x)
    want = jax.jit(f)(apply_masks(state, masks), x)
    shrink_nnx(model, plan)
    _close(jax.jit(nnx_apply(nnx.graphdef(model)))(nnx.state(model), x), want)
    assert model.c0.out_features == model.b0.num_features == model.c2.out_features == 4
    assert model.fc.in_features == 4
    assert model.c1.out_features == model.b1.num_features == model.c2.in_features == 4  # 3, rounded up to 2s


def _brute_global(gs, sparsity):
    """Reference: every channel of every group in one list, pruned by (NaN first, score,
    group order, index), each group's best channel protected."""
    names = list(gs)
    key = lambda s, j: (not np.isnan(s[j]), 0.0 if np.isnan(s[j]) else float(s[j]))
    best = {n: max(range(gs[n].size), key=lambda j, s=gs[n]: (*key(s, j), j)) for n in names}
    items = [(*key(gs[n], j), gi, j) for gi, n in enumerate(names) for j in range(gs[n].size) if j != best[n]]
    total = sum(s.size for s in gs.values())
    gone = sorted(items)[: int(np.floor(sparsity * total + 0.5))]
    return {n: sorted(set(range(gs[n].size)) - {j for _, _, gi, j in gone if names[gi] == n}) for n in names}


RES = {"w0": _rand(0, 5, 8), "a1": _rand(1, 8, 4), "a2": _rand(2, 4, 8), "b1": _rand(3, 8, 6),
       "b2": _rand(4, 6, 8), "bias": _rand(5, 8), "out": _rand(6, 8, 2)}  # fmt: skip
RES_X = _rand(8, 3, 5)


@functools.cache
def _res_groups():
    return channel_groups(residual, RES, RES_X)


@pytest.mark.parametrize("ties", [False, True])
def test_global_scope_matches_brute_force_ranking(ties):
    groups = _res_groups()
    for sparsity in (0.0, 0.3, 0.5, 0.9, 1.0):
        rng = np.random.default_rng(int(sparsity * 10) + ties)
        gs = {g.name: rng.integers(0, 3, g.size).astype(float) if ties else rng.random(g.size)
              for g in groups if g.prunable}  # fmt: skip
        assert len(gs) == 3
        if ties:
            gs["a1:1"][1] = np.nan
        masks = masks_from_group_scores(gs, sparsity, groups, RES, scope="global")
        plan = make_plan(groups, RES, masks)
        got = {n: list(range(s.size)) for n, s in gs.items()} | {g.name: list(g.kept) for g in plan.groups}
        assert got == _brute_global(gs, sparsity)
    small, shrunk = shrink(residual, RES, masks, RES_X)
    assert shrunk == plan
    _close(residual(small, RES_X), residual(apply_masks(RES, masks), RES_X))


def test_group_scores_match_numpy_for_every_reduction_and_normalizer():
    groups = _res_groups()
    scores = {k: (jnp.abs(w) if w.ndim == 2 else None) for k, w in RES.items()}
    stream = next(g for g in groups if g.name == "a1:0")  # w0 out, a1/b1 in, a2/b2 out, bias, out in
    cols = {"w0": 1, "a2": 1, "b2": 1, "a1": 0, "b1": 0, "out": 0}
    per = [np.abs(np.asarray(RES[k], np.float64)).sum(axis=1 - ax) for k, ax in cols.items()]
    for reduction, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        for normalize, div in ((None, lambda v: 1.0), ("mean", np.mean), ("max", np.max), ("sum", np.sum)):
            got = group_scores(groups, scores, reduction=reduction, normalize=normalize)
            ref = fn(np.stack([v / div(v) for v in per]), axis=0)
            np.testing.assert_allclose(got["a1:0"], ref, rtol=1e-6)
    assert set(got) == {g.name for g in groups if g.prunable} and stream.prunable
    # a tree over part of the params (suffix paths) and NaN scores
    v = {"params": RES}
    sub = group_scores(channel_groups(lambda p, x: residual(p["params"], x), v, RES_X), scores)
    np.testing.assert_allclose(sub["params/a1:0"], group_scores(groups, scores)["a1:0"])


def test_multiple_and_rules():
    groups = _res_groups()
    gs = group_scores(groups, {k: jnp.abs(w) for k, w in RES.items()})
    masks = masks_from_group_scores(gs, 0.5, groups, RES, multiple=3, rules=[("a1:1", None), ("b1:1", 0.5)])
    plan = make_plan(groups, RES, masks)
    assert {g.name: len(g.kept) for g in plan.groups} == {"a1:0": 6, "b1:1": 3}  # 8 - 4 -> 6; 6 - 3
    assert plan.apply(RES)["a1"].shape == (6, 4)
    masks = masks_from_group_scores(gs, 0.6, groups, RES, rules=[("b1:1", 0.5)], scope="global")
    kept = {g.name: len(g.kept) for g in make_plan(groups, RES, masks).groups}
    assert kept["b1:1"] == 3 and 8 + 4 - kept["a1:0"] - kept.get("a1:1", 4) == int(np.floor(0.6 * 12 + 0.5))


def test_errors_name_the_argument():
    groups = _res_groups()
    scores = {k: jnp.abs(w) for k, w in RES.items()}
    gs = group_scores(groups, scores)
    with pytest.raises(ValueError, match="reduction must be one of"):
        group_scores(groups, scores, reduction="median")
    with pytest.raises(ValueError, match="normalize must be one of"):
        group_scores(groups, scores, normalize="gaussian")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        masks_from_group_scores(gs, 1.5, groups, RES)
    with pytest.raises(TypeError, match="sparsity"):
        masks_from_group_scores(gs, "half", groups, RES)
    with pytest.raises(ValueError, match="scope must be one of"):
        masks_from_group_scores(gs, 0.5, groups, RES, scope="layer")
    with pytest.raises(ValueError, match="multiple must be"):
        masks_from_group_scores(gs, 0.5, groups, RES, multiple=0)
    with pytest.raises(ValueError, match=r"\['nope'\] match no group"):
        masks_from_group_scores(gs, 0.5, groups, RES, rules=[("nope", None)])
    with pytest.raises(ValueError, match="rule 'a1:0' matching group 'a1:0' has value 'x'"):
        masks_from_group_scores(gs, 0.5, groups, RES, rules=[("a1:0", "x")])
    with pytest.raises(ValueError, match="'zz'"):
        masks_from_group_scores({"zz": np.ones(3)}, 0.5, groups, RES)
    with pytest.raises(ValueError, match=r"group 'a1:0' has shape \(3,\)"):
        masks_from_group_scores({"a1:0": np.ones(3)}, 0.5, groups, RES)
    with pytest.raises(ValueError, match="score path 'nope'"):
        group_scores(groups, {**scores, "nope": jnp.ones(3)})
