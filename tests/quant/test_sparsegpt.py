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


def test_n_m_pattern_holds_follows_the_scores_and_ignores_the_block_size(problem):
    x, w = problem
    h = x.T @ x
    q = gptq_quantize(w, h, W8, block_size=K, n_m=(2, 4))
    zeros = (np.asarray(q.dequantize()) == 0).reshape(K // 4, 4, N)
    assert np.all(zeros.sum(axis=1) >= 2)
    # the first group of 4 rows is chosen when row 0 comes up: from the initial weights
    first = np.argsort(_obs_scores(x, w)[:4], axis=0)[:2]
    assert np.all(np.take_along_axis(zeros[0], first, axis=0))
    # each group is chosen from the rows as the earlier rows left them, as in SparseGPT: the
    # lazy-batch block size changes nothing but float rounding
    small = gptq_quantize(w, h, W8, block_size=4, n_m=(2, 4))
    np.testing.assert_array_equal(np.asarray(small.dequantize()) == 0, zeros.reshape(K, N))
    np.testing.assert_allclose(small.dequantize(), q.dequantize(), rtol=1e-4, atol=1e-4)


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
    for bad in ((2.7, 4), (4, 4), (2,)):
        with pytest.raises(ValueError, match="pair of ints 0 < n < m"):
            gptq_quantize(w, h, W8, n_m=bad)
    with pytest.raises(ValueError, match="must be a number"):
        gptq_quantize(w, h, W8, sparsity="0.5")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        qjax.gptq(
            lambda p, x: x @ p["w"], {"w": w}, [(x,)], qjax.Policy([qjax.Rule("w", weight=W8)]), sparsity=1.0
        )


def test_n_m_on_a_layer_it_does_not_fit_rounds_that_layer_with_a_warning():
    # a 3-input first layer cannot take 2:4 along its inputs: that leaf alone is rounded to
    # nearest (with a warning naming it), the others are pruned
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(2), (32, 3))
    variables = model.init(jax.random.key(3), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=W8)])
    with pytest.warns(UserWarning, match="layers_0/kernel.*m=4 must divide"):
        qp = qjax.gptq(model.apply, variables, [(x,)], policy, n_m=(2, 4), block_size=8)
    k = np.asarray(qp["params"]["layers_2"]["kernel"].dequantize())
    assert np.all((k.reshape(-1, 4, k.shape[1]) == 0).sum(axis=1) >= 2)


def test_expert_inputs_never_seen_are_scored_on_the_live_scale():
    # an expert that never saw inputs 0-3 keeps their weights (they are live in serving);
    # which of them SparseGPT prunes must not depend on the calibration data's scale
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 32, 16)).astype(np.float32)
    x[0, :, :4] = 0
    params = {"w": jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)}
    f = lambda p, x: jnp.einsum("ecd,edf->ecf", x, p["w"])
    policy = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)))])
    pruned = [
        np.asarray(qjax.gptq(f, params, [(c * x,)], policy, sparsity=0.5)["w"].dequantize()[0, :4]) == 0
        for c in (0.01, 1.0, 100.0)
    ]
    np.testing.assert_array_equal(pruned[0], pruned[1])
    np.testing.assert_array_equal(pruned[1], pruned[2])


# -- pruning without quantization (qjax.prune.sparsegpt) ----------------------------------


def _reference_sparsegpt(x, w, sparsity=None, n_m=None, block=8, damp=0.01):
    """Float64 SparseGPT in the (inputs, outputs) layout, written from the paper's algorithm:
    per block of rows (per group of m rows for n:m), the mask from w² / U_ii² of the current
    rows, then row by row: fix the pruned weights at 0 and move the error onto later rows."""
    w = w.astype(np.float64).copy()
    k, n = w.shape
    h = x.astype(np.float64).T @ x
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        keep = np.ones((b1 - b0, n), bool)
        if sparsity is not None:
            score = w[b0:b1] ** 2 / np.diag(u)[b0:b1, None] ** 2
            count = int(np.floor(sparsity * score.size))
            keep.ravel()[np.argsort(score.ravel(), kind="stable")[:count]] = False
        for i in range(b0, b1):
            if n_m is not None and (i - b0) % n_m[1] == 0:
                rows = slice(i, i + n_m[1])
                score = w[rows] ** 2 / np.diag(u)[rows, None] ** 2
                smallest = np.argsort(score, axis=0, kind="stable")[: n_m[0]]
                np.put_along_axis(keep[i - b0 : i - b0 + n_m[1]], smallest, False, axis=0)
            q = np.where(keep[i - b0], w[i], 0.0)
            err = (w[i] - q) / u[i, i]
            w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
            out[i] = q
    return out


@pytest.mark.parametrize("mode", [dict(sparsity=0.5), dict(sparsity=0.3), dict(n_m=(2, 4))])
def test_float_pruning_equals_a_float64_sparsegpt(problem, mode):
    x, w = problem
    params = {"w": jnp.asarray(w)}
    f = lambda p, x: x @ p["w"]
    pruned, masks = qjax.prune.sparsegpt(f, params, [(jnp.asarray(x),)], patterns="w", block_size=8, **mode)
    want = _reference_sparsegpt(x, w, block=8, **mode)
    np.testing.assert_array_equal(np.asarray(masks["w"]), want != 0)
    np.testing.assert_allclose(
        np.asarray(pruned["w"], np.float64), want, rtol=2e-3, atol=2e-3 * np.abs(want).max()
    )
    error = lambda v: np.linalg.norm(x @ (v - w)) / np.linalg.norm(x @ w)
    magnitude = np.where(np.abs(w) > np.median(np.abs(w)), w, 0)
    if mode.get("sparsity") == 0.5:
        assert error(np.asarray(pruned["w"], np.float64)) < 0.8 * error(magnitude)


def test_float_pruning_of_a_model_stack_and_transposed_reads():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(32)(x))
            w = self.param("head", nn.initializers.normal(1.0), (4, 32))  # PyTorch (out, in)
            return h @ w.T

    net = Net()
    x = jax.random.normal(jax.random.key(5), (64, 16))
    variables = net.init(jax.random.key(6), x)
    pruned, masks = qjax.prune.sparsegpt(
        net.apply, variables, [(x,)], 0.5, patterns=[".*kernel", ".*head"], block_size=8
    )
    assert masks["params"]["Dense_0"]["bias"] is None
    for path, axis in (("Dense_0/kernel", 0), ("head", 1)):
        leaf = pruned["params"]
        for part in path.split("/"):
            leaf = leaf[part]
        # every block of 8 input rows loses half its entries (the head's inputs run along axis 1)
        zeros = np.asarray(leaf) == 0
        blocks = np.moveaxis(zeros, axis, 0).reshape(-1, 8, zeros.shape[1 - axis])
        assert np.all(blocks.sum(axis=(1, 2)) == 8 * zeros.shape[1 - axis] // 2)
    y = net.apply(pruned, x)
    assert bool(jnp.all(jnp.isfinite(y)))
    with pytest.raises(ValueError, match=r"give sparsity= .* or n_m="):
        qjax.prune.sparsegpt(net.apply, variables, [(x,)])
    with pytest.raises(ValueError, match="matched no"):
        qjax.prune.sparsegpt(net.apply, variables, [(x,)], 0.5, patterns="nothing")


def test_float_pruning_of_a_kernel_contracting_non_adjacent_axes(problem):
    # w (H, D, hd) read as "nhk,hdk->nd": the contracted axes 0 and 2 are brought together
    # (in leaf order) for pruning, and put back
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(64, 2, 8)) * np.linspace(0.2, 6, 8)).astype(np.float32)
    w = rng.normal(size=(2, 4, 8)).astype(np.float32)
    f = lambda p, x: jnp.einsum("nhk,hdk->nd", x, p["w"])
    pruned, _ = qjax.prune.sparsegpt(
        f, {"w": jnp.asarray(w)}, [(jnp.asarray(x),)], 0.5, patterns="w", block_size=8
    )
    flat_w = np.transpose(w, (0, 2, 1)).reshape(16, 4)  # inputs (h, k) in leaf order
    want = _reference_sparsegpt(x.reshape(64, 16), flat_w, sparsity=0.5, block=8)
    got = np.transpose(np.asarray(pruned["w"]), (0, 2, 1)).reshape(16, 4)
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_weight_read_with_different_contractions_is_refused():
    # x @ w and y @ w.T: their Gram matrices are over different inputs and cannot be added
    w = jnp.asarray(np.random.default_rng(8).normal(size=(8, 8)), jnp.float32)
    f = lambda p, x: x @ p["w"] + x @ p["w"].T
    with pytest.raises(ValueError, match="read with different contracted axes"):
        qjax.prune.sparsegpt(f, {"w": w}, [(jnp.ones((4, 8)),)], 0.5, patterns="w")
