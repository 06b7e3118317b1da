"""Distributions: ERK against a float64 NumPy transcription of the RigL algorithm, exact totals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax.prune.distribution import erk, erk_densities, get_distribution, leaf_counts, uniform
from qjax.prune.masks import masks_from_scores, summary
from qjax.prune.sparsity import NM, Block

SHAPES = {
    "conv1": (3, 3, 3, 16),
    "conv2": (3, 3, 16, 32),
    "fc1": (128, 64),
    "fc2": (128, 10),
    "tiny": (2, 2),
}


def rigl_erk_reference(shapes, sparsity):
    """Evci et al. 2020 (RigL ``sparse_utils.get_sparsities``), float64, written as in the paper's code."""
    density = 1 - sparsity
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = np.prod(shape)
            n_zeros = n_param * sparsity
            n_ones = n_param * density
            if name in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_ones
                raw[name] = np.sum(shape) / np.prod(shape)
                divisor += raw[name] * n_param
        if not raw:
            break
        eps = rhs / divisor
        max_prob = max(raw.values()) if raw else 0.0
        if max_prob * eps > 1:
            for name, p in raw.items():
                if p == max_prob:
                    dense_layers.add(name)
        else:
            break
    return {n: (1.0 if n in dense_layers else eps * np.sum(s) / np.prod(s)) for n, s in shapes.items()}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_erk_matches_reference(sparsity):
    ref = rigl_erk_reference(SHAPES, sparsity)
    got = erk(SHAPES, sparsity)
    for name in SHAPES:
        np.testing.assert_allclose(1 - got[name], ref[name], rtol=1e-12, atol=1e-12)
    n = {k: math.prod(s) for k, s in SHAPES.items()}
    kept = sum(ref[k] * n[k] for k in SHAPES)
    np.testing.assert_allclose(kept, (1 - sparsity) * sum(n.values()), rtol=1e-12)


def test_erk_dense_resolve_happens():
    # at 0.5 the tiny and small layers would exceed density 1: made dense, the rest re-solved
    dens = erk_densities(list(SHAPES.values()), 0.5)
    ref = rigl_erk_reference(SHAPES, 0.5)
    assert dens[-1] == 1.0 and ref["tiny"] == 1.0
    assert (np.asarray(dens) <= 1.0).all()


def test_erk_traced_close_to_float64():
    paths = list(SHAPES)
    f = jax.jit(lambda s: erk_densities([SHAPES[p] for p in paths], s))
    for s in (0.5, 0.9, 0.99):
        ref = rigl_erk_reference(SHAPES, s)
        got = np.asarray(f(jnp.float32(s)))
        np.testing.assert_allclose(got, [ref[p] for p in paths], rtol=2e-5, atol=1e-6)


@given(
    st.lists(
        st.sampled_from([(3, 3, 8, 8), (16, 4), (5, 7), (1, 9), (2, 2, 2), (64, 32), (0, 4)]),
        min_size=1,
        max_size=6,
    ),
    st.floats(0, 1),
)
@settings(max_examples=examples(40))
def test_erk_counts_exact_total(shape_list, s):
    shapes = {f"l{i}": sh for i, sh in enumerate(shape_list)}
    counts = leaf_counts(shapes, s, "erk")
    total = sum(math.prod(sh) for sh in shapes.values())
    assert sum(counts.values()) == math.floor(s * total + 0.5)
    for p, sh in shapes.items():
        assert 0 <= counts[p] <= math.prod(sh)
    # each count is within one of its real target
    ref = rigl_erk_reference({p: sh for p, sh in shapes.items() if math.prod(sh)}, s) if total else {}
    for p, c in counts.items():
        if p in ref:
            assert abs(c - (1 - ref[p]) * math.prod(shapes[p])) < 1 + 1e-6


def test_erk_counts_traced_total_exact():
    shapes = {k: v for k, v in SHAPES.items()}
    total = sum(math.prod(s) for s in shapes.values())
    f = jax.jit(lambda s: leaf_counts(shapes, s, "erk"))
    for s in (0.3, 0.9, 0.97):
        counts = f(jnp.float32(s))
        assert sum(int(c) for c in counts.values()) == math.floor(np.float32(s) * np.float32(total) + 0.5)


def test_uniform_counts_per_leaf():
    shapes = {"a": (5,), "b": (3, 3)}
    assert uniform(shapes, 0.5) == {"a": 0.5, "b": 0.5}
    assert leaf_counts(shapes, 0.5) == {"a": 3, "b": 5}  # round half up per leaf
    assert leaf_counts({}, 0.5) == {}


def test_custom_callable_and_errors():
    shapes = {"a": (4, 4), "b": (8, 8)}
    fn = lambda shapes, s: {"a": 0.0, "b": min(1.0, s * 80 / 64)}
    counts = leaf_counts(shapes, 0.5, fn)
    assert counts == {"a": 0, "b": 40}
    with pytest.raises(ValueError, match="no sparsity for"):
        leaf_counts(shapes, 0.5, lambda shapes, s: {"a": s})
    with pytest.raises(ValueError, match=r"unknown distribution 'er'.*'erk'"):
        get_distribution("er")
    with pytest.raises(ValueError, match="sparsity of 'a'"):
        leaf_counts(shapes, 0.5, lambda shapes, s: {"a": 2.0, "b": s})


def test_erk_through_masks_from_scores():
    rng = np.random.default_rng(0)
    scores = {k: jnp.asarray(np.abs(rng.normal(size=s)), jnp.float32) for k, s in SHAPES.items()}
    m = masks_from_scores(scores, 0.9, distribution="erk")
    sm = summary(m)
    assert sm.zeros == math.floor(0.9 * sm.total + 0.5)
    ref = rigl_erk_reference(SHAPES, 0.9)
    for k, leaf in sm.leaves.items():
        assert abs(leaf.zeros - (1 - ref[k]) * leaf.total) < 1 + 1e-6
    # rule-fixed and N:M leaves are left out; the target is spread over the rest
    rules = [("fc1", 0.5), ("fc2", NM(2, 4, axis=0))]
    m = masks_from_scores(scores, 0.9, distribution="erk", rules=rules)
    sm = summary(m)
    rest = [k for k in SHAPES if k not in ("fc1", "fc2")]
    rest_total = sum(sm.leaves[k].total for k in rest)
    assert sum(sm.leaves[k].zeros for k in rest) == math.floor(0.9 * rest_total + 0.5)
    assert sm.leaves["fc1"].zeros == 128 * 32 and sm.leaves["fc2"].zeros == 640
    # structured leaves take the ERK per-leaf sparsity too
    two = {"conv2": scores["conv2"], "fc2": scores["fc2"]}
    mb = masks_from_scores(two, 0.9, distribution="erk", sparsity_type=Block((2, 2)))
    counts = leaf_counts({k: v.shape for k, v in two.items()}, 0.9, "erk")
    for k, leaf in summary(mb).leaves.items():  # blocks of 4: within half a block of the ERK count
        assert abs(leaf.zeros - counts[k]) <= 2
