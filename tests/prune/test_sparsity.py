"""Sparsity types and the rank-based selection, against NumPy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax.prune.sparsity import (
    NM,
    Block,
    Channel,
    LeafConfig,
    Unstructured,
    check_sparsity,
    select_prune,
    target_count,
    top_units,
)


def np_prune_order(scores):
    """Reference pruning order: NaN first, then ascending, ties by index."""
    s = np.asarray(scores, np.float64)
    key = np.where(np.isnan(s), -np.inf, s)
    nan_first = np.lexsort((np.arange(s.size), key, ~np.isnan(s)))
    return nan_first


def np_round_half_up(s, n):
    return min(max(math.floor(s * n + 0.5), 0), n)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_mask(stype, score, k, path):
    return stype.leaf_mask(score, k, path)


def leaf_mask(stype, score, k, path="w"):
    """A leaf's keep-mask (jitted: one compile per type and shape, the count traced)."""
    return np.asarray(_jit_mask(stype, jnp.asarray(score), jnp.asarray(k, jnp.int32), path))


# -- counts ---------------------------------------------------------------------------------


def test_target_count_rounding_rule():
    assert target_count(0.5, 5) == 3  # half up, not banker's
    assert target_count(0.25, 2) == 1
    assert target_count(0.3, 10) == 3
    assert target_count(0.0, 7) == 0 and target_count(1.0, 7) == 7
    assert target_count(0.5, 0) == 0
    assert int(target_count(jnp.float32(0.5), 5)) == 3


_COUNT_FNS = {n: jax.jit(lambda v, n=n: target_count(v, n)) for n in (0, 1, 7, 10, 999, 4097)}


@given(st.floats(0, 1, width=32), st.sampled_from(sorted(_COUNT_FNS)))
@settings(max_examples=examples(30))
def test_target_count_python_and_traced_agree(s, n):
    exact = target_count(float(s), n)
    assert exact == np_round_half_up(float(s), n)
    traced = int(_COUNT_FNS[n](jnp.float32(s)))
    # float32 arithmetic: equal except when s*n sits within float32 rounding of a half-integer
    assert abs(traced - exact) <= (0 if abs(float(s) * n - math.floor(float(s) * n) - 0.5) > 1e-3 else 1)


def test_check_sparsity_errors():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            check_sparsity(bad)
    with pytest.raises(TypeError):
        check_sparsity("0.5")
    with pytest.raises(TypeError):
        check_sparsity(True)
    assert check_sparsity(1) == 1.0


# -- select_prune ---------------------------------------------------------------------------


@given(
    st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, float("nan"), 3.0]), min_size=24, max_size=24),
    st.floats(0, 1),
)
@settings(max_examples=examples(20))
def test_select_prune_unit_sizes_matches_numpy_topk(values, s):
    scores = np.array(values, np.float32)
    k = np_round_half_up(s, scores.size)
    pruned = np.asarray(select_prune(jnp.asarray(scores), np.ones(scores.size, np.int64), k))
    expect = np.zeros(scores.size, bool)
    expect[np_prune_order(scores)[:k]] = True
    np.testing.assert_array_equal(pruned, expect)
    assert pruned.sum() == k


def test_nan_first_and_ties_by_index():
    scores = jnp.array([1.0, 0.0, jnp.nan, 0.0, -0.0, 5.0])
    pruned = np.asarray(select_prune(scores, np.ones(6, np.int64), 3))
    # NaN first, then the zeros by index (1, 3, 4): -0.0 ties with 0.0
    np.testing.assert_array_equal(pruned, [False, True, True, True, False, False])


@given(st.lists(st.integers(1, 9), min_size=10, max_size=10), st.integers(0, 100), st.integers(0, 2**31 - 1))
@settings(max_examples=examples(20))
def test_select_prune_structured_is_closest_prefix(sizes, target, seed):
    sizes = np.array(sizes)
    target = min(target, int(sizes.sum()))
    scores = np.random.default_rng(seed).permutation(len(sizes)).astype(np.float32)
    pruned = np.asarray(select_prune(jnp.asarray(scores), sizes, target))
    order = np_prune_order(scores)
    p = int(pruned.sum())
    assert pruned[order[:p]].all() and not pruned[order[p:]].any()  # a prefix of the ranking
    cum = np.concatenate([[0], np.cumsum(sizes[order])])
    # the half rule: unit j is pruned iff cum[j] + ceil(size/2) <= target
    expect = sum(cum[j] + -(-sizes[order][j] // 2) <= target for j in range(len(sizes)))
    assert p == expect
    assert abs(cum[p] - target) <= min(abs(c - target) for c in cum) + max(sizes) / 2


def test_select_prune_protected_and_top_units():
    scores = jnp.array([0.0, 1.0, 2.0, 3.0])
    prot = top_units(scores, 1)
    np.testing.assert_array_equal(prot, [False, False, False, True])
    pruned = select_prune(scores, np.ones(4, np.int64), 4, prot)
    np.testing.assert_array_equal(pruned, [True, True, True, False])
    assert select_prune(jnp.zeros((0,)), np.zeros(0, np.int64), 0).shape == (0,)
    assert not top_units(jnp.zeros((0,)), 3).any()


# -- unstructured -----------------------------------------------------------------------------


@given(
    st.sampled_from([(3, 4), (1, 5)]),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=examples(15))
def test_unstructured_leaf_matches_numpy(shape, s, seed):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    k = np_round_half_up(s, w.size)
    keep = leaf_mask(Unstructured(), jnp.abs(jnp.asarray(w)), k)
    expect = np.ones(w.size, bool)
    expect[np_prune_order(np.abs(w).ravel())[:k]] = False
    np.testing.assert_array_equal(keep.ravel(), expect)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 1.0])
def test_unstructured_per_slice_each_column(s):
    w = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    st_ = Unstructured(per_slice=-1)
    total = target_count(s, w.size)
    keep = leaf_mask(st_, jnp.abs(jnp.asarray(w)), total)
    assert (~keep).sum() == total  # the leaf count stays exact
    for j in range(5):
        k = total // 5 + (j < total % 5)  # shared evenly, earlier slices take the remainder
        expect = np.ones(7, bool)
        expect[np_prune_order(np.abs(w[:, j]))[:k]] = False
        np.testing.assert_array_equal(keep[:, j], expect)
    with pytest.raises(ValueError, match="'x'"):
        Unstructured(per_slice=2).validate("x", (3, 3))


# -- N:M ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nm_2_4_exact_per_group_and_matches_numpy(axis):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 12)).astype(np.float32)
    w[0, :4] = np.nan
    keep = leaf_mask(NM(2, 4, axis=axis), jnp.abs(jnp.asarray(w)), 0)
    moved = np.moveaxis(np.abs(w), axis, -1)
    kmoved = np.moveaxis(keep, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    kg = kmoved.reshape(groups.shape)
    assert (kg.sum(-1) == 2).all()
    for idx in np.ndindex(groups.shape[:-1]):
        expect = np.ones(4, bool)
        expect[np_prune_order(groups[idx])[:2]] = False
        np.testing.assert_array_equal(kg[idx], expect)


def test_nm_errors_and_edge_ratios():
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel'.*not divisible by m=4"):
        NM(2, 4).validate("params/Dense_0/kernel", (6, 8))
    with pytest.raises(ValueError, match="axis"):
        NM(2, 4, axis=2).validate("k", (4, 4))
    for n, m in [(3, 2), (-1, 4), (1, 0)]:
        with pytest.raises(ValueError):
            NM(n, m)
    w = jnp.arange(8.0).reshape(4, 2)
    assert leaf_mask(NM(0, 4), w, 0).sum() == 0
    assert leaf_mask(NM(1, 1), w, 0).all()
    assert NM(2, 4).density == 0.5


# -- Block ---------------------------------------------------------------------------------


def np_block_keep(score, bshape, k):
    """Reference: block means over real elements, prune the closest prefix."""
    h, w = score.shape[-2:]
    bh, bw = bshape
    lead = score.shape[:-2]
    blocks = []
    for li in np.ndindex(lead):
        for i in range(0, h, bh):
            for j in range(0, w, bw):
                blk = score[li][i : i + bh, j : j + bw]
                blocks.append((li, i, j, blk.mean(), blk.size))
    order = np_prune_order(np.array([b[3] for b in blocks]))
    keep = np.ones(score.shape, bool)
    cum = 0
    for idx in order:
        li, i, j, _, size = blocks[idx]
        if cum + -(-size // 2) > k:
            break
        keep[li][i : i + bh, j : j + bw] = False
        cum += size
    return keep


@given(
    st.sampled_from([(7, 9), (2, 5, 6)]),
    st.sampled_from([(2, 3), (4, 4)]),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=examples(12))
def test_block_matches_numpy_with_partial_edges(shape, bshape, s, seed):
    score = np.abs(np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
    k = np_round_half_up(s, score.size)
    keep = leaf_mask(Block(bshape), jnp.asarray(score), k)
    np.testing.assert_array_equal(keep, np_block_keep(score, bshape, k))


def test_block_validation():
    with pytest.raises(ValueError, match="'b'"):
        Block((2, 2)).validate("b", (4,))
    with pytest.raises(ValueError):
        Block((0, 2))
    with pytest.raises(ValueError):
        Block((2,))


# -- Channel --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((3, 3, 4, 6), -1), ((3, 3, 4, 6), -2), ((5,), 0)])
def test_channel_whole_slices(shape, axis):
    score = np.abs(np.random.default_rng(2).normal(size=shape)).astype(np.float32)
    n_ch = shape[axis]
    k = np_round_half_up(0.5, score.size)
    keep = leaf_mask(Channel(axis, min_keep=0), jnp.asarray(score), k)
    moved = np.moveaxis(keep, axis, 0).reshape(n_ch, -1)
    assert (moved.all(1) | ~moved.any(1)).all()  # all-or-nothing per channel
    means = np.moveaxis(score, axis, 0).reshape(n_ch, -1).mean(1)
    n_pruned = np_round_half_up(0.5, n_ch)  # uniform channel size: the channel count rounds the same
    expect = np.ones(n_ch, bool)
    expect[np_prune_order(means)[:n_pruned]] = False
    np.testing.assert_array_equal(moved[:, 0], expect)


def test_channel_min_keep_at_full_sparsity():
    score = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(4, 6))), jnp.float32)
    keep = leaf_mask(Channel(), score, 24)
    assert keep.any(0).sum() == 1  # one output channel survives
    best = int(np.argmax(np.asarray(score).mean(0)))
    assert keep[:, best].all()
    assert not leaf_mask(Channel(min_keep=0), score, 24).any()
    with pytest.raises(ValueError):
        Channel(min_keep=-1)


def test_empty_and_size_one_axes():
    for stype in (Unstructured(), Channel(0), Block((2, 2))):
        for shape in [(0, 4), (1, 1), (1, 5)]:
            score = jnp.ones(shape)
            keep = leaf_mask(stype, score, target_count(0.5, score.size))
            assert keep.shape == shape
    keep = leaf_mask(Unstructured(), jnp.ones((1, 1)), 1)
    assert not bool(keep[0, 0])


def test_leaf_config_validation():
    assert LeafConfig(0.3).sparsity == 0.3
    with pytest.raises(ValueError):
        LeafConfig(1.2)
    with pytest.raises(TypeError):
        LeafConfig(0.3, sparsity_type="nm")


@settings(max_examples=examples(15), deadline=None)  # each length compiles; make fuzz scales it up
@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"), -float("inf"), 1e-30]),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 45),
    st.booleans(),
)
def test_bisection_selection_equals_the_sorted_order(values, target, with_protected):
    from qjax.prune.sparsity import _rank_order, _select_elements

    scores = jnp.asarray(values, jnp.float32)
    protected = jnp.asarray(np.arange(len(values)) % 3 == 0) if with_protected else None
    got = np.asarray(_select_elements(scores, target, protected))
    order = np.asarray(_rank_order(scores, protected))
    k = min(target, len(values) - (int(np.sum(protected)) if with_protected else 0))
    want = np.zeros(len(values), bool)
    want[order[:k]] = True
    np.testing.assert_array_equal(got, want)
