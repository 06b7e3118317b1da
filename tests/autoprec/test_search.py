"""The search pipeline: policy round-trip into quantize_params / quantized /
fake_quantized, budgets, pins, ties, hardware filtering, the accuracy-driven objective
with its greedy refinement, reports and errors."""

import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import autoprec

CANDS = autoprec.weight_candidates((2, 4, 8), calibration=qjax.calib.absmax())
W8A8 = autoprec.Candidate(
    "w8a8",
    weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
    act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def setup():
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 16))
    v = MLP().init(kp, x[:1])
    y = jnp.argmax(MLP().apply(v, x), -1)  # labels the float model gets right

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(MLP().apply(p, x), y).mean()

    def agreement(policy):
        return float(jnp.mean(jnp.argmax(qjax.fake_quantized(MLP().apply, policy)(v, x), -1) == y))

    return v, x, y, loss, agreement


@pytest.fixture(scope="module")
def budgeted(setup):
    v, x, y, loss, _ = setup
    float_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(v["params"]) if leaf.ndim == 2)
    res = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        loss_fn=loss,
        batches=[(x, y)],
        candidates=CANDS,
        budgets={"bytes": float_bytes / 6},
        num_probes=32,
        points=6,
    )
    return res, float_bytes


def test_policy_round_trips_into_quantize_params(setup, budgeted):
    v, x, *_ = setup
    res, float_bytes = budgeted
    assert res.costs["bytes"] <= float_bytes / 6
    assert set(res.choice) == {f"params/Dense_{i}/kernel" for i in range(3)}
    q = qjax.quantize_params(v, res.policy)
    leaves = dict(qjax.rules.leaves_with_paths(q))
    nbytes = 0
    for path, name in res.choice.items():
        leaf = leaves[path]
        if name == "float":
            assert not isinstance(leaf, qjax.QArray)
            nbytes += leaf.size * 4
        else:
            assert isinstance(leaf, qjax.QArray) and leaf.format.name == name
            nbytes += leaf.nbytes
    assert nbytes == res.costs["bytes"]
    assert not isinstance(leaves["params/Dense_0/bias"], qjax.QArray)
    y_int = qjax.quantized(MLP().apply, res.policy)(q, x)
    y_fake = qjax.fake_quantized(MLP().apply, res.policy)(v, x)
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_fake), rtol=1e-4, atol=1e-4)
    assert qjax.Policy.from_json(res.policy.to_json()) == res.policy
    assert res.policy.rules[0].pattern == re.escape("params/Dense_0/kernel")


def test_result_consistent_with_problem_and_frontier(budgeted):
    res, _ = budgeted
    prob = res.problem
    pred, tot = prob.totals(res.choice)
    assert pred == pytest.approx(res.predicted) and tot == res.costs
    assert res.predicted >= 0 and res.objective == "loss" and res.met
    front = res.pareto
    assert [p.costs["bytes"] for p in front] == sorted(p.costs["bytes"] for p in front)
    assert all(a.predicted > b.predicted for a, b in itertools.pairwise(front))
    # the chosen point is optimal under the budget: no frontier point within it predicts less
    assert all(p.predicted >= res.predicted - 1e-12 for p in front if p.costs["bytes"] <= res.costs["bytes"])
    text = res.report()
    assert "params/Dense_1/kernel" in text and "Pareto frontier" in text and "pred. Δloss" in text
    assert prob.layers[0].macs == 16 * 32  # per example


def test_pins_ties_and_sensitivity_mapping(setup, budgeted):
    v, x, y, loss, _ = setup
    _res, float_bytes = budgeted
    tr = autoprec.hutchinson_trace(loss, v, jax.random.key(1), 16, batches=[(x, y)], paths=r".*/kernel")
    out = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        sensitivity=tr,
        candidates=CANDS,
        budgets={"bytes": float_bytes / 5},
        pin_first_last="int8",
        points=4,
    )
    assert out.choice["params/Dense_0/kernel"] == "int8" == out.choice["params/Dense_2/kernel"]
    tied = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        sensitivity=tr,
        candidates=CANDS,
        budgets={"bytes": float_bytes / 5},
        ties=[r"params/Dense_[01]/kernel"],
        pins={"params/Dense_2/kernel": "float"},
        points=4,
    )
    assert tied.choice["params/Dense_0/kernel"] == tied.choice["params/Dense_1/kernel"]
    assert tied.choice["params/Dense_2/kernel"] == "float"
    with pytest.raises(ValueError, match="no sensitivity for layers"):
        autoprec.search(
            MLP().apply, v, (x[:1],), sensitivity={"params/Dense_0/kernel": 1.0}, budgets={"bytes": 1e9}
        )
    with pytest.raises(autoprec.InfeasibleError, match="bytes <= 10"):
        autoprec.search(MLP().apply, v, (x[:1],), sensitivity=tr, candidates=CANDS, budgets={"bytes": 10})


def test_hardware_filters_candidates(setup):
    v, x, *_ = setup
    sens = {f"params/Dense_{i}/kernel": 1.0 for i in range(3)}
    cands = (*CANDS, W8A8)
    prob = autoprec.build_problem(MLP().apply, v, (x[:1],), cands, sens, hardware=autoprec.lookup("cpu"))
    j = prob.candidate_index("w8a8")
    assert np.isinf(prob.objective[:, j]).all()
    assert "cpu does not run int8 natively" in prob.notes[("params/Dense_0/kernel", "w8a8")]
    res = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        sensitivity=sens,
        candidates=cands,
        hardware="tpu-v5e",
        budgets={"time": 1e9},
    )
    assert "time" in res.costs and res.hardware.name == "tpu-v5e"
    assert np.isfinite(res.problem.objective[:, j]).all()
    # under a compute-time budget of half the float time only int8 compute fits
    float_time = sum(layer.macs for layer in res.problem.layers)
    fast = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        sensitivity=sens,
        candidates=cands,
        hardware="tpu-v5e",
        budgets={"time": float_time / 2},
    )
    assert set(fast.choice.values()) == {"w8a8"}


def test_accuracy_driven_with_greedy_refinement(setup):
    v, x, *_ = setup
    paths = [f"params/Dense_{i}/kernel" for i in range(3)]
    rng = np.random.default_rng(0)
    # a synthetic "direct" sensitivity; the metric is exactly 1 - the predicted loss
    direct = {
        p: {
            "int2": float(rng.uniform(0.2, 1)),
            "int4": float(rng.uniform(0.02, 0.1)),
            "int8": 0.001,
            "float": 0.0,
        }
        for p in paths
    }
    names = {2: "int2", 4: "int4", 8: "int8"}

    def metric(policy):
        drop = 0.0
        for p in paths:
            spec = policy.weight_spec(p)
            drop += direct[p]["float" if spec is None else names[spec.bits]]
        return 1.0 - drop

    sources = set()
    for max_drop in (0.05, 0.15, 0.5, 2.0):
        res = autoprec.search(
            MLP().apply,
            v,
            (x[:1],),
            sensitivity=direct,
            candidates=CANDS,
            eval_fn=metric,
            max_drop=max_drop,
            points=5,
        )
        assert res.objective == "accuracy" and res.met and res.baseline == 1.0
        assert res.baseline - res.measured <= max_drop + 1e-12
        assert res.measured == pytest.approx(1.0 - res.predicted)
        # nothing measured that passes is cheaper; no frontier point that passes is cheaper
        for e in res.evaluations:
            if 1.0 - e.metric <= max_drop:
                assert e.cost >= res.costs["bytes"]
        for p in res.pareto:
            if p.predicted <= max_drop:
                assert p.costs["bytes"] >= res.costs["bytes"]
        sources |= {e.source for e in res.evaluations}
    assert sources == {"pareto", "greedy"}  # the coarse frontier (5 points) needed the greedy refinement


def test_accuracy_driven_real_eval_and_errors(setup):
    v, x, y, loss, agreement = setup
    res = autoprec.search(
        MLP().apply,
        v,
        (x[:1],),
        loss_fn=loss,
        batches=[(x, y)],
        candidates=CANDS,
        sensitivity="fisher",
        eval_fn=agreement,
        max_drop=0.02,
        points=5,
        evaluate_pareto=True,
    )
    assert res.baseline == 1.0 and res.baseline - res.measured <= 0.02
    assert all(p.measured is not None for p in res.pareto)
    assert agreement(res.policy) == res.measured
    with pytest.raises(ValueError, match=r"budgets= .* or max_drop="):
        autoprec.search(MLP().apply, v, (x[:1],), loss_fn=loss, batches=[(x, y)])
    with pytest.raises(ValueError, match="needs eval_fn"):
        autoprec.search(MLP().apply, v, (x[:1],), loss_fn=loss, batches=[(x, y)], max_drop=0.1)
    sens = {f"params/Dense_{i}/kernel": 1.0 for i in range(3)}
    with pytest.raises(ValueError, match="cost 'latency' is not available"):
        autoprec.search(
            MLP().apply, v, (x[:1],), sensitivity=sens, candidates=CANDS, budgets={"latency": 1.0}
        )
    with pytest.raises(ValueError, match="'int3' is not a candidate"):
        autoprec.search(
            MLP().apply,
            v,
            (x[:1],),
            sensitivity=sens,
            candidates=CANDS,
            budgets={"bytes": 1e9},
            pin_first_last="int3",
        )
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        autoprec.search(MLP().apply, v, (x[:1],), sensitivity="magic", loss_fn=loss, budgets={"bytes": 1e9})


def test_nan_sensitivity_and_bad_budgets_are_named_errors(setup):
    v, x, *_ = setup
    sens = {f"params/Dense_{i}/kernel": 1.0 for i in range(3)}
    # a NaN trace silently forbade every quantized candidate of the layer
    nan = {**sens, "params/Dense_1/kernel": autoprec.TraceEstimate(float("nan"), 0.0, 1, 1)}
    with pytest.raises(ValueError, match=r"layer 'params/Dense_1/kernel' for candidate 'int2' is nan"):
        autoprec.build_problem(MLP().apply, v, (x[:1],), CANDS, nan, paths="params/Dense_1/kernel")
    direct = {p: {"int2": 1.0, "int4": 0.5, "int8": float("inf"), "float": 0.0} for p in sens}
    with pytest.raises(ValueError, match=r"layer 'params/Dense_0/kernel' for candidate 'int8' is inf"):
        autoprec.build_problem(MLP().apply, v, (x[:1],), CANDS, direct, paths="params/Dense_0/kernel")
    with pytest.raises(ValueError, match="budget 'bytes' must be a finite number, got None"):
        autoprec.search(MLP().apply, v, (x[:1],), sensitivity=sens, candidates=CANDS, budgets={"bytes": None})


def test_negative_trace_warns_naming_the_layer(setup):
    v, x, *_ = setup
    sens = {f"params/Dense_{i}/kernel": 1.0 for i in range(3)}
    sens["params/Dense_2/kernel"] = -1.0  # an indefinite Hessian away from a minimum
    with pytest.warns(RuntimeWarning, match=r"\['params/Dense_2/kernel'\] are negative"):
        prob = autoprec.build_problem(MLP().apply, v, (x[:1],), CANDS, sens)
    # the documented consequence: the coarsest format is predicted best for that layer
    row = prob.objective[prob.layer_index("params/Dense_2/kernel")]
    assert np.argmin(row) == prob.candidate_index("int2")
