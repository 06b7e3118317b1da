"""Hardware-aware mixed-precision search: layers × candidates → sensitivity and costs →
integer program → a :class:`qjax.Policy`.

:func:`qjax.autoprec.problem.build_problem` turns a model and per-layer sensitivities
into a :class:`Problem` (predicted loss increase and costs of every (layer, candidate));
:func:`search` runs the whole pipeline under one of two objectives:

* ``budgets=`` only: minimise the predicted loss increase under the budgets (HAWQ-V3);
* ``max_drop=`` with ``eval_fn=``: minimise the swept cost subject to a *measured* metric
  drop ≤ ``max_drop`` (accuracy-driven tuning, as Intel Neural Compressor / ModelOpt
  AutoQuantize): frontier points are measured by bisection on cost, then the cheapest
  passing one is improved greedily from its failing neighbour (one layer raised at a
  time, best predicted-loss decrease per unit cost first).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from qjax.autoprec.candidates import Candidate, check_candidates, weight_candidates
from qjax.autoprec.cost import find_layers
from qjax.autoprec.hardware import Hardware, detect_hardware
from qjax.autoprec.knapsack import InfeasibleError, Solution, budget_value, pareto, solve
from qjax.autoprec.latency import LatencyTable
from qjax.autoprec.problem import Problem, build_problem, fmt_cost
from qjax.autoprec.sensitivity import (
    direct_sensitivity,
    fisher_trace,
    hutchinson_trace,
    top_eigenvalue,
)
from qjax.quant.policy import Policy

SENSITIVITIES = ("hessian", "fisher", "eigen", "direct")


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """One frontier configuration.

    Attributes:
      choice: candidate name per layer (layer order of the problem).
      predicted: predicted loss increase.
      costs: ``{cost name: total}``.
      measured: the metric from ``eval_fn`` if it was evaluated, else ``None``.
    """

    choice: tuple[str, ...]
    predicted: float
    costs: Mapping[str, float]
    measured: float | None = None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One configuration measured by ``eval_fn`` during :func:`search`.

    Attributes:
      choice: candidate name per layer.
      cost: the swept cost.
      predicted: predicted loss increase.
      metric: ``eval_fn``'s value.
      source: ``"pareto"`` (a frontier point), ``"greedy"`` (a refinement step) or
        ``"chosen"`` (the budgeted choice, measured for the report).
    """

    choice: tuple[str, ...]
    cost: float
    predicted: float
    metric: float
    source: str


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
    """What :func:`search` found.

    Attributes:
      policy: the :class:`qjax.Policy` of the chosen configuration.
      choice: ``{layer path: candidate name}``.
      predicted: predicted loss increase of the choice.
      costs: ``{cost name: total}`` of the choice.
      pareto: the frontier along the swept cost.
      problem: the :class:`Problem` (layers, candidates, predictions, costs).
      objective: ``"loss"`` (budgeted) or ``"accuracy"`` (``max_drop``).
      sweep: the cost name of the frontier (and minimised by ``"accuracy"``).
      baseline: ``eval_fn`` of the float model, if evaluated.
      measured: ``eval_fn`` of the choice, if evaluated.
      met: whether the chosen configuration meets ``max_drop`` (always ``True`` for
        ``"loss"``).
      evaluations: every configuration measured, in order.
      hardware: the hardware entry used, if any.
    """

    policy: Policy
    choice: Mapping[str, str]
    predicted: float
    costs: Mapping[str, float]
    pareto: tuple[ParetoPoint, ...]
    problem: Problem
    objective: str
    sweep: str
    baseline: float | None = None
    measured: float | None = None
    met: bool = True
    evaluations: tuple[Evaluation, ...] = ()
    hardware: Hardware | None = None

    def report(self) -> str:
        """A Markdown report: summary, per-layer choice with predictions and costs, and
        the frontier.

        Example:
          >>> print(qjax.autoprec.search(...).report())
        """
        lines = [f"objective: {self.objective}; sweep cost: {self.sweep}"]
        if self.hardware is not None:
            lines.append(f"hardware: {self.hardware.name}")
        lines.append(f"predicted loss increase: {self.predicted:.4g}")
        if self.baseline is not None:
            lines.append(f"float metric: {self.baseline:.4f}")
        if self.measured is not None:
            lines.append(
                f"measured metric: {self.measured:.4f}" + ("" if self.met else " (max_drop NOT met)")
            )
        lines += ["", self.problem.table(self.choice), "", "Pareto frontier:", ""]
        names = list(self.problem.costs)
        lines.append("| # | " + " | ".join(names) + " | pred. Δloss | measured | choice |")
        lines.append("|---:|" + "---:|" * (len(names) + 2) + "---|")
        for k, p in enumerate(self.pareto):
            m = "" if p.measured is None else f"{p.measured:.4f}"
            costs = (fmt_cost(p.costs[n]) for n in names)
            cells = [str(k), *costs, f"{p.predicted:.3g}", m, " ".join(p.choice)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _layer_groups(problem: Problem, spec: str | Iterable[str], what: str) -> tuple[int, ...]:
    """Layer indices named by a regex string or an iterable of exact paths."""
    if isinstance(spec, str):
        rx = re.compile(spec)
        idx = tuple(i for i, p in enumerate(problem.paths) if rx.fullmatch(p))
        if not idx:
            raise ValueError(f"{what}: pattern {spec!r} matches no layer; layers: {list(problem.paths)}")
        return idx
    return tuple(problem.layer_index(p) for p in spec)


def _pins(problem: Problem, pins: Mapping[str, str] | None, pin_first_last: str | None) -> dict[int, int]:
    out: dict[int, int] = {}
    if pin_first_last is not None:
        j = problem.candidate_index(pin_first_last)
        out[0] = j
        out[len(problem.layers) - 1] = j
    for pattern, name in (pins or {}).items():
        j = problem.candidate_index(name)
        for i in _layer_groups(problem, pattern, "pins"):
            out[i] = j
    return out


def _sensitivity(kind, loss_fn, params, batches, key, num_probes, layer_paths, candidates):
    if isinstance(kind, Mapping):
        return kind
    if kind not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES} or a mapping, got {kind!r}")
    if loss_fn is None:
        raise ValueError(f"sensitivity={kind!r} needs loss_fn= (and batches=)")
    pats = [re.escape(p) for p in layer_paths]
    key = jax.random.key(0) if key is None else key
    if kind == "hessian":
        return hutchinson_trace(loss_fn, params, key, num_probes, batches=batches, paths=pats)
    if kind == "eigen":
        return top_eigenvalue(loss_fn, params, key, batches=batches, paths=pats)
    if kind == "fisher":
        if batches is None:
            raise ValueError("sensitivity='fisher' needs batches= (per-example gradients)")
        return fisher_trace(loss_fn, params, batches, paths=pats)
    return direct_sensitivity(loss_fn, params, candidates, batches=batches, paths=pats)


def _greedy(problem: Problem, start, sweep: str, budgets, ties, pins, upper: float, measure, max_evals: int):
    """Raise one layer (or tie group) at a time from ``start`` — the move with the best
    predicted-loss decrease per unit of ``sweep`` cost within the budgets — until
    ``measure`` passes or the cost reaches ``upper``. Returns the passing choice or None."""
    units: list[tuple[int, ...]] = [tuple(g) for g in ties]
    tied = {i for g in units for i in g}
    units += [(i,) for i in range(len(problem.layers)) if i not in tied]
    units = [u for u in units if not any(i in pins for i in u)]
    allowed = np.isfinite(problem.objective)
    for c in problem.costs.values():
        allowed &= np.isfinite(c)
    choice = list(start)
    for _ in range(max_evals):
        _pred, tot = problem.totals(choice)
        best, best_score = None, -np.inf
        for u in units:
            for j in range(len(problem.candidates)):
                if not all(allowed[i, j] for i in u) or all(choice[i] == j for i in u):
                    continue
                d_obj = sum(problem.objective[i, j] - problem.objective[i, choice[i]] for i in u)
                d_cost = sum(problem.costs[sweep][i, j] - problem.costs[sweep][i, choice[i]] for i in u)
                if d_obj >= 0 or d_cost <= 0 or tot[sweep] + d_cost >= upper:
                    continue
                ok = all(
                    tot[k] + sum(problem.costs[k][i, j] - problem.costs[k][i, choice[i]] for i in u) <= b
                    for k, b in budgets.items()
                )
                if ok and -d_obj / d_cost > best_score:
                    best, best_score = (u, j), -d_obj / d_cost
        if best is None:
            return None
        for i in best[0]:
            choice[i] = best[1]
        if measure(tuple(choice), "greedy"):
            return tuple(choice)
    return None


def search(
    apply_fn: Callable,
    params: Any,
    example_args: tuple,
    *,
    loss_fn: Callable | None = None,
    batches: Iterable | None = None,
    candidates: Sequence[Candidate] | None = None,
    budgets: Mapping[str, float] | None = None,
    sensitivity: str | Mapping[str, Any] = "hessian",
    key: jax.Array | None = None,
    num_probes: int = 64,
    hardware: str | Hardware | None = None,
    latency: LatencyTable | None = None,
    ties: Sequence[str | Sequence[str]] = (),
    pins: Mapping[str, str] | None = None,
    pin_first_last: str | None = None,
    sweep: str = "bytes",
    points: int = 16,
    sweep_max: float | None = None,
    eval_fn: Callable[[Policy], float] | None = None,
    max_drop: float | None = None,
    evaluate_pareto: bool = False,
    act_bits: int = 32,
    paths: str | Sequence[str] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Choose a candidate per layer and return the policy.

    Args:
      apply_fn: the model, ``apply_fn(params, *example_args, **apply_kwargs)``.
      params: float params.
      example_args: example inputs (shapes set MACs/BOPs; a batch of one gives per-example
        BOPs).
      loss_fn: ``loss_fn(params, *batch) -> scalar`` for the sensitivity.
      batches: a sequence of argument tuples for ``loss_fn``.
      candidates: default :func:`weight_candidates` (int2/int4/int8 per channel, float).
      budgets: ``{cost name: limit}`` over ``"bytes"``, ``"bops"``, ``"time"`` (needs
        ``hardware``), ``"latency"`` (needs ``latency``).
      sensitivity: ``"hessian"`` (Hutchinson trace), ``"fisher"``, ``"eigen"``,
        ``"direct"``, or precomputed estimates (see :func:`build_problem`). A NaN or inf
        sensitivity is an error; a negative Hessian trace or eigenvalue (an indefinite
        Hessian, e.g. at random init) warns: it makes the coarsest format look best.
      key: PRNG key of the probes (default ``jax.random.key(0)``).
      num_probes: Hutchinson probes.
      hardware: ``"auto"`` (:func:`detect_hardware`), a table name or a :class:`Hardware`:
        only natively supported candidates are allowed, and the ``"time"`` cost is added.
      latency: a :class:`LatencyTable` (adds the ``"latency"`` cost).
      ties: groups of layers that must share a candidate: each a regex string (all layers
        it matches) or a list of paths.
      pins: ``{regex or path: candidate name}``.
      pin_first_last: pin the first and last layers (evaluation order) to this candidate.
      sweep: the cost along which the frontier is swept (and, for ``max_drop``, minimised).
      points: budget values of the frontier sweep.
      sweep_max: upper end of the frontier sweep (default: the cost of the all-best
        configuration, often float, far above the useful range).
      eval_fn: ``eval_fn(policy) -> metric`` (higher is better, e.g. accuracy of
        ``qjax.fake_quantized(apply_fn, policy)``); ``eval_fn(qjax.Policy([]))`` is the
        float baseline.
      max_drop: accuracy-driven objective: the cheapest configuration (by ``sweep``)
        whose measured ``baseline − metric ≤ max_drop``.
      evaluate_pareto: also measure every frontier point with ``eval_fn``.
      act_bits: bits of float activations in BOPs.
      paths: regular expression(s) restricting the searched layers (others stay float).
      apply_kwargs: static keyword arguments of ``apply_fn``.

    Returns:
      A :class:`SearchResult` (``.policy``, ``.pareto``, ``.report()``).

    Raises:
      ValueError: neither ``budgets`` nor ``max_drop``; ``max_drop`` without ``eval_fn``;
        a budget that is not a finite number, unknown cost, candidate or layer names
        (named). InfeasibleError: the budgets,
        ties and pins admit no configuration.

    Example:
      >>> res = qjax.autoprec.search(model.apply, variables, (x[:1],), loss_fn=loss,
      ...                            batches=[(x, y)], budgets={"bytes": 40_000})
      >>> qparams = qjax.quantize_params(variables, res.policy)
    """
    if budgets is None and max_drop is None:
        raise ValueError("search needs budgets= (minimise predicted loss) or max_drop= (with eval_fn=)")
    if max_drop is not None and eval_fn is None:
        raise ValueError("max_drop= needs eval_fn=(policy -> metric, higher is better)")
    if budgets is not None and not isinstance(budgets, Mapping):
        raise ValueError(f"budgets must be a mapping {{cost name: limit}}, got {budgets!r}")
    budgets = {k: budget_value(k, b) for k, b in (budgets or {}).items()}  # before the sensitivities
    candidates = check_candidates(weight_candidates() if candidates is None else candidates)
    hw = None
    if hardware is not None:
        hw = detect_hardware() if hardware == "auto" else detect_hardware(hardware)
    kwargs = dict(apply_kwargs or {})
    layer_paths = [
        layer.path for layer in find_layers(apply_fn, params, *example_args, paths=paths, **kwargs)
    ]
    batch_list = None if batches is None else list(batches)
    sens = _sensitivity(sensitivity, loss_fn, params, batch_list, key, num_probes, layer_paths, candidates)
    problem = build_problem(
        apply_fn,
        params,
        example_args,
        candidates,
        sens,
        act_bits=act_bits,
        hardware=hw,
        latency=latency,
        paths=[re.escape(p) for p in layer_paths],
        apply_kwargs=kwargs,
    )
    for k in [*budgets, sweep]:
        if k not in problem.costs:
            raise ValueError(f"cost {k!r} is not available; costs: {sorted(problem.costs)}")
    tie_groups = [_layer_groups(problem, t, "ties") for t in ties]
    pin_map = _pins(problem, pins, pin_first_last)
    fixed = {k: b for k, b in budgets.items() if k != sweep}
    front = pareto(
        problem.objective,
        problem.costs,
        sweep,
        points=points,
        budgets=fixed,
        ties=tie_groups,
        pins=pin_map,
        sweep_max=sweep_max,
    )
    names = problem.names

    def point(sol: Solution, measured=None) -> ParetoPoint:
        return ParetoPoint(tuple(names[j] for j in sol.choice), sol.objective, dict(sol.costs), measured)

    baseline = None if eval_fn is None else float(eval_fn(Policy([])))
    evaluations: list[Evaluation] = []
    cache: dict[tuple[int, ...], float] = {}

    def metric(choice: tuple[int, ...], source: str) -> float:
        if choice not in cache:
            cache[choice] = float(eval_fn(problem.policy(choice)))
            pred, tot = problem.totals(choice)
            evaluations.append(
                Evaluation(tuple(names[j] for j in choice), tot[sweep], pred, cache[choice], source)
            )
        return cache[choice]

    met = True
    if max_drop is None:
        sol = solve(problem.objective, problem.costs, budgets, ties=tie_groups, pins=pin_map)
        chosen = sol.choice
    else:
        limit = budgets.get(sweep, np.inf)
        cands = [s for s in front if s.costs[sweep] <= limit * (1 + 1e-12)]
        if not cands:
            raise InfeasibleError(f"no frontier point has {sweep} <= {limit:g}")

        def passes(choice, source="pareto") -> bool:
            return baseline - metric(choice, source) <= max_drop

        lo, hi = 0, len(cands) - 1
        if not passes(cands[hi].choice):
            met, chosen = False, cands[hi].choice
        else:
            while lo < hi:  # cheapest passing point, assuming the metric grows with cost
                mid = (lo + hi) // 2
                if passes(cands[mid].choice):
                    hi = mid
                else:
                    lo = mid + 1
            if lo > 0:
                _greedy(
                    problem,
                    cands[lo - 1].choice,
                    sweep,
                    budgets,
                    tie_groups,
                    pin_map,
                    cands[lo].costs[sweep],
                    passes,
                    max_evals=len(problem.layers) * len(problem.candidates),
                )
            # the cheapest configuration measured to pass (bisection assumes monotonicity)
            passing = [c for c, m in cache.items() if baseline - m <= max_drop]
            chosen = min(passing, key=lambda c: (problem.totals(c)[1][sweep], problem.totals(c)[0]))
    if evaluate_pareto and eval_fn is not None:
        pts = tuple(point(s, metric(s.choice, "pareto")) for s in front)
    else:
        pts = tuple(point(s, cache.get(s.choice)) for s in front)
    measured = None
    if eval_fn is not None:
        measured = metric(tuple(chosen), "chosen") if max_drop is None else cache[tuple(chosen)]
    pred, tot = problem.totals(chosen)
    return SearchResult(
        policy=problem.policy(chosen),
        choice=problem.choice_names(chosen),
        predicted=pred,
        costs=tot,
        pareto=pts,
        problem=problem,
        objective="loss" if max_drop is None else "accuracy",
        sweep=sweep,
        baseline=baseline,
        measured=measured,
        met=met,
        evaluations=tuple(evaluations),
        hardware=hw,
    )
