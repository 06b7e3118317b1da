"""The mixed-precision search space with its predictions: :class:`Problem` (layers ×
candidates, predicted loss increase, costs) and :func:`build_problem`, which makes one
from a model and per-layer sensitivities. :mod:`qjax.autoprec.pipeline` searches it."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.autoprec.cost import Layer, cost_matrices, find_layers
from qjax.autoprec.hardware import Hardware
from qjax.autoprec.latency import LatencyTable
from qjax.autoprec.omega import perturbation
from qjax.quant.policy import Policy, Rule


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """The search space with its predictions.

    Attributes:
      layers: the :class:`Layer`s, in evaluation order.
      candidates: the :class:`Candidate`s.
      objective: ``[layers, candidates]`` predicted loss increase (``inf``: not allowed).
      costs: ``{name: [layers, candidates]}`` (``"bytes"``, ``"bops"``, optionally
        ``"time"``, ``"latency"``).
      notes: ``{(path, candidate name): why it is not allowed}``.
    """

    layers: tuple[Layer, ...]
    candidates: tuple[Candidate, ...]
    objective: np.ndarray
    costs: Mapping[str, np.ndarray]
    notes: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    def layer_index(self, path: str) -> int:
        """Index of layer ``path``. Raises ValueError naming unknown paths."""
        try:
            return self.paths.index(path)
        except ValueError:
            raise ValueError(f"{path!r} is not a layer; layers: {list(self.paths)}") from None

    def candidate_index(self, name: str) -> int:
        """Index of candidate ``name``. Raises ValueError naming unknown names."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"{name!r} is not a candidate; candidates: {list(self.names)}") from None

    def indices(self, choice: Sequence[int | str] | Mapping[str, str]) -> tuple[int, ...]:
        """A choice as candidate indices, from indices, names, or ``{path: name}``.

        Raises:
          ValueError: wrong length, unknown names, or a mapping missing a layer.
        """
        if isinstance(choice, Mapping):
            missing = [p for p in self.paths if p not in choice]
            if missing:
                raise ValueError(f"choice has no candidate for layers {missing}")
            choice = [choice[p] for p in self.paths]
        choice = list(choice)
        if len(choice) != len(self.layers):
            raise ValueError(f"choice has {len(choice)} entries for {len(self.layers)} layers")
        return tuple(self.candidate_index(c) if isinstance(c, str) else int(c) for c in choice)

    def choice_names(self, choice) -> dict[str, str]:
        """``{path: candidate name}`` of a choice (indices, names or a mapping).

        Example:
          >>> problem.choice_names([0, 0, 3])
          {'params/Dense_0/kernel': 'int2', ...}
        """
        return {p: self.names[i] for p, i in zip(self.paths, self.indices(choice))}

    def policy(self, choice) -> Policy:
        """The :class:`qjax.Policy` of a choice: one rule per layer, ``re.escape(path)``;
        float candidates become explicit "leave alone" rules.

        Example:
          >>> qparams = qjax.quantize_params(variables, problem.policy(result.choice))
        """
        rules = []
        for path, i in zip(self.paths, self.indices(choice)):
            c = self.candidates[i]
            rules.append(Rule(re.escape(path), weight=c.weight, act=c.act))
        return Policy(rules)

    def totals(self, choice) -> tuple[float, dict[str, float]]:
        """``(predicted loss increase, {cost name: total})`` of a choice.

        Example:
          >>> problem.totals(["int4"] * len(problem.layers))[1]["bytes"]
        """
        idx = np.asarray(self.indices(choice))
        rows = np.arange(len(idx))
        return float(self.objective[rows, idx].sum()), {
            k: float(c[rows, idx].sum()) for k, c in self.costs.items()
        }

    def table(self, choice) -> str:
        """A Markdown table, one row per layer (shape, MACs, choice, predicted Δloss,
        costs) plus totals.

        Example:
          >>> print(problem.table(result.choice))
        """
        idx = self.indices(choice)
        names = list(self.costs)
        head = ["layer", "shape", "MACs", "choice", "pred. Δloss", *names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---|" + "---:|" * (1 + len(names))]
        for i, (layer, j) in enumerate(zip(self.layers, idx)):
            vals = [fmt_cost(self.costs[n][i, j]) for n in names]
            cells = [
                f"`{layer.path}`",
                str(layer.shape),
                str(layer.macs),
                self.names[j],
                f"{self.objective[i, j]:.3g}",
            ]
            lines.append("| " + " | ".join(cells + vals) + " |")
        pred, tot = self.totals(idx)
        total_cells = ["total", "", str(sum(layer.macs for layer in self.layers)), "", f"{pred:.3g}"]
        lines.append("| " + " | ".join(total_cells + [fmt_cost(tot[n]) for n in names]) + " |")
        return "\n".join(lines) + "\n"


def fmt_cost(x: float) -> str:
    """A cost for a report table: ``-`` when infinite, integers without decimals."""
    if not np.isfinite(x):
        return "-"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _is_direct(sensitivity: Mapping[str, Any]) -> bool:
    """Whether precomputed sensitivities are direct ``{path: {candidate: loss increase}}``."""
    return all(isinstance(v, Mapping) for v in sensitivity.values())


def _finite_score(path: str, name: str, score) -> float:
    """A predicted loss increase; a NaN or inf one raises (it would silently forbid the pair)."""
    v = float(score)
    if not np.isfinite(v):
        raise ValueError(
            f"build_problem: the sensitivity of layer {path!r} for candidate {name!r} is {v}: a NaN/inf "
            "loss or gradient in the sensitivity batches (NaN labels or inputs, a diverged model), "
            "or an infinite curvature; to forbid a candidate for a layer use pins or candidates instead"
        )
    return v


def _negative(sensitivity: Mapping[str, Any]) -> list[str]:
    """Layers whose trace / eigenvalue estimate is negative."""
    out = []
    for path, s in sensitivity.items():
        v = getattr(s, "trace", getattr(s, "value", s))
        if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number) and float(v) < 0:
            out.append(path)
    return out


def build_problem(
    apply_fn: Callable,
    params: Any,
    example_args: tuple,
    candidates: Sequence[Candidate],
    sensitivity: Mapping[str, Any],
    *,
    act_bits: int = 32,
    hardware: Hardware | None = None,
    latency: LatencyTable | None = None,
    paths: str | Sequence[str] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Problem:
    """Layers, predicted loss increase and costs of every (layer, candidate).

    Args:
      apply_fn: ``apply_fn(params, *example_args, **apply_kwargs)``.
      params: float params.
      example_args: example positional arguments (their shapes set MACs and BOPs).
      candidates: the :class:`Candidate` list.
      sensitivity: either ``{path: estimate}`` (:class:`TraceEstimate`,
        :class:`EigenEstimate`, a number taken as a trace, or a diagonal array): the
        prediction is ``½ Ω`` (:func:`perturbation`); or ``{path: {candidate: Δloss}}``
        (:func:`direct_sensitivity`): used as is. Every layer needs an entry.
      act_bits: bits of float activations in BOPs.
      hardware: candidates whose compute format it does not run natively are not
        allowed; adds the ``"time"`` cost.
      latency: adds the ``"latency"`` cost.
      paths: regular expression(s) restricting the layers.
      apply_kwargs: static keyword arguments of ``apply_fn``.

    Returns:
      A :class:`Problem`.

    Raises:
      ValueError: a layer has no sensitivity (named), a sensitivity is NaN or inf (names
        the layer and candidate), or no candidate fits a layer.

    Warns:
      RuntimeWarning: a negative trace or eigenvalue estimate (names the layers). The
        Hessian of a model away from a minimum (random init, early training) can be
        indefinite: ``½ Ω`` is then negative and most negative for the coarsest format,
        so the search prefers int2 for such a layer even with unlimited budget. Estimate
        sensitivities on a trained model, or use ``"fisher"`` (never negative) or
        ``"direct"``.

    Example:
      >>> tr = hutchinson_trace(loss, variables, key, 64, batches=batches)
      >>> prob = build_problem(model.apply, variables, (x[:1],), weight_candidates(), tr)
    """
    candidates = check_candidates(candidates)
    layers = find_layers(apply_fn, params, *example_args, paths=paths, **dict(apply_kwargs or {}))
    missing = [layer.path for layer in layers if layer.path not in sensitivity]
    if missing:
        raise ValueError(f"build_problem: no sensitivity for layers {missing}")
    sub = {layer.path: sensitivity[layer.path] for layer in layers}
    if _is_direct(sub):
        scores = sub
    else:
        negative = _negative(sub)
        if negative:
            warnings.warn(
                f"build_problem: the curvature estimates of layers {negative} are negative (an indefinite "
                "Hessian, e.g. a model not at a minimum): their predicted loss increase is negative and "
                "largest in magnitude for the coarsest format, so the search favours it; use sensitivities "
                "of a trained model, sensitivity='fisher' or 'direct'",
                RuntimeWarning,
                stacklevel=2,
            )
        scores = {
            p: {k: 0.5 * v for k, v in row.items()}
            for p, row in perturbation(params, sub, candidates).items()
        }
    costs = cost_matrices(layers, candidates, act_bits=act_bits, hardware=hardware, latency=latency)
    objective = np.full((len(layers), len(candidates)), np.inf)
    notes: dict[tuple[str, str], str] = {}
    for i, layer in enumerate(layers):
        for j, c in enumerate(candidates):
            if not np.isfinite(costs["bytes"][i, j]):
                notes[(layer.path, c.name)] = "the weight spec does not fit the leaf"
            elif hardware is not None and not hardware.supports(c):
                notes[(layer.path, c.name)] = (
                    f"{hardware.name} does not run {c.compute_format(hardware.reference)} natively"
                )
            elif c.name not in scores[layer.path]:
                notes[(layer.path, c.name)] = "no sensitivity for this candidate"
            else:
                objective[i, j] = _finite_score(layer.path, c.name, scores[layer.path][c.name])
        if not np.isfinite(objective[i]).any():
            raise ValueError(
                f"build_problem: no candidate is allowed for layer {layer.path!r}: "
                + "; ".join(f"{c.name}: {notes.get((layer.path, c.name))}" for c in candidates)
            )
    return Problem(layers, candidates, objective, costs, notes)
