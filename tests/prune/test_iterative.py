"""Iterative prune -> fine-tune loop: stopping on the metric threshold, reaching the target,
masks re-applied after fine-tuning, history."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.prune.iterative import iterative_prune
from qjax.prune.pruners import Magnitude, Saliency
from qjax.prune.sparsity import target_count


def make_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "a": {"kernel": jax.random.normal(k1, (10, 10)), "bias": jnp.ones(10)},
        "b": {"kernel": jax.random.normal(k2, (10, 4))},
    }


def zero_fraction(params):
    ks = [params["a"]["kernel"], params["b"]["kernel"]]
    return sum(int((k == 0).sum()) for k in ks) / sum(k.size for k in ks)


def fake_accuracy(params):
    """A metric that falls with the fraction of zero kernel weights: 0.9 - s**2."""
    return 0.9 - zero_fraction(params) ** 2


def test_stops_when_the_drop_exceeds_the_threshold_and_returns_the_last_good_state():
    calls = []

    def finetune(params, masks):
        calls.append(masks)
        for k in ("a", "b"):  # the pruned params arrive with zeros at masked positions
            assert bool(jnp.all(params[k]["kernel"][~masks[k]["kernel"]] == 0))
        return params

    res = iterative_prune(
        make_params(), Magnitude(), finetune, fake_accuracy, target=0.9, step_size=0.2, max_drop=0.25
    )
    # rounds at 0.2 (drop .04), 0.4 (.16), 0.6 (.36 > .25: rejected)
    assert [r.sparsity for r in res.history] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [r.accepted for r in res.history] == [True, True, True, False]
    assert res.history[0].metric == pytest.approx(0.9) and res.baseline == pytest.approx(0.9)
    assert res.history[-1].drop == pytest.approx(0.36, abs=0.01)
    assert res.sparsity == pytest.approx(0.4) and not res.reached_target
    assert zero_fraction(res.params) == pytest.approx(0.4, abs=0.01)
    assert res.masks["a"]["bias"] is None
    for k, n in (("a", 100), ("b", 40)):
        assert int((~res.masks[k]["kernel"]).sum()) == target_count(0.4, n)
        assert bool(jnp.all(res.params[k]["kernel"][~res.masks[k]["kernel"]] == 0))
    assert len(calls) == 3
    # masks only grow: a weight pruned in one round stays pruned in the next
    for m1, m2 in itertools.pairwise(calls):
        assert not bool(jnp.any(m2["a"]["kernel"] & ~m1["a"]["kernel"]))
    assert res.history[2].actual == pytest.approx(0.4, abs=0.01)


def test_reaches_the_target_and_reapplies_masks_after_finetuning():
    def finetune(params, masks):  # moves every weight, pruned ones included
        return jax.tree.map(lambda w: w + 0.5, params)

    res = iterative_prune(
        make_params(), Magnitude(), finetune, fake_accuracy, target=0.9, steps=3, max_drop=1.0
    )
    assert [r.sparsity for r in res.history[1:]] == pytest.approx([0.3, 0.6, 0.9])
    assert all(r.accepted for r in res.history) and res.reached_target
    for k, n in (("a", 100), ("b", 40)):
        w, m = res.params[k]["kernel"], res.masks[k]["kernel"]
        assert int((~m).sum()) == target_count(0.9, n)
        assert bool(jnp.all(w[~m] == 0)) and bool(jnp.all(w[m] != 0))
    np.testing.assert_allclose(res.params["a"]["bias"], 1.0 + 3 * 0.5)


def test_first_round_fails_returns_dense_and_lower_is_better_relative():
    params = make_params()
    res = iterative_prune(
        params, Magnitude(), lambda p, m: p, fake_accuracy, target=0.5, step_size=0.5, max_drop=0.01
    )
    assert res.sparsity == 0.0 and not res.reached_target
    assert res.params is params
    assert all(bool(jnp.all(m)) for m in jax.tree.leaves(res.masks))
    assert [r.accepted for r in res.history] == [True, False]

    def loss(p):  # lower is better: 1 + s
        return 1.0 + zero_fraction(p)

    res = iterative_prune(
        params,
        Magnitude(),
        lambda p, m: p,
        loss,
        target=0.8,
        step_size=0.1,
        max_drop=0.25,
        higher_is_better=False,
        relative=True,
    )
    assert res.sparsity == pytest.approx(0.2)  # 0.3 makes the loss 30% worse
    assert res.history[-1].drop == pytest.approx(0.3, abs=0.01)


def test_grad_pruners_and_validation():
    params = make_params()
    with pytest.raises(ValueError, match="grads_fn"):
        iterative_prune(params, Saliency(), lambda p, m: p, fake_accuracy, target=0.5, steps=2, max_drop=1.0)
    grads_fn = lambda p: jax.tree.map(jnp.ones_like, p)  # saliency = |w|: same as magnitude
    res = iterative_prune(
        params,
        Saliency(),
        lambda p, m: p,
        fake_accuracy,
        target=0.5,
        steps=2,
        max_drop=1.0,
        grads_fn=grads_fn,
    )
    ref = iterative_prune(
        params, Magnitude(), lambda p, m: p, fake_accuracy, target=0.5, steps=2, max_drop=1.0
    )
    for a, b in zip(jax.tree.leaves(res.masks), jax.tree.leaves(ref.masks)):
        np.testing.assert_array_equal(a, b)
    for kw, match in (
        (dict(step_size=0.1, steps=2), "exactly one"),
        (dict(), "exactly one"),
        (dict(steps=0), "`steps`"),
        (dict(step_size=1.5), "`step_size`"),
    ):
        with pytest.raises(ValueError, match=match):
            iterative_prune(
                params, Magnitude(), lambda p, m: p, fake_accuracy, target=0.5, max_drop=0.1, **kw
            )
    with pytest.raises(ValueError, match="`target`"):
        iterative_prune(params, Magnitude(), lambda p, m: p, fake_accuracy, target=1.5, steps=2, max_drop=0.1)
    with pytest.raises(ValueError, match="`max_drop`"):
        iterative_prune(params, Magnitude(), lambda p, m: p, fake_accuracy, target=0.5, steps=2, max_drop=-1)
