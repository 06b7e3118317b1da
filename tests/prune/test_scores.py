"""Score functions and the registry."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.prune import scores as S
from qjax.prune.pruners import Movement, Pruner, Random, Saliency
from qjax.rules import leaves_with_paths

W = np.array([[-2.0, 0.5], [0.0, 1.5], [3.0, -0.25]], np.float32)
G = np.array([[0.1, -2.0], [5.0, 0.5], [-1.0, 1.0]], np.float32)


def test_magnitude_saliency_movement_values():
    np.testing.assert_array_equal(S.magnitude_score(jnp.asarray(W)), np.abs(W))
    sal = S.saliency_score(jnp.asarray(W), grad=jnp.asarray(G))
    np.testing.assert_allclose(sal, np.abs(W * G), rtol=1e-6)
    np.testing.assert_allclose(S.movement_score(jnp.asarray(W), state=jnp.asarray(G)), -W * G, rtol=1e-6)
    np.testing.assert_allclose(S.movement_score(jnp.asarray(W), grad=jnp.asarray(G)), -W * G, rtol=1e-6)


def test_bf16_weights_scored_in_float32():
    w = jnp.asarray(W, jnp.bfloat16)
    out = S.magnitude_score(w)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, np.abs(np.asarray(w, np.float32)))
    assert S.saliency_score(w, grad=jnp.asarray(G, jnp.bfloat16)).dtype == jnp.float32


def test_wanda_broadcast_and_errors():
    norm = np.array([[1.0], [2.0], [0.5]], np.float32)  # (in, 1) for a (in, out) kernel
    np.testing.assert_allclose(S.wanda_score(jnp.asarray(W), act_norm=jnp.asarray(norm)), np.abs(W) * norm)
    with pytest.raises(ValueError, match=r"'k'.*not broadcastable"):
        S.wanda_score(jnp.asarray(W), act_norm=jnp.ones((2, 3)), path="k")
    with pytest.raises(ValueError, match="wanda score of 'k' needs activation norms"):
        S.wanda_score(jnp.asarray(W), path="k")


def test_missing_inputs_name_the_path():
    with pytest.raises(ValueError, match="saliency score of 'p/k' needs the gradient"):
        S.saliency_score(jnp.asarray(W), path="p/k")
    with pytest.raises(ValueError, match="movement score of 'p/k'"):
        S.movement_score(jnp.asarray(W), path="p/k")
    with pytest.raises(ValueError, match="random score of 'p/k' needs a PRNG key"):
        S.random_score(jnp.asarray(W), path="p/k")


def test_random_keyed_and_independent_per_leaf():
    params = {"a": jnp.zeros((4, 4)), "b": jnp.zeros((4, 4))}
    p = Random(sparsity=0.5)
    s1 = p.scores(params, key=jax.random.key(0))
    s2 = p.scores(params, key=jax.random.key(0))
    s3 = p.scores(params, key=jax.random.key(1))
    np.testing.assert_array_equal(s1["a"], s2["a"])
    assert not np.array_equal(s1["a"], s1["b"])  # leaves differ (path folded into the key)
    assert not np.array_equal(s1["a"], s3["a"])
    assert ((np.asarray(s1["a"]) >= 0) & (np.asarray(s1["a"]) < 1)).all()
    with pytest.raises(ValueError, match="key"):
        p.scores(params)
    m = p.masks(params, key=jax.random.key(0))
    assert int(sum(np.asarray(x).sum() for x in m.values())) == 16


def test_registry():
    assert S.get_score("magnitude") is S.magnitude_score
    with pytest.raises(ValueError, match=r"unknown score 'l3'.*'magnitude'.*'movement'.*'wanda'"):
        S.get_score("l3")
    with pytest.raises(ValueError, match="already registered"):
        S.register_score("magnitude", lambda w, **_: w)
    with pytest.raises(TypeError):
        S.register_score("bad", 3)
    fn = S.register_score("neg_square", lambda w, **_: -jnp.square(jnp.asarray(w, jnp.float32)))
    try:

        @dataclasses.dataclass(frozen=True)
        class NegSquare(Pruner):
            score_name: ClassVar[str] = "neg_square"

        params = {"k": jnp.asarray(W)}
        keep = np.asarray(NegSquare(sparsity=0.5).masks(params)["k"])
        # the smallest |w| score highest under -w**2: the 3 largest |w| are pruned
        np.testing.assert_array_equal(keep, np.abs(W) <= 0.5)
        assert S.register_score("neg_square", fn, overwrite=True) is fn
    finally:
        S.SCORES.pop("neg_square")


def test_saliency_and_movement_pruners_need_grads():
    params = {"k": jnp.asarray(W), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="Saliency needs grads"):
        Saliency().masks(params)
    with pytest.raises(ValueError, match="Movement needs grads"):
        Movement().masks(params)
    with pytest.raises(ValueError, match="grads have no leaf 'k'"):
        Saliency().masks(params, grads={"b": jnp.zeros(2)})
    sc = Saliency().scores(params, grads={"k": jnp.asarray(G), "b": jnp.zeros(2)})
    assert sc["b"] is None
    np.testing.assert_allclose(sc["k"], np.abs(W * G), rtol=1e-6)
    assert [p for p, _ in leaves_with_paths(sc)] == ["k"]
