"""Sensitivity estimators against exact references: Hutchinson vs the trace of
``jax.hessian`` blocks (and exactly for a diagonal quadratic), power iteration vs
``numpy.linalg.eigvalsh``, empirical Fisher vs an explicit per-example loop, direct
measurement vs fake_quant_params, and Ω."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import autoprec

CANDS = autoprec.weight_candidates((2, 4, 8))


def _mlp_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w1": jax.random.normal(k1, (4, 5)) * 0.7,
        "b1": jax.random.normal(k2, (5,)) * 0.1,
        "w2": jax.random.normal(k3, (5, 3)) * 0.7,
    }


def _loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


@pytest.fixture(scope="module")
def data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (16, 4)), jax.random.randint(ky, (16,), 0, 3)


def _exact_block_traces(params, x, y):
    h = jax.jit(jax.hessian(_loss))(params, x, y)
    out = {}
    for k, v in params.items():
        n = v.size
        out[k] = float(jnp.trace(h[k][k].reshape(n, n)))
    return out, h


def test_hutchinson_exact_for_diagonal_quadratic():
    d = {"a": jnp.arange(1.0, 13.0).reshape(3, 4), "b": jnp.array([0.5, -2.0, 3.0])}
    params = {"a": jnp.ones((3, 4)), "b": jnp.zeros(3)}
    loss = lambda p: 0.5 * sum(jnp.sum(d[k] * p[k] ** 2) for k in p)
    tr = autoprec.hutchinson_trace(loss, params, jax.random.key(0), 5, chunk=2)  # uneven chunks
    assert tr["a"].trace == pytest.approx(78.0, rel=1e-6) and tr["a"].stderr == pytest.approx(0.0, abs=1e-5)
    assert tr["b"].trace == pytest.approx(1.5, rel=1e-6)
    assert tr["a"].size == 12 and tr["a"].mean == pytest.approx(78.0 / 12) and tr["a"].samples == 5


def test_hutchinson_matches_jax_hessian_trace(data):
    x, y = data
    params = _mlp_params()
    exact, _ = _exact_block_traces(params, x, y)
    # streaming over two equal batches = the Hessian of the mean loss
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    tr = autoprec.hutchinson_trace(_loss, params, jax.random.key(3), 3000, batches=batches, chunk=1000)
    for k, want in exact.items():
        est = tr[k]
        assert abs(est.trace - want) <= 4 * est.stderr + 1e-4, (k, est, want)
        assert est.stderr < 0.1 * abs(want) + 1e-3
    # the estimate is unbiased but noisy: few probes differ from the exact value
    few = autoprec.hutchinson_trace(_loss, params, jax.random.key(3), 2, batches=batches)
    assert any(abs(few[k].trace - exact[k]) > 1e-3 for k in exact)


def test_hutchinson_paths_select_and_errors(data):
    x, y = data
    params = _mlp_params()
    tr = autoprec.hutchinson_trace(_loss, params, jax.random.key(0), 4, batches=[(x, y)], paths=r"w.")
    assert set(tr) == {"w1", "w2"}
    with pytest.raises(ValueError, match="nope"):
        autoprec.hutchinson_trace(_loss, params, jax.random.key(0), 4, batches=[(x, y)], paths=["w1", "nope"])
    with pytest.raises(ValueError, match="num_probes"):
        autoprec.hutchinson_trace(_loss, params, jax.random.key(0), 0, batches=[(x, y)])
    q = {**params, "w1": qjax.quantize(params["w1"], qjax.QuantSpec(qjax.int8))}
    with pytest.raises(TypeError, match="'w1' is quantized"):
        autoprec.hutchinson_trace(_loss, q, jax.random.key(0), 4, batches=[(x, y)])


def test_top_eigenvalue_matches_eigvalsh(data):
    x, y = data
    params = _mlp_params()
    _, h = _exact_block_traces(params, x, y)
    lam = autoprec.top_eigenvalue(
        _loss, params, jax.random.key(0), iters=3000, tol=1e-10, batches=[(x, y)], paths=["w1", "w2"]
    )
    for k in ("w1", "w2"):
        n = params[k].size
        ev = np.linalg.eigvalsh(np.asarray(h[k][k]).reshape(n, n).astype(np.float64))
        order = np.argsort(-np.abs(ev))
        assert abs(ev[order[0]]) > 1.05 * abs(ev[order[1]]), "test needs an eigen-gap"
        assert lam[k].value == pytest.approx(ev[order[0]], rel=2e-3), (k, lam[k], ev[order[:2]])
        assert lam[k].converged


def test_fisher_matches_per_example_loop(data):
    x, y = data
    params = _mlp_params()
    batches = [(x[:11], y[:11]), (x[11:], y[11:])]  # unequal batches: per-example weighting
    diag = autoprec.fisher_diagonal(_loss, params, batches)
    tr = autoprec.fisher_trace(_loss, params, batches)
    grad = jax.jit(jax.grad(_loss))
    grads = [grad(params, x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]
    for k in params:
        want = np.mean([np.asarray(g[k]) ** 2 for g in grads], axis=0)
        np.testing.assert_allclose(np.asarray(diag[k]), want, rtol=1e-5, atol=1e-8)
        norms = np.array([float(jnp.sum(g[k] ** 2)) for g in grads])
        assert tr[k].trace == pytest.approx(norms.mean(), rel=1e-5)
        assert tr[k].stderr == pytest.approx(norms.std(ddof=1) / math.sqrt(len(norms)), rel=1e-4)
        assert tr[k].samples == x.shape[0]
    with pytest.raises(ValueError, match="leading example axis"):
        autoprec.fisher_trace(_loss, params, [(x, y[:3])])


def test_fisher_warns_when_every_gradient_is_zero(data):
    x, _ = data
    params = _mlp_params()

    def self_distill(p, xb):  # zero at p == params: every per-example gradient vanishes
        return jnp.sum(
            (
                _loss(p, xb, jnp.zeros(xb.shape[0], jnp.int32))
                - _loss(params, xb, jnp.zeros(xb.shape[0], jnp.int32))
            )
            ** 2
        )

    with pytest.warns(RuntimeWarning, match="empirical Fisher carries no sensitivity information"):
        tr = autoprec.fisher_trace(self_distill, params, [(x,)])
    assert all(t.trace == 0.0 for t in tr.values())


def test_direct_sensitivity_is_single_layer_loss_change(data):
    x, y = data
    params = _mlp_params()
    d = autoprec.direct_sensitivity(_loss, params, CANDS, batches=[(x, y)], paths=["w1", "w2"])
    base = float(_loss(params, x, y))
    for path in ("w1", "w2"):
        assert d[path]["float"] == 0.0
        for c in CANDS[:-1]:
            pol = qjax.Policy([qjax.Rule(re.escape(path), weight=c.weight)])
            want = float(_loss(qjax.fake_quant_params(params, pol), x, y)) - base
            assert d[path][c.name] == pytest.approx(want, abs=1e-6)
    assert abs(d["w1"]["int2"]) > abs(d["w1"]["int8"])


def test_perturbation_omega(data):
    params = _mlp_params()
    est = autoprec.TraceEstimate(trace=2.0, stderr=0.0, size=20, samples=1)
    diag = jnp.full((5, 3), 0.25)
    omega = autoprec.perturbation(params, {"w1": est, "w2": diag, "b1": 3.0}, CANDS)
    for c in CANDS[:-1]:
        d1 = qjax.fake_quant(params["w1"], c.weight) - params["w1"]
        assert omega["w1"][c.name] == pytest.approx(2.0 / 20 * float(jnp.sum(d1**2)), rel=1e-5)
        d2 = qjax.fake_quant(params["w2"], c.weight) - params["w2"]
        assert omega["w2"][c.name] == pytest.approx(0.25 * float(jnp.sum(d2**2)), rel=1e-5)
    assert omega["w1"]["float"] == 0.0
    assert omega["w1"]["int2"] > omega["w1"]["int4"] > omega["w1"]["int8"] > 0
    lam = autoprec.EigenEstimate(value=3.0, iterations=1, converged=True)
    d1 = qjax.fake_quant(params["w1"], CANDS[0].weight) - params["w1"]
    assert autoprec.perturbation(params, {"w1": lam}, CANDS)["w1"]["int2"] == pytest.approx(
        3.0 * float(jnp.sum(d1**2)), rel=1e-5
    )
    with pytest.raises(ValueError, match="'nope'"):
        autoprec.perturbation(params, {"nope": est}, CANDS)
    with pytest.raises(ValueError, match="'w2' has shape"):
        autoprec.perturbation(params, {"w2": jnp.ones((3, 5))}, CANDS)
    with pytest.raises(TypeError, match="'w1'"):
        autoprec.perturbation(params, {"w1": "big"}, CANDS)


def _nan_batches(data):
    x, y = data
    yf = y.astype(jnp.float32)
    loss = lambda p, x, y: jnp.mean(((jnp.tanh(x @ p["w1"]) @ p["w2"]).sum(1) - y) ** 2)
    return loss, [(x, yf), (x, yf.at[0].set(jnp.nan))]  # one NaN label in batch 1


def test_non_finite_trace_is_an_error_naming_the_batch_and_leaves(data):
    # one NaN label in one batch made every trace NaN; search then silently kept the
    # layers float (or blamed the budget)
    loss, bad = _nan_batches(data)
    p = _mlp_params()
    with pytest.raises(ValueError, match=r"hutchinson_trace: batch 1 gives a NaN or inf for leaves \['w1'"):
        autoprec.hutchinson_trace(loss, p, jax.random.key(0), 4, batches=bad, paths=["w1", "w2"])
    msg = r"direct_sensitivity: the float loss is NaN or inf on batches \[1\]"
    with pytest.raises(ValueError, match=msg):
        autoprec.direct_sensitivity(loss, p, CANDS, batches=bad, paths=["w1"])


def test_non_finite_fisher_and_eigenvalue_are_errors(data):
    loss, bad = _nan_batches(data)
    p = _mlp_params()
    with pytest.raises(ValueError, match=r"fisher_trace: batch 1 .*'w1'"):
        autoprec.fisher_trace(loss, p, bad, paths=["w1", "w2"])
    with pytest.raises(ValueError, match=r"top_eigenvalue: .*\['w1'\]"):
        autoprec.top_eigenvalue(loss, p, jax.random.key(0), iters=2, batches=bad, paths=["w1"])
