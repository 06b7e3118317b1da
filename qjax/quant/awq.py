"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration"): protect salient weight rows by scaling them up before weight-only
quantization, and the activations down by the same per-input-channel factor.

For each group of matmuls reading one activation (see :func:`qjax.graph.fold.fold_groups`)
the factor is ``s(α) = mean|x|^α`` (clamped below at 1e-4), normalised by
``sqrt(max(s)·min(s))`` as in the reference implementation, with ``α`` chosen on the
reference grid ``{0, 1/grid, …, (grid−1)/grid}`` by minimising the group's output error
on the calibration data. Instead of re-running the layer on sampled tokens, the error is
the exact quadratic form with the layer-input Gram matrix ``H = XᵀX / rows``::

    err(α) = Σ_layers Σ_n Δ[:, n]ᵀ H Δ[:, n],    Δ = Q(diag(s)·W) / s − W

(``Q``: the policy's weight quantizer; ``W`` as ``[K, N]``), i.e. the mean squared output
error per token. The search is one jitted program per layer shape, the grid evaluated
with ``vmap`` in memory-bounded chunks. ``α = 0`` gives ``s = 1`` exactly (round to
nearest); ties go to the smaller ``α``. The factor is computed in log space so that
uniform activation magnitudes give ``s = 1`` exactly for every ``α``.

Optionally (``clip=True``) AWQ's weight clipping search follows: for each quantization
group (rows) and output column of the scaled weight, the clipping threshold
``r·max|w|`` with ``r ∈ {1, 1 − 1/clip_grid, …}`` down to ``1 − max_shrink`` that minimises
that group's output error ``Δ_gᵀ H_gg Δ_g`` (the reference's per-group objective, with
the exact Gram block of the smoothed input instead of 512 sampled tokens). The reference
skips ``q``/``k`` projections (their error is amplified by ``q·kᵀ``); pass ``clip_skip``
patterns to do the same.

Statistics of all layers are collected on the float model in one pass ("non-sequential"
AWQ, like :func:`qjax.quant.gptq.gptq`); the reference applies layers' scales in order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.graph.fold import FoldGroup, fold_groups
from qjax.graph.statistics import gram, input_statistics
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.granularity import normalize_axis
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.calibrate import calibrate
from qjax.quant.policy import Policy
from qjax.quant.smoothing import row_factor, smooth, with_input_scales
from qjax.quant.transforms import quantize_params, require_float_params
from qjax.rules import leaves_with_paths, map_with_path

_CHUNK_BYTES = 1 << 28  # memory bound for one vmapped chunk of the grid


@dataclasses.dataclass(frozen=True)
class AWQSearch:
    """The scale search of one group: chosen ``alpha``, its factor ``s`` and the error of
    every grid point (``errors[0]`` is round-to-nearest)."""

    alpha: float
    scale: jax.Array
    alphas: np.ndarray
    errors: np.ndarray


def awq_scale(x_abs_mean: jax.Array, alpha) -> jax.Array:
    """``s = max(x^α, 1e-4) / sqrt(max·min)``, computed in log space (exactly 1 for α=0 or
    uniform ``x``)."""
    log_s = jnp.maximum(alpha * jnp.log(jnp.maximum(x_abs_mean, 1e-30)), jnp.log(1e-4))
    return jnp.exp(log_s - (jnp.max(log_s) + jnp.min(log_s)) / 2)


def _matrix(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """A leaf as ``[K, N]``: contracted ``axes`` first (leaf order), flattened."""
    rest = [a for a in range(w.ndim) if a not in axes]
    k = int(np.prod([w.shape[a] for a in axes]))
    return jnp.transpose(w, (*axes, *rest)).reshape(k, -1)


def awq_error(
    w: jax.Array,
    h: jax.Array,
    s: jax.Array,
    spec: QuantSpec,
    axes: tuple[int, ...] = (0,),
    groups: tuple[int, ...] = (),
) -> jax.Array:
    """``Σ_n Δ[:, n]ᵀ H Δ[:, n]`` with ``Δ = Q(diag(s)·W)/s − W`` (leaf layout for ``Q``).

    Args:
      w: the float weight leaf.
      h: ``[K, K]`` input Gram matrix (``XᵀX``, or its mean per row); for expert weights
        (``groups``), one per expert ``[*experts, K, K]``, each expert's ``Δ`` against its own.
      s: ``[K]`` factor (shared by the experts).
      spec: the weight's quantization spec (applied to the scaled leaf).
      axes: the leaf's contracted axes (``K``'s order).
      groups: the leaf axes that index experts (in leaf order), ``()`` for a plain weight.
    """
    w = jnp.asarray(w, jnp.float32)
    sb = row_factor(s, w.shape, axes)
    delta = fake_quant(w * sb, spec) / sb - w
    if not groups:
        delta = _matrix(delta, axes)
        return jnp.sum(delta * jnp.dot(h, delta, precision=lax.Precision.HIGHEST))
    rest = [a for a in range(w.ndim) if a not in axes and a not in groups]
    k = h.shape[-1]
    delta = jnp.transpose(delta, (*groups, *axes, *rest)).reshape(-1, k, math.prod(w.shape[a] for a in rest))
    hd = jnp.einsum("gkl,gln->gkn", h.reshape(-1, k, k), delta, precision=lax.Precision.HIGHEST)
    return jnp.sum(delta * hd)


@functools.partial(jax.jit, static_argnames=("specs", "axes", "groups", "chunk"))
def _grid_errors(x_mean, ws, hs, alphas, specs, axes, groups, chunk):
    def one(alpha):
        s = awq_scale(x_mean, alpha)
        return sum(awq_error(*args) for args in zip(ws, hs, [s] * len(ws), specs, axes, groups))

    return lax.map(one, alphas, batch_size=chunk)


def awq_search(
    x_abs_mean: jax.Array,
    weights: list,
    hessians: list,
    specs: list[QuantSpec],
    axes: list[tuple[int, ...]] | None = None,
    *,
    grid: int = 20,
    groups: list[tuple[int, ...]] | None = None,
) -> AWQSearch:
    """Grid search of the AWQ factor for weights that read one activation.

    Args:
      x_abs_mean: ``[K]`` per-channel ``mean|x|``.
      weights: the float weight leaves of the group.
      hessians: their ``[K, K]`` input Gram matrices (the same for a group reading one input).
      specs: their weight specs.
      axes: their contracted axes (default ``(0,)`` each).
      grid: grid points ``α = i/grid``, ``i < grid``.
      groups: their expert axes (default ``()`` each); an expert weight's Hessian holds
        one ``[K, K]`` matrix per expert (see :func:`awq_error`).

    Returns:
      :class:`AWQSearch` with the minimising ``α`` (the smallest on ties).
    """
    if grid < 1:
        raise ValueError(f"awq: grid must be >= 1, got {grid}")
    axes = [(0,)] * len(weights) if axes is None else axes
    groups = [()] * len(weights) if groups is None else groups
    alphas = np.arange(grid) / grid
    per_alpha = sum(int(np.prod(np.shape(w))) for w in weights) * 16
    chunk = int(max(1, min(grid, _CHUNK_BYTES // max(per_alpha, 1))))
    errors = _grid_errors(
        jnp.asarray(x_abs_mean, jnp.float32),
        tuple(jnp.asarray(w, jnp.float32) for w in weights),
        tuple(jnp.asarray(h, jnp.float32) for h in hessians),
        jnp.asarray(alphas, jnp.float32),
        tuple(specs),
        tuple(tuple(a) for a in axes),
        tuple(tuple(g) for g in groups),
        chunk,
    )
    errors = np.asarray(errors)
    best = int(np.argmin(np.where(np.isnan(errors), np.inf, errors)))
    scale = awq_scale(jnp.asarray(x_abs_mean, jnp.float32), jnp.float32(alphas[best]))  # as searched
    return AWQSearch(float(alphas[best]), scale, alphas, errors)


def _clip_layout(spec: QuantSpec, shape: tuple[int, ...], axes: tuple[int, ...]) -> int | None:
    """Rows per clipping group for a 2-D ``[K, N]`` leaf with per-column scales, else None
    (tile scales too: their columns share a tile's range, so per-column thresholds interact)."""
    if len(shape) != 2 or axes != (0,) or spec.channel_axes is PER_TOKEN or spec.tile_size is not None:
        return None
    if tuple(normalize_axis(a, 2, "channel_axes") % 2 for a in spec.channel_axes) != (1,):
        return None
    if spec.group_size is None:
        return shape[0]
    if normalize_axis(spec.group_axis, 2, "group_axis") % 2 != 0 or shape[0] % spec.group_size:
        return None
    return spec.group_size


@functools.partial(jax.jit, static_argnames=("spec", "group", "ratios"))
def _clip(w, h, spec, group, ratios):
    k, n = w.shape
    wg = w.reshape(k // group, group, n)
    blocks = jnp.stack([h[i : i + group, i : i + group] for i in range(0, k, group)])
    top = jnp.max(jnp.abs(wg), axis=1, keepdims=True)

    def err(r):
        clipped = jnp.clip(wg, -r * top, r * top)
        d = fake_quant(clipped.reshape(k, n), spec).reshape(wg.shape) - wg
        return jnp.einsum("gkn,gkl,gln->gn", d, blocks, d, precision=lax.Precision.HIGHEST)

    errs = lax.map(err, jnp.asarray(ratios, jnp.float32))  # [R, G, N]
    best = jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)][:, None, :]
    return jnp.clip(wg, -best * top, best * top).reshape(k, n)


def awq_clip(
    w: jax.Array, h: jax.Array, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5
) -> jax.Array:
    """AWQ's clipping search for one ``[K, N]`` weight (per-column, optionally grouped
    along K): the weight clipped per (group, column) at the best ``r·max|w|``.

    Raises:
      ValueError: the spec is not per output column (grouped along axis 0 dividing K).
    """
    group = _clip_layout(spec, tuple(np.shape(w)), (0,))
    if group is None:
        raise ValueError(
            "awq_clip: needs a 2-D kernel with per-column scales, groups along axis 0 dividing K"
        )
    ratios = tuple(1.0 - i / grid for i in range(max(1, int(max_shrink * grid))))
    return _clip(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), spec, group, ratios).astype(
        jnp.asarray(w).dtype
    )


def _total_rows(stat) -> int:
    """The activation rows a statistic summed (of all experts), at least 1."""
    return max(int(np.sum(stat.rows)), 1)


def awq_factors(
    f: Callable,
    params: Any,
    batches: Iterable,
    policy: Policy,
    *,
    grid: int = 20,
    groups: list[FoldGroup] | None = None,
    **kwargs,
) -> tuple[dict[tuple[str, ...], jax.Array], dict[tuple[str, ...], AWQSearch], dict[str, tuple]]:
    """Search AWQ factors for every group with a quantized weight.

    Expert weights (a ``lax.ragged_dot``'s ``(G, K, N)``, or a ``dot_general`` with the
    experts as batch dimensions) share one factor, searched on the sum of every expert's
    error against its own tokens' Gram matrix (all divided by the tokens of all experts,
    so each expert weighs by its share of the tokens), with ``mean|x|`` over all tokens.

    Returns:
      ``(factors {group paths: s}, searches {group paths: AWQSearch}, inputs {path: (H,
      axes)})`` with ``H = XᵀX / rows`` of the float model's layer input and the weight's
      contracted axes (for experts, ``H`` is ``[*experts, K, K]``: each expert's ``XᵀX``
      divided by all experts' rows).
    """
    require_float_params(params, "awq")
    batches = list(batches)
    if not batches:
        raise ValueError("awq needs at least one batch")
    if groups is None:
        first = batches[0] if isinstance(batches[0], tuple) else (batches[0],)
        groups = fold_groups(f, params, *first, **kwargs)
    quantized = [p for g in groups for p in g.paths if policy.weight_spec(p) is not None]
    if not quantized:
        return {}, {}, {}
    stats = input_statistics(
        f,
        params,
        batches,
        lambda r: {"abs": jnp.sum(jnp.abs(r), 0), "gram": gram(r)},
        patterns=[re.escape(p) for p in quantized],
        grouped=True,
        **kwargs,
    )
    leaves = dict(leaves_with_paths(params))
    factors, searches, grams = {}, {}, {}
    for g in groups:
        for key in [g.paths] if g.foldable else [(p,) for p in g.paths]:
            qp = [p for p in key if p in stats]
            if not qp:
                continue
            for p in qp:
                if stats[p].depth:
                    raise ValueError(f"awq {p!r}: the weight is read inside a scan over stacked params")
                if policy.weight_spec(p).rounding != "nearest":
                    raise ValueError(f"awq {p!r}: the weight spec must round to nearest")
                grams[p] = (stats[p].value["gram"] / _total_rows(stats[p]), stats[p].weight_axes)
            first = stats[qp[0]]
            x_abs = first.value["abs"]
            x_mean = (jnp.sum(x_abs, axis=tuple(range(len(first.groups)))) if first.groups else x_abs) / (
                _total_rows(first)
            )
            try:
                search = awq_search(
                    x_mean,
                    [leaves[p] for p in qp],
                    [grams[p][0] for p in qp],
                    [policy.weight_spec(p) for p in qp],
                    [stats[p].weight_axes for p in qp],
                    grid=grid,
                    groups=[stats[p].groups for p in qp],
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"awq {list(qp)}: {e}") from e
            factors[key], searches[key] = search.scale, search
    return factors, searches, grams


def awq(
    f: Callable,
    params: Any,
    batches: Iterable,
    policy: Policy,
    *,
    grid: int = 20,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    clip_skip: str | tuple[str, ...] = (),
    **kwargs,
) -> tuple[Any, dict[str, jax.Array]]:
    """AWQ: search per-input-channel factors, apply them (folded where possible), optionally
    search clipping thresholds, and quantize with ``policy``.

    Args:
      f: ``f(params, *args, **kwargs)``.
      params: float params.
      batches: calibration batches (tuples of positional args; iterated more than once).
      policy: the :class:`qjax.Policy`; its weight specs define ``Q`` (e.g. int4,
        ``channel_axes=(-1,)``, ``group_size=128, group_axis=0``). Leaves without a weight
        spec are neither searched nor quantized (they may still be rescaled as part of a
        group or as a fold target, exactly).
      grid: α grid size (reference: 20).
      clip: also run the clipping search (2-D kernels with per-column, K-grouped scales).
      clip_grid, max_shrink: clipping ratios ``1 − i/clip_grid`` down to ``1 − max_shrink``.
      clip_skip: path regex(es) (``re.fullmatch``) not to clip, e.g. ``r".*/(q|k)_proj/kernel"``.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``(qparams, runtime factors)``: run with
      ``qjax.quantized(with_input_scales(f, runtime), policy)(qparams, x)``. Static
      per-tensor activation scales of the policy are calibrated on the smoothed function.

    Raises:
      ValueError: no batches, a weight inside a ``scan`` or with stochastic rounding,
        a spec that does not fit a leaf (names the path).

    Example:
      >>> spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=128, group_axis=0)
      >>> policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=spec)])
      >>> qparams, runtime = awq(model.apply, variables, calib, policy)
      >>> y = qjax.quantized(with_input_scales(model.apply, runtime), policy)(qparams, x)
    """
    require_float_params(params, "awq")
    batches = list(batches)
    if not batches:
        raise ValueError("awq needs at least one batch")
    example = batches[0] if isinstance(batches[0], tuple) else (batches[0],)
    groups = fold_groups(f, params, *example, **kwargs)
    factors, _, grams = awq_factors(f, params, batches, policy, grid=grid, groups=groups, **kwargs)
    smoothed, runtime = smooth(f, params, factors, *example, groups=groups, **kwargs)
    if clip:
        scale_of = {p: s for key, s in factors.items() for p in key}
        skip = (clip_skip,) if isinstance(clip_skip, str) else tuple(clip_skip)

        def clip_leaf(path, leaf):
            spec = policy.weight_spec(path)
            if path not in grams or any(re.fullmatch(p, path) for p in skip):
                return leaf
            if grams[path][0].ndim != 2:  # experts (one Gram matrix each): not clipped
                return leaf
            if _clip_layout(spec, tuple(np.shape(leaf)), grams[path][1]) is None:
                return leaf
            s = scale_of[path]
            h = grams[path][0] / (s[:, None] * s[None, :])  # the Gram matrix of x / s
            return awq_clip(leaf, h, spec, grid=clip_grid, max_shrink=max_shrink)

        smoothed = map_with_path(clip_leaf, smoothed)
    act_stats = None
    if any(
        r.act is not None and r.act.channel_axes is not PER_TOKEN and r.weight is not None
        for r in policy.rules
    ):
        act_stats = calibrate(with_input_scales(f, runtime), policy, smoothed, batches, **kwargs)
    return quantize_params(smoothed, policy, act_stats=act_stats), runtime
