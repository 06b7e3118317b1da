"""Automatic mixed-precision selection: hardware capability table, per-layer sensitivity
(Hutchinson Hessian trace, power iteration, empirical Fisher, direct measurement), cost
models (bytes, BOPs, analytical hardware time, measured latency), a multiple-choice
knapsack integer program with Pareto sweeps, and the search that turns them into a
:class:`qjax.Policy`.

Example:
  >>> res = qjax.autoprec.search(model.apply, variables, (x[:1],), loss_fn=loss,
  ...                            batches=[(x, y)], budgets={"bytes": 40_000})
  >>> print(res.report())
  >>> y = qjax.quantized(model.apply, res.policy)(qjax.quantize_params(variables, res.policy), x)
"""

from qjax.autoprec.candidates import FLOAT, Candidate, check_candidates, weight_candidates
from qjax.autoprec.cost import (
    Layer,
    cost_matrices,
    find_layers,
    layer_bits,
    layer_bops,
    layer_bytes,
    layer_time,
    op_macs,
)
from qjax.autoprec.hardware import HARDWARE, Hardware, cpu_has_int8_dot, detect_hardware, lookup
from qjax.autoprec.knapsack import InfeasibleError, Solution, pareto, solve
from qjax.autoprec.latency import LatencyTable, measure_latency
from qjax.autoprec.omega import perturbation
from qjax.autoprec.pipeline import SENSITIVITIES, Evaluation, ParetoPoint, SearchResult, search
from qjax.autoprec.problem import Problem, build_problem
from qjax.autoprec.sensitivity import (
    EigenEstimate,
    TraceEstimate,
    direct_sensitivity,
    fisher_diagonal,
    fisher_trace,
    hutchinson_trace,
    top_eigenvalue,
)

__all__ = [
    "FLOAT",
    "HARDWARE",
    "SENSITIVITIES",
    "Candidate",
    "EigenEstimate",
    "Evaluation",
    "Hardware",
    "InfeasibleError",
    "LatencyTable",
    "Layer",
    "ParetoPoint",
    "Problem",
    "SearchResult",
    "Solution",
    "TraceEstimate",
    "build_problem",
    "check_candidates",
    "cost_matrices",
    "cpu_has_int8_dot",
    "detect_hardware",
    "direct_sensitivity",
    "find_layers",
    "fisher_diagonal",
    "fisher_trace",
    "hutchinson_trace",
    "layer_bits",
    "layer_bops",
    "layer_bytes",
    "layer_time",
    "lookup",
    "measure_latency",
    "op_macs",
    "pareto",
    "perturbation",
    "search",
    "solve",
    "top_eigenvalue",
    "weight_candidates",
]
