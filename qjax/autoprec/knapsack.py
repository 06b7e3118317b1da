"""Budgeted precision assignment as a multiple-choice knapsack integer program.

Variables ``x[l, f] ∈ {0, 1}`` (layer ``l`` takes candidate ``f``), one choice per layer
(``Σ_f x[l, f] = 1``), minimise ``Σ objective[l, f] x[l, f]`` subject to one row
``Σ cost_k[l, f] x[l, f] ≤ budget_k`` per budget, tied layers sharing a choice
(``x[a, f] = x[b, f]``) and pinned layers fixed. Solved exactly by HiGHS through
``scipy.optimize.milp`` (HAWQ-V3's formulation). ``inf``/``nan`` objective or cost
entries, and ``allowed=False``, forbid a pair.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import optimize, sparse

# Budget rows and the objective are scaled so their largest entry is this: HiGHS's
# absolute feasibility tolerances (1e-6 for MIP rows) then resolve ~1e-12 of the largest
# cost. Scaled to 1, a budget within 1e-6 of an achievable cost made HiGHS fail
# ("Solve error") or accept a slightly over-budget assignment.
_ROW_MAX = 1e6
# HiGHS still misjudges a budget within ~1e-7 of the row's largest entry of an
# achievable cost (a budget of 81·(1-1e-9) admitted a cost of 81; another returned a
# suboptimal choice): _Program.best solves with budgets _MARGIN (relative to that entry)
# higher and cuts off answers over the real budget.
_MARGIN = 1e-5
_MAX_CUTS = 64


class InfeasibleError(ValueError):
    """No assignment satisfies the budgets, ties and pins."""


@dataclasses.dataclass(frozen=True)
class Solution:
    """One assignment.

    Attributes:
      choice: the candidate index of every layer.
      objective: ``Σ objective[l, choice[l]]``.
      costs: ``{cost name: Σ cost[l, choice[l]]}`` for every cost matrix given.
    """

    choice: tuple[int, ...]
    objective: float
    costs: Mapping[str, float]


def _as_matrix(name: str, a, shape=None) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a [layers, candidates] matrix, got shape {m.shape}")
    if shape is not None and m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}; objective has {shape}")
    return m


def _check_index(name: str, i, n: int) -> int:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n:
        raise ValueError(f"{name}: {i!r} is not an index in [0, {n})")
    return int(i)


@dataclasses.dataclass(frozen=True)
class _Program:
    objective: np.ndarray
    costs: dict[str, np.ndarray]
    ok: np.ndarray  # [L, F] allowed pairs
    ties: tuple[tuple[int, ...], ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.objective.shape

    def totals(self, choice: Sequence[int]) -> tuple[float, dict[str, float]]:
        rows = np.arange(len(choice))
        idx = np.asarray(choice)
        return float(self.objective[rows, idx].sum()), {
            k: float(c[rows, idx].sum()) for k, c in self.costs.items()
        }

    def over(self, choice: np.ndarray, budgets: Mapping[str, float]) -> bool:
        """Whether ``choice`` exceeds a budget by more than the rounding of its float sum."""
        rows = np.arange(len(choice))
        for k, b in budgets.items():
            picked = self.costs[k][rows, choice]
            if picked.sum() > b + 4 * len(picked) * np.finfo(np.float64).eps * np.abs(picked).sum():
                return True
        return False

    def margin(self, name: str) -> float:
        """Well over HiGHS's feasibility tolerance on the budget row ``name``."""
        return _MARGIN * (float(np.abs(np.where(self.ok, self.costs[name], 0.0)).max()) or 1.0)

    def run(
        self, c: np.ndarray, budgets: Mapping[str, float], *, cuts: Sequence[np.ndarray] = ()
    ) -> np.ndarray | None:
        """One MILP minimising ``c · x``: the choice vector, or ``None`` if infeasible.
        ``cuts`` are choices excluded."""
        n_l, n_f = self.shape
        n = n_l * n_f
        rows, lo, hi = [], [], []
        one = sparse.kron(sparse.eye(n_l), np.ones((1, n_f)))
        rows.append(one)
        lo += [1.0] * n_l
        hi += [1.0] * n_l
        for name, b in budgets.items():
            cost = np.where(self.ok, self.costs[name], 0.0)
            scale = (float(np.abs(cost).max()) or 1.0) / _ROW_MAX
            rows.append(sparse.csr_matrix(cost.reshape(1, n) / scale))
            lo.append(-np.inf)
            hi.append(float(b) / scale)
        for group in self.ties:
            for a, b in itertools.pairwise(group):
                m = sparse.lil_matrix((n_f, n))
                for f in range(n_f):
                    m[f, a * n_f + f] = 1.0
                    m[f, b * n_f + f] = -1.0
                rows.append(m.tocsr())
                lo += [0.0] * n_f
                hi += [0.0] * n_f
        for cut in cuts:  # at most n_l - 1 of the cut choice's pairs
            idx = np.arange(n_l) * n_f + cut
            rows.append(sparse.csr_matrix((np.ones(n_l), (np.zeros(n_l, int), idx)), shape=(1, n)))
            lo.append(-np.inf)
            hi.append(n_l - 1.0)
        a_mat = sparse.vstack(rows).tocsr()
        upper = self.ok.reshape(n).astype(np.float64)
        cost = np.where(self.ok.reshape(n), c.reshape(n), 0.0)
        cost = cost / ((float(np.abs(cost).max()) or 1.0) / _ROW_MAX)
        res = optimize.milp(
            cost,
            integrality=np.ones(n),
            bounds=optimize.Bounds(np.zeros(n), upper),
            constraints=optimize.LinearConstraint(a_mat, np.asarray(lo), np.asarray(hi)),
            options={"mip_rel_gap": 0.0, "presolve": True},
        )
        if res.status == 2:
            return None
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"HiGHS MILP did not finish: status {res.status} ({res.message})")
        x = np.round(res.x).reshape(n_l, n_f)
        return x.argmax(1)

    def best(
        self, c: np.ndarray, budgets: Mapping[str, float], soft: Mapping[str, float] | None = None
    ) -> np.ndarray | None:
        """The optimum of ``c · x`` whose float totals are within ``budgets``, or ``None``;
        ``soft`` rows are left to HiGHS's tolerance (neither loosened nor checked).

        Solved with every budget raised by its :meth:`margin`, so HiGHS never decides a
        budget within its tolerance (it then returned over-budget and even suboptimal
        choices); an answer over a real budget is cut off and the MILP re-solved. Should
        that take more than ``_MAX_CUTS`` MILPs, the budgets lowered by the margin give a
        feasible answer (optimal unless a better one costs within the margin of a budget).
        """
        soft = dict(soft or {})
        loose = {k: b + self.margin(k) for k, b in budgets.items()}
        cuts: list[np.ndarray] = []
        for _ in range(_MAX_CUTS):
            choice = self.run(c, {**loose, **soft}, cuts=cuts)
            if choice is None or not self.over(choice, budgets):
                return choice
            cuts.append(choice)
        choice = self.run(c, {**{k: b - self.margin(k) for k, b in budgets.items()}, **soft})
        if choice is not None and self.over(choice, budgets):  # pragma: no cover - HiGHS broke its tolerance
            raise RuntimeError(f"HiGHS returned a choice over the budgets {dict(budgets)}")
        return choice


def _program(
    objective,
    costs: Mapping[str, object],
    *,
    ties: Sequence[Sequence[int]] = (),
    pins: Mapping[int, int] | None = None,
    allowed=None,
) -> _Program:
    obj = _as_matrix("objective", objective)
    n_l, n_f = obj.shape
    if n_l == 0 or n_f == 0:
        raise ValueError(f"objective is empty (shape {obj.shape}): need at least one layer and one candidate")
    cost = {str(k): _as_matrix(f"costs[{k!r}]", v, obj.shape) for k, v in costs.items()}
    ok = np.isfinite(obj)
    for m in cost.values():
        ok &= np.isfinite(m)
    if allowed is not None:
        mask = np.asarray(allowed, dtype=bool)
        if mask.shape != obj.shape:
            raise ValueError(f"allowed has shape {mask.shape}; objective has {obj.shape}")
        ok &= mask
    for layer, f in (pins or {}).items():
        layer = _check_index("pins layer", layer, n_l)
        f = _check_index(f"pins[{layer}] candidate", f, n_f)
        if not ok[layer, f]:
            raise InfeasibleError(f"layer {layer} is pinned to candidate {f}, which is not allowed for it")
        ok[layer] = False
        ok[layer, f] = True
    groups = []
    for g, group in enumerate(ties):
        group = tuple(_check_index(f"ties[{g}]", i, n_l) for i in group)
        if len(group) > 1:
            groups.append(group)
    bad = [layer for layer in range(n_l) if not ok[layer].any()]
    if bad:
        raise InfeasibleError(f"layers {bad} have no allowed candidate (all inf/nan or masked)")
    return _Program(obj, cost, ok, tuple(groups))


def budget_value(name: str, b) -> float:
    """A budget limit as a finite float.

    Raises:
      ValueError: ``b`` is not a finite real number (names the budget).
    """
    try:
        if isinstance(b, (bool, str, bytes)) or np.ndim(b) != 0:
            raise TypeError
        v = float(b)
    except (TypeError, ValueError):
        raise ValueError(f"budget {name!r} must be a finite number, got {b!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"budget {name!r} must be a finite number, got {v}")
    return v


def _check_budgets(prog: _Program, budgets: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, b in budgets.items():
        if k not in prog.costs:
            raise ValueError(f"budget {k!r} has no cost matrix; costs given: {sorted(prog.costs)}")
        out[k] = budget_value(k, b)
    return out


def _infeasible(prog: _Program, budgets: Mapping[str, float]) -> InfeasibleError:
    parts = []
    for k, b in budgets.items():
        choice = prog.run(prog.costs[k], {})
        least = prog.totals(choice)[1][k] if choice is not None else float("nan")
        parts.append(f"{k} <= {b:g} (the least achievable alone is {least:g})")
    detail = "; ".join(parts) if parts else "no budgets"
    return InfeasibleError(f"no assignment satisfies the budgets, ties and pins: {detail}")


def solve(
    objective,
    costs: Mapping[str, object],
    budgets: Mapping[str, float],
    *,
    ties: Sequence[Sequence[int]] = (),
    pins: Mapping[int, int] | None = None,
    allowed=None,
) -> Solution:
    """Minimise the summed objective under any number of budget rows.

    Args:
      objective: ``[layers, candidates]`` (e.g. predicted loss increase); ``inf``/``nan``
        forbids a pair.
      costs: ``{name: [layers, candidates]}``; ``inf``/``nan`` forbids a pair.
      budgets: ``{name: limit}``, each ``Σ cost[name] ≤ limit``; names must be in ``costs``.
      ties: groups of layer indices that must take the same candidate.
      pins: ``{layer: candidate}`` fixed choices.
      allowed: optional boolean ``[layers, candidates]`` mask.

    Returns:
      The optimal :class:`Solution` (HiGHS with a zero relative MIP gap). Its float totals
      are within the budgets (up to the rounding of a float sum): HiGHS's own row
      tolerance is not trusted (see :meth:`_Program.best`).

    Raises:
      InfeasibleError: nothing satisfies the constraints (the message gives each budget
        and the least cost achievable for it alone). ValueError: shapes disagree, a
        budget has no cost matrix, or an index is out of range.

    Example:
      >>> sol = solve(omega, {"bytes": size}, {"bytes": 20_000}, pins={0: 2})
      >>> sol.choice, sol.costs["bytes"]
    """
    prog = _program(objective, costs, ties=ties, pins=pins, allowed=allowed)
    budgets = _check_budgets(prog, budgets)
    choice = prog.best(prog.objective, budgets)
    if choice is None:
        raise _infeasible(prog, budgets)
    obj, tot = prog.totals(choice)
    return Solution(tuple(int(c) for c in choice), obj, tot)


def _tight(prog: _Program, sweep: str, fixed: Mapping[str, float], b: float) -> np.ndarray | None:
    """The optimum under ``sweep <= b``, re-solved for the least ``sweep`` cost at that
    objective (so the point is not dominated)."""
    choice = prog.best(prog.objective, {**fixed, sweep: b})
    if choice is None:
        return None
    obj = prog.totals(choice)[0]
    slack = abs(obj) * 1e-9 + 1e-12
    with_obj = dataclasses.replace(prog, costs={**prog.costs, "_objective": prog.objective})
    tight = with_obj.best(prog.costs[sweep], {**fixed, sweep: b}, {"_objective": obj + slack})
    return choice if tight is None else tight


def pareto(
    objective,
    costs: Mapping[str, object],
    sweep: str,
    *,
    points: int = 16,
    exact: bool = False,
    budgets: Mapping[str, float] | None = None,
    ties: Sequence[Sequence[int]] = (),
    pins: Mapping[int, int] | None = None,
    allowed=None,
    sweep_max: float | None = None,
) -> tuple[Solution, ...]:
    """The objective/cost Pareto frontier along cost ``sweep``.

    Default: the ``sweep`` budget runs over ``points`` evenly spaced values from the
    least achievable cost to the cost of the unconstrained optimum. ``exact=True``: every
    frontier point (points whose ``sweep`` costs differ by less than 2e-5 of the largest
    ``sweep`` entry, or whose objectives by less than 1e-9 relative, count as one), found
    by repeatedly solving with the budget just below the previous
    point's cost, from the unconstrained optimum down (at most ``points`` of them, the
    most expensive first). Each point is solved exactly, then re-solved for the least
    ``sweep`` cost at its objective, and dominated or repeated points are dropped. Other
    ``budgets`` apply to every point.

    Args:
      objective, costs, ties, pins, allowed: as :func:`solve`.
      sweep: the cost name swept.
      points: budget values tried (≥ 2), or with ``exact`` the most points returned.
      exact: enumerate the whole frontier (one or two MILPs per point).
      budgets: fixed budgets on other costs.
      sweep_max: upper end of the swept budget (default: the cost of the unconstrained
        optimum), to spend the points on the useful range when the full-precision end is
        far away (e.g. float32 at 4x the int8 size).

    Returns:
      Solutions sorted by increasing ``sweep`` cost with strictly decreasing objective.

    Raises:
      InfeasibleError: the fixed budgets admit nothing. ValueError: ``sweep`` is not a
        cost, ``points`` < 2, or it is also in ``budgets``.

    Example:
      >>> front = pareto(omega, {"bytes": size}, "bytes", points=20)
      >>> [(p.costs["bytes"], p.objective) for p in front]
    """
    if int(points) < 2:
        raise ValueError(f"pareto: points must be >= 2, got {points}")
    prog = _program(objective, costs, ties=ties, pins=pins, allowed=allowed)
    if sweep not in prog.costs:
        raise ValueError(f"pareto: sweep {sweep!r} is not a cost; costs given: {sorted(prog.costs)}")
    fixed = _check_budgets(prog, budgets or {})
    if sweep in fixed:
        raise ValueError(f"pareto: {sweep!r} is swept; do not also give it in budgets")
    cheapest = prog.best(prog.costs[sweep], fixed)
    best = prog.best(prog.objective, fixed)
    if cheapest is None or best is None:
        raise _infeasible(prog, fixed)
    lo = prog.totals(cheapest)[1][sweep]
    hi = max(prog.totals(best)[1][sweep], lo)
    if sweep_max is not None:
        if sweep_max < lo:
            raise ValueError(f"pareto: sweep_max={sweep_max} is below the least achievable {sweep} cost {lo}")
        hi = min(hi, float(sweep_max))
    choices = []
    if exact:
        # Step below each point by twice the margin (_Program.best), so the loosened
        # budget excludes it: frontier points closer than that are merged.
        step = 2 * prog.margin(sweep)
        b, last = hi, np.inf
        while len(choices) < int(points):
            choice = _tight(prog, sweep, fixed, b)
            if choice is None:
                break
            cost = prog.totals(choice)[1][sweep]
            if cost >= last:  # pragma: no cover - best() keeps every answer within b < last
                break
            choices.append(choice)
            b, last = cost - step, cost
    else:
        for b in np.linspace(lo, hi, int(points)):
            choice = _tight(prog, sweep, fixed, b + abs(b) * 1e-12)  # the end points are achieved exactly
            if choice is not None:
                choices.append(choice)
    sols = []
    for choice in choices:
        o, tot = prog.totals(choice)
        sols.append(Solution(tuple(int(c) for c in choice), o, tot))
    sols.sort(key=lambda s: (s.costs[sweep], s.objective))
    front: list[Solution] = []
    for s in sols:
        if front and (s.objective >= front[-1].objective or s.costs[sweep] == front[-1].costs[sweep]):
            continue
        front.append(s)
    return tuple(front)
