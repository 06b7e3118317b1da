"""SparseGPT inside GPTQ (``sparsity=`` / ``n_m=``): each block's pruned weights are those
with the smallest OBS score ``w² / [H⁻¹]ᵢᵢ`` (checked against a float64 NumPy selection),
patterns hold exactly, and the result beats magnitude pruning followed by GPTQ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.quant.gptq_core import gptq_quantize

K, N, ROWS = 32, 16, 256
W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    # inputs of very different sizes and correlated: OBS and magnitude disagree
    x = rng.normal(size=(ROWS, K)) @ rng.normal(size=(K, K)) * np.exp(rng.normal(size=K))
    w = rng.normal(size=(K, N))
    return x.astype(np.float32), w.astype(np.float32)


def _obs_scores(x, w, damp=0.01):
    """float64 SparseGPT scores of one block holding every row: w² / U_ii² with U the upper
    Cholesky factor of (H + λI)⁻¹."""
    h = x.astype(np.float64).T @ x
    h += damp * np.mean(np.diag(h)) * np.eye(K)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    return w.astype(np.float64) ** 2 / np.diag(u)[:, None] ** 2


def test_unstructured_selection_is_the_obs_score_of_the_block(problem):
    x, w = problem
    q = gptq_quantize(w, x.T @ x, W8, block_size=K, sparsity=0.5)
    zeros = np.asarray(q.dequantize()) == 0
    scores = _obs_scores(x, w)
    pruned = scores <= np.sort(scores.ravel())[K * N // 2 - 1]  # the smallest half
    assert pruned.sum() == K * N // 2
    assert np.all(zeros[pruned])  # every chosen weight is exactly 0
    assert zeros.sum() - pruned.sum() < 0.02 * K * N  # the rest: only codes rounding to 0
    by_magnitude = np.abs(w) <= np.sort(np.abs(w).ravel())[K * N // 2 - 1]
    assert not np.array_equal(pruned, by_magnitude)  # the score is not the magnitude


def test_n_m_pattern_holds_and_follows_the_scores(problem):
    x, w = problem
    q = gptq_quantize(w, x.T @ x, W8, block_size=K, n_m=(2, 4))
    zeros = (np.asarray(q.dequantize()) == 0).reshape(K // 4, 4, N)
    assert np.all(zeros.sum(axis=1) >= 2)
    scores = _obs_scores(x, w).reshape(K // 4, 4, N)
    smallest = np.argsort(scores, axis=1)[:, :2]  # per group of 4 rows and column
    assert np.all(np.take_along_axis(zeros, smallest, axis=1))


def test_joint_pruning_beats_magnitude_masks_then_gptq(problem):
    x, w = problem
    h = x.T @ x
    err = lambda wq: float(np.linalg.norm(x @ (np.asarray(wq, np.float64) - w)) / np.linalg.norm(x @ w))
    joint = gptq_quantize(w, h, W8, block_size=8, sparsity=0.5).dequantize()
    mask = np.abs(w) > np.median(np.abs(w))
    magnitude = gptq_quantize(w, h, W8, block_size=8, masks=jnp.asarray(mask)).dequantize()
    assert err(joint) < 0.8 * err(magnitude)
    assert float(np.mean(np.asarray(joint) == 0)) >= 0.5


def test_gptq_prunes_a_model_and_serves_it():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(32)(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (64, 16))
    variables = model.init(jax.random.key(1), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8)])
    qp = qjax.gptq(model.apply, variables, [(x,)], policy, n_m=(2, 4), block_size=8)
    for layer in ("Dense_0", "Dense_1"):
        k = np.asarray(qp["params"][layer]["kernel"].dequantize())
        assert np.all((k.reshape(-1, 4, k.shape[1]) == 0).sum(axis=1) >= 2)
    y = qjax.quantized(model.apply, policy)(qp, x)
    assert y.shape == (64, 8) and bool(jnp.all(jnp.isfinite(y)))


def test_bad_pruning_options_are_refused(problem):
    x, w = problem
    h = x.T @ x
    with pytest.raises(ValueError, match="not both"):
        gptq_quantize(w, h, W8, sparsity=0.5, n_m=(2, 4))
    with pytest.raises(ValueError, match="act_order=False"):
        gptq_quantize(w, h, W8, n_m=(2, 4), act_order=True)
    with pytest.raises(ValueError, match="must divide"):
        gptq_quantize(w, h, W8, n_m=(2, 5))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        qjax.gptq(
            lambda p, x: x @ p["w"], {"w": w}, [(x,)], qjax.Policy([qjax.Rule("w", weight=W8)]), sparsity=1.0
        )
