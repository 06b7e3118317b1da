"""The multiple-choice knapsack MILP against brute force on random small instances,
with ties, pins, forbidden pairs and several budget rows; infeasibility; Pareto sweeps."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax import autoprec


def brute_force(obj, costs, budgets, ties=(), pins=None, allowed=None):
    """(best objective, a best choice) by enumeration, or None if infeasible."""
    n_l, n_f = obj.shape
    best = None
    for choice in itertools.product(range(n_f), repeat=n_l):
        if allowed is not None and not all(allowed[i, c] for i, c in enumerate(choice)):
            continue
        if any(choice[i] != f for i, f in (pins or {}).items()):
            continue
        if any(len({choice[i] for i in g}) > 1 for g in ties):
            continue
        rows = np.arange(n_l)
        if any(costs[k][rows, choice].sum() > b for k, b in budgets.items()):
            continue
        o = obj[rows, choice].sum()
        if best is None or o < best[0]:
            best = (o, choice)
    return best


@st.composite
def instances(draw):
    n_l = draw(st.integers(1, 4))
    n_f = draw(st.integers(1, 3))
    ints = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=n_l * n_f, max_size=n_l * n_f)
    obj = np.array(draw(ints(-5, 20)), float).reshape(n_l, n_f)
    n_rows = draw(st.integers(1, 2))
    costs = {f"c{k}": np.array(draw(ints(0, 10)), float).reshape(n_l, n_f) for k in range(n_rows)}
    budgets = {k: float(draw(st.integers(0, 10 * n_l))) for k in costs}
    allowed = np.array(draw(st.lists(st.booleans(), min_size=n_l * n_f, max_size=n_l * n_f))).reshape(
        n_l, n_f
    )
    allowed[:, 0] = True  # keep every layer with some option
    ties = []
    if n_l >= 2 and draw(st.booleans()):
        ties = [tuple(sorted(draw(st.sets(st.integers(0, n_l - 1), min_size=2, max_size=n_l))))]
    pins = {}
    if draw(st.booleans()):
        pins = {draw(st.integers(0, n_l - 1)): 0}
    return obj, costs, budgets, allowed, ties, pins


@settings(max_examples=examples(60))
@given(instances())
def test_milp_equals_brute_force(inst):
    obj, costs, budgets, allowed, ties, pins = inst
    want = brute_force(obj, costs, budgets, ties, pins, allowed)
    if want is None:
        with pytest.raises(autoprec.InfeasibleError):
            autoprec.solve(obj, costs, budgets, ties=ties, pins=pins, allowed=allowed)
        return
    sol = autoprec.solve(obj, costs, budgets, ties=ties, pins=pins, allowed=allowed)
    assert sol.objective == pytest.approx(want[0], abs=1e-9)
    ch = sol.choice
    assert all(allowed[i, c] for i, c in enumerate(ch))
    assert all(ch[i] == f for i, f in pins.items())
    assert all(len({ch[i] for i in g}) == 1 for g in ties)
    for k, b in budgets.items():
        assert sol.costs[k] == costs[k][np.arange(len(ch)), ch].sum() <= b


def test_inf_entries_forbid_and_ties_pins_honoured():
    obj = np.array([[0.0, 5.0, 9.0], [0.0, 1.0, 3.0], [0.0, 7.0, 8.0], [0.0, 2.0, 6.0]])
    size = np.array([[4.0, 2.0, 1.0]] * 4)
    obj[1, 2] = np.inf  # layer 1 cannot take candidate 2
    sol = autoprec.solve(obj, {"size": size}, {"size": 8})
    assert sol.choice[1] != 2 and sol.costs["size"] <= 8
    tied = autoprec.solve(obj, {"size": size}, {"size": 9}, ties=[(0, 2)], pins={3: 0})
    assert tied.choice[0] == tied.choice[2] and tied.choice[3] == 0
    assert tied.objective == pytest.approx(brute_force(obj, {"size": size}, {"size": 9}, [(0, 2)], {3: 0})[0])
    with pytest.raises(autoprec.InfeasibleError, match="pinned"):
        autoprec.solve(obj, {"size": size}, {"size": 99}, pins={1: 2})


def test_infeasible_budget_message():
    obj = np.zeros((3, 2))
    size = np.array([[4.0, 2.0]] * 3)
    with pytest.raises(autoprec.InfeasibleError, match=r"size <= 5 \(the least achievable alone is 6\)"):
        autoprec.solve(obj, {"size": size}, {"size": 5})
    with pytest.raises(ValueError, match="budget 'bops' has no cost matrix"):
        autoprec.solve(obj, {"size": size}, {"bops": 5})
    with pytest.raises(ValueError, match=r"costs\['size'\] has shape \(2, 2\)"):
        autoprec.solve(obj, {"size": size[:2]}, {"size": 5})
    with pytest.raises(ValueError, match="ties"):
        autoprec.solve(obj, {"size": size}, {"size": 9}, ties=[(0, 7)])


@settings(max_examples=examples(15))
@given(instances())
def test_pareto_monotone_and_optimal(inst):
    obj, costs, _, allowed, ties, pins = inst
    front = autoprec.pareto(obj, costs, "c0", points=8, ties=ties, pins=pins, allowed=allowed)
    assert front
    c = [p.costs["c0"] for p in front]
    o = [p.objective for p in front]
    assert all(a < b for a, b in itertools.pairwise(c)) and all(a > b for a, b in itertools.pairwise(o))
    for p in front:  # every point is optimal at its own cost
        want = brute_force(obj, {"c0": costs["c0"]}, {"c0": p.costs["c0"]}, ties, pins, allowed)
        assert p.objective == pytest.approx(want[0], abs=1e-9)
    unconstrained = brute_force(obj, {}, {}, ties, pins, allowed)
    assert o[-1] == pytest.approx(unconstrained[0], abs=1e-9)
    cheapest = brute_force(costs["c0"], {}, {}, ties, pins, allowed)
    assert c[0] == pytest.approx(cheapest[0])


@settings(max_examples=examples(15))
@given(instances(), st.floats(0.0, 1.0))
def test_pareto_sweep_max_limits_the_range(inst, frac):
    obj, costs, _, allowed, ties, pins = inst
    full = autoprec.pareto(obj, costs, "c0", points=8, ties=ties, pins=pins, allowed=allowed)
    lo, hi = full[0].costs["c0"], full[-1].costs["c0"]
    cap = lo + frac * (hi - lo)
    front = autoprec.pareto(obj, costs, "c0", points=8, ties=ties, pins=pins, allowed=allowed, sweep_max=cap)
    assert front and all(p.costs["c0"] <= cap + 1e-9 for p in front)
    assert front[0].costs["c0"] == pytest.approx(lo)
    # the last point is the optimum under the cap
    want = brute_force(obj, {"c0": costs["c0"]}, {"c0": cap}, ties, pins, allowed)
    assert front[-1].objective == pytest.approx(want[0], abs=1e-9)


@settings(max_examples=examples(15))
@given(instances())
def test_exact_pareto_is_the_whole_frontier(inst):
    obj, costs, _, allowed, ties, pins = inst
    front = autoprec.pareto(obj, costs, "c0", points=1000, exact=True, ties=ties, pins=pins, allowed=allowed)
    # brute-force frontier: sort all feasible assignments by cost, keep strict improvements
    n_l, n_f = obj.shape
    feasible = []
    for choice in itertools.product(range(n_f), repeat=n_l):
        ok = all(allowed[i, c] for i, c in enumerate(choice)) and all(choice[i] == f for i, f in pins.items())
        if ok and all(len({choice[i] for i in g}) == 1 for g in ties):
            rows = np.arange(n_l)
            feasible.append((costs["c0"][rows, choice].sum(), obj[rows, choice].sum()))
    want, best = [], np.inf
    for c, o in sorted(feasible):
        if o < best - 1e-9:
            want.append((c, o))
            best = o
    assert [p.costs["c0"] for p in front] == [c for c, _ in want]
    assert [p.objective for p in front] == pytest.approx([o for _, o in want])


def test_pareto_errors():
    obj = np.zeros((2, 2))
    with pytest.raises(ValueError, match="sweep 'x' is not a cost"):
        autoprec.pareto(obj, {"c": obj}, "x")
    with pytest.raises(ValueError, match="swept"):
        autoprec.pareto(obj, {"c": obj}, "c", budgets={"c": 1})
    with pytest.raises(ValueError, match="sweep_max=-1 is below the least achievable c cost"):
        autoprec.pareto(obj, {"c": obj + 1}, "c", sweep_max=-1)


# -- budgets at HiGHS's tolerance (a budget just below an achievable cost) ------------

NEAR_OBJ = np.array([[0.96992541, 0.51606859, 0.11586561], [0.62348976, 0.77668311, 0.6130033]])
NEAR_COST = np.array([[8.0, 38.0, 45.0], [21.0, 2.0, 36.0]])


def _all_points(obj, cost):
    rows = np.arange(obj.shape[0])
    return [
        (float(cost[rows, ch].sum()), float(obj[rows, ch].sum()))
        for ch in itertools.product(range(obj.shape[1]), repeat=obj.shape[0])
    ]


def _brute_frontier(points):
    front = []
    for c, o in sorted(points):
        if not front or (o < front[-1][1] and c != front[-1][0]):
            front.append((c, o))
    return front


@pytest.mark.parametrize("eps", [1e-12, 1e-10, 1e-9, 1e-8, 1e-6, 1e-4])
def test_solve_never_returns_an_over_budget_choice(eps):
    # HiGHS accepted cost 81 for a budget of 81·(1-1e-9) (its row tolerance)
    b = 81 * (1 - eps)
    sol = autoprec.solve(NEAR_OBJ, {"c": NEAR_COST}, {"c": b})
    assert sol.costs["c"] <= b
    want = min(o for c, o in _all_points(NEAR_OBJ, NEAR_COST) if c <= b)
    assert sol.objective == pytest.approx(want, abs=1e-12)


def test_exact_pareto_with_float_costs_equals_brute_force():
    # the exact sweep stepped 1e-9 of the largest cost below each point, which HiGHS did
    # not resolve: it found 1 of the 6 points here; float costs at several scales
    got = autoprec.pareto(NEAR_OBJ, {"c": NEAR_COST}, "c", exact=True, points=100)
    want = _brute_frontier(_all_points(NEAR_OBJ, NEAR_COST))
    assert len(want) == 6
    np.testing.assert_allclose([(p.costs["c"], p.objective) for p in got], want, rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(25):
        n_l, n_f = rng.integers(1, 5), rng.integers(2, 4)
        obj = rng.random((n_l, n_f))
        scale = 10.0 ** rng.integers(-4, 7)
        cost = (rng.random((n_l, n_f)) if rng.random() < 0.5 else rng.integers(0, 50, (n_l, n_f))) * scale
        points = _all_points(obj, cost)
        want = _brute_frontier(points)
        got = autoprec.pareto(obj, {"c": cost}, "c", exact=True, points=1000)
        np.testing.assert_allclose([(p.costs["c"], p.objective) for p in got], want, rtol=1e-12)
        c, _ = want[rng.integers(len(want))]
        for b in (c, c * (1 - 1e-12), c * (1 - 1e-9)):  # at and just below an achievable cost
            feasible = [o for cc, o in points if cc <= b + 1e-13 * abs(b)]
            if not feasible:
                with pytest.raises(autoprec.InfeasibleError):
                    autoprec.solve(obj, {"c": cost}, {"c": b})
                continue
            sol = autoprec.solve(obj, {"c": cost}, {"c": b})
            assert sol.costs["c"] <= b + 1e-13 * abs(b)
            assert sol.objective == pytest.approx(min(feasible), abs=1e-12)


def test_budget_values_are_checked():
    obj = np.zeros((2, 2))
    with pytest.raises(ValueError, match="budget 'c' must be a finite number, got None"):
        autoprec.solve(obj, {"c": obj}, {"c": None})
    with pytest.raises(ValueError, match="budget 'c' must be a finite number, got '10'"):
        autoprec.solve(obj, {"c": obj}, {"c": "10"})
