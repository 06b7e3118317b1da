"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"): migrate activation outliers into the weights
before W8A8 quantization.

For each group of matmuls reading one activation, per input channel ``j``::

    s_j = max|X_j|^α / max|W_j|^(1−α)

with ``max|X_j|`` the running maximum of the channel over the calibration batches and
``max|W_j|`` the maximum over every output of every weight of the group (both clamped
below at 1e-5, as in the reference implementation). The factors are applied with
:func:`qjax.quant.smoothing.smooth`: folded into the preceding LayerNorm/linear layer where
:func:`qjax.graph.fold.fold_groups` allows it, at run time otherwise.

Per-channel maxima are collected with :func:`qjax.graph.statistics.input_statistics`
using ``combine=jnp.maximum``: its default combination sums, and summing per-batch maxima
would overstate every channel by the number of batches (and unevenly across channels of
different sparsity), so the maximum is combined as a maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from qjax.graph.fold import FoldGroup, fold_groups
from qjax.graph.statistics import InputStatistic, input_statistics
from qjax.quant.smoothing import input_axes, smooth
from qjax.quant.transforms import require_float_params
from qjax.rules import leaves_with_paths


def _args(batch) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def channel_absmax(rows: jax.Array) -> jax.Array:
    """Per-column ``max |rows|`` (a statistic for ``input_statistics(..., combine=jnp.maximum)``)."""
    return jnp.max(jnp.abs(rows), axis=0)


def weight_absmax(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``[K]``: ``max |w|`` over the non-contracted axes, contracted axes ``axes`` flattened."""
    w = jnp.abs(jnp.asarray(w, jnp.float32))
    other = tuple(a for a in range(w.ndim) if a not in axes)
    return jnp.max(w, axis=other).reshape(-1) if other else w.reshape(-1)


def _over_experts(stat: InputStatistic) -> jax.Array:
    """A per-channel maximum ``[K]``, over the experts of a grouped statistic."""
    value = stat.value
    return jnp.max(value, axis=tuple(range(len(stat.groups)))) if stat.groups else value


def smoothquant_factors(
    f: Callable,
    params: Any,
    batches: Iterable,
    *,
    alpha: float = 0.5,
    patterns=None,
    foldable_only: bool = False,
    groups: list[FoldGroup] | None = None,
    **kwargs,
) -> dict[tuple[str, ...], jax.Array]:
    """The SmoothQuant factors ``{group paths: s}`` (see the module doc).

    Args:
      f, params, batches, patterns, kwargs: as :func:`qjax.graph.statistics.input_statistics`
        (``patterns`` selects the weights to smooth; a foldable group is smoothed whole
        when any of its paths is selected).
      alpha: migration strength in ``[0, 1]`` (0: no smoothing; 1: all range to weights).
      foldable_only: smooth only groups whose factor folds into params (no runtime division).
      groups: precomputed :func:`qjax.graph.fold.fold_groups` on the first batch.

    Returns:
      ``{tuple of paths: s [K]}``; pass to :func:`qjax.quant.smoothing.smooth`.

    Raises:
      ValueError: ``alpha`` out of range, no batches, or a weight inside a ``scan``
        (stacked per-layer statistics; names the path).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    require_float_params(params, "smoothquant")
    batches = list(batches)
    if not batches:
        raise ValueError("smoothquant needs at least one batch")
    if groups is None:
        groups = fold_groups(f, params, *_args(batches[0]), **kwargs)
    stats: dict[str, InputStatistic] = input_statistics(
        f, params, batches, channel_absmax, patterns=patterns, combine=jnp.maximum, grouped=True, **kwargs
    )
    leaves = dict(leaves_with_paths(params))
    factors: dict[tuple[str, ...], jax.Array] = {}
    read_axes: dict = {}

    def _axes(path: str) -> tuple[int, ...]:
        """The weight's contracted leaf axes (each weight its own: experts ``(G, K, N)``
        beside a dense ``(K, N)`` contract different leaf axes)."""
        if path in stats:
            return stats[path].weight_axes
        if not read_axes:  # a group member the patterns did not select
            read_axes.update(input_axes(f, params, *_args(batches[0]), **kwargs))
        axes = read_axes[path]
        if isinstance(axes, Exception):
            raise axes
        return axes

    for g in groups:
        if foldable_only and not g.foldable:
            continue
        keys = [g.paths] if g.foldable else [(p,) for p in g.paths]
        for key in keys:
            measured = [p for p in key if p in stats]
            if not measured:
                continue
            for p in measured:
                if stats[p].depth:
                    raise ValueError(
                        f"smoothquant {p!r}: the weight is read inside a scan over stacked params"
                    )
            # experts (a ragged dot, or batch dimensions) share one factor: the max over experts
            act = jnp.max(jnp.stack([_over_experts(stats[p]) for p in measured]), axis=0)
            w_max = jnp.max(jnp.stack([weight_absmax(leaves[p], _axes(p)) for p in key]), axis=0)
            s = act**alpha / jnp.maximum(w_max, 1e-5) ** (1.0 - alpha)
            factors[key] = jnp.maximum(s, 1e-5)
    return factors


def smoothquant(
    f: Callable,
    params: Any,
    batches: Iterable,
    *,
    alpha: float = 0.5,
    patterns=None,
    foldable_only: bool = False,
    **kwargs,
) -> tuple[Any, dict[str, jax.Array]]:
    """Smooth ``params`` for W8A8 quantization (SmoothQuant).

    Args:
      f: ``f(params, *args, **kwargs)``.
      params: float params.
      batches: calibration batches (tuples of positional args; re-iterated, so a list).
      alpha: migration strength (0.5 in the paper; up to ~0.8 for models with large outliers).
      patterns: param-path regex(es) of the weights to smooth (default: every matmul weight).
      foldable_only: only smooth where the factor folds into params (no runtime op).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``(smoothed params, runtime factors)``. Quantize the smoothed model as usual, on the
      function ``g = with_input_scales(f, runtime)``: dynamic per-token activations
      (``act=QuantSpec(int8, channel_axes=qjax.PER_TOKEN)``) need nothing more; static
      per-tensor ones are calibrated on ``g``.

    Raises:
      ValueError: as :func:`smoothquant_factors` and :func:`qjax.quant.smoothing.smooth`.

    Example:
      >>> smoothed, runtime = smoothquant(model.apply, variables, calib, alpha=0.5)
      >>> g = with_input_scales(model.apply, runtime)
      >>> qparams = qjax.quantize_params(smoothed, policy,
      ...                                act_stats=qjax.calibrate(g, policy, smoothed, calib))
      >>> y = qjax.quantized(g, policy)(qparams, x)
    """
    require_float_params(params, "smoothquant")
    batches = list(batches)
    if not batches:
        raise ValueError("smoothquant needs at least one batch")
    example = _args(batches[0])
    groups = fold_groups(f, params, *example, **kwargs)
    factors = smoothquant_factors(
        f,
        params,
        batches,
        alpha=alpha,
        patterns=patterns,
        foldable_only=foldable_only,
        groups=groups,
        **kwargs,
    )
    return smooth(f, params, factors, *example, groups=groups, **kwargs)
