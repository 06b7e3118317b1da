"""Second-order loss prediction from sensitivities: :func:`perturbation` turns a per-leaf
estimate (:mod:`qjax.autoprec.sensitivity`: a Hessian or Fisher trace, a top eigenvalue, a
Fisher diagonal) into ``Ω = curvature · ‖Q(W) − W‖²`` per (leaf, candidate), the predicted
loss increase being ``½ Ω``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.autoprec.sensitivity import EigenEstimate, TraceEstimate
from qjax.numerics.fake_quant import fake_quant
from qjax.rules import leaves_with_paths


def _curvature(path: str, s: Any, leaf: Any) -> float | np.ndarray:
    """Per-element curvature of a leaf: ``Tr/n`` (trace estimate; a plain number is a
    trace), ``λ`` (eigen estimate), or the diagonal array itself."""
    if isinstance(s, TraceEstimate):
        return s.mean
    if isinstance(s, EigenEstimate):
        return s.value
    arr = np.asarray(s)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(
            f"perturbation: sensitivity of {path!r} must be a TraceEstimate, EigenEstimate, number or "
            f"diagonal array, got {s!r}"
        )
    if arr.ndim == 0:
        return float(arr) / math.prod(np.shape(leaf))
    if arr.shape != tuple(np.shape(leaf)):
        raise ValueError(
            f"perturbation: diagonal sensitivity of {path!r} has shape {arr.shape}, the leaf {np.shape(leaf)}"
        )
    return arr.astype(np.float32)


def perturbation(
    params: Any, sensitivity: Mapping[str, Any], candidates: Sequence[Candidate]
) -> dict[str, dict[str, float]]:
    """``Ω`` per (leaf, candidate): the curvature-weighted squared quantization error
    ``δ = Q(W) − W``; the second-order predicted loss increase is ``½ Ω``.

    * a :class:`TraceEstimate` (Hessian or Fisher): ``Ω = Tr/n · ‖δ‖²`` (HAWQ-V2/V3);
      a plain number is taken as a trace (divided by the leaf size);
    * an :class:`EigenEstimate`: ``Ω = λ · ‖δ‖²`` (HAWQ-V1);
    * an array of the leaf's shape (e.g. :func:`fisher_diagonal`): ``Ω = Σ d ⊙ δ²``.

    Args:
      params: float params pytree.
      sensitivity: ``{path: estimate}`` for the leaves to score.
      candidates: the :class:`Candidate` list; ``"float"``-weight candidates get 0;
        candidates whose weight spec does not fit a leaf are left out of its dict.

    Returns:
      ``{path: {candidate name: Ω}}``.

    Raises:
      ValueError: a sensitivity path is not a leaf of ``params``, or a diagonal's shape
        differs from its leaf's (the path is named). TypeError: an unknown estimate type.

    Example:
      >>> traces = hutchinson_trace(loss, variables, key, batches=[(x, y)])
      >>> omega = perturbation(variables, traces, weight_candidates())
    """
    candidates = check_candidates(candidates)
    leaves = dict(leaves_with_paths(params))
    out: dict[str, dict[str, float]] = {}
    for path, s in sensitivity.items():
        if path not in leaves:
            raise ValueError(f"perturbation: sensitivity given for {path!r}, which is not a leaf of params")
        leaf = leaves[path]
        curv = _curvature(path, s, leaf)
        row = {}
        for c in candidates:
            if c.weight is None:
                row[c.name] = 0.0
                continue
            if c.fits(leaf) is not None:
                continue
            delta = (fake_quant(leaf, c.weight) - leaf).astype(jnp.float32)
            row[c.name] = float(jnp.sum(jnp.asarray(curv, jnp.float32) * delta * delta))
        out[path] = row
    return out
