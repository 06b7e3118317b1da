"""Fake quantization of a weight shard inside a ``jax.shard_map`` body, equal to the same
part of the whole weight's.

A weight split along an axis its scale reduces over (a row-parallel weight with one scale
per output channel, groups cut by the split) would otherwise get scales from its shard
alone, and quantization-aware training would learn against scales the deployed weight
(``qjax.quantize_params`` of the whole weight) does not have. Those axes are gathered from
the other shards, the whole is fake-quantized, and this shard's part is kept. Axes whose
shards hold whole scale groups (per-channel axes, groups that tile the shard) stay local.
With stochastic rounding every split axis is gathered, so the noise is the whole weight's.
"""

from __future__ import annotations

import math

import jax
from jax import lax

from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import compute_scale, quantize
from qjax.numerics.spec import QuantSpec


def fake_quant_shard(
    w: jax.Array, spec: QuantSpec, key, shard_axes: tuple[tuple[str, ...], ...]
) -> jax.Array:
    """``fake_quant`` of the shard ``w`` as part of the whole weight.

    Args:
      w: this shard of the weight (inside a ``shard_map`` body).
      spec: the weight's spec (for ``w``'s axes).
      key: PRNG key for stochastic rounding (the whole weight's).
      shard_axes: per axis of ``w``, the manual mesh axes that split it (``()``: whole).

    Returns:
      ``fake_quant(whole, spec, key=key)`` restricted to this shard.
    """
    dims = _axes_to_gather(w, spec, shard_axes)
    if not dims:
        return fake_quant(w, spec, key=key)
    whole = w
    for d in dims:
        whole = lax.all_gather(whole, shard_axes[d], axis=d, tiled=True)
    y = fake_quant(whole, spec, key=key)
    for d in dims:
        n = w.shape[d]
        y = lax.dynamic_slice_in_dim(y, lax.axis_index(shard_axes[d]) * n, n, axis=d)
    return y


def quantize_shard(w: jax.Array, spec: QuantSpec, shard_axes: tuple[tuple[str, ...], ...]) -> QArray | None:
    """``quantize`` of the shard ``w`` with the whole weight's scales (what
    ``quantize_params`` of the whole weight holds for this part), for serving a float leaf
    inside a ``shard_map`` body; ``None`` when the whole weight's scale groups straddle
    the shards (no QArray of the shard holds them: serve the dequantized values of
    :func:`fake_quant_shard`).

    Args:
      w, spec, shard_axes: as :func:`fake_quant_shard` (rounding to nearest).
    """
    dims = _axes_to_gather(w, spec, shard_axes)
    if not dims:
        return quantize(w, spec)
    whole = w
    for d in dims:
        whole = lax.all_gather(whole, shard_axes[d], axis=d, tiled=True)
    scale, zero_point = compute_scale(whole, spec)
    parts = [scale, zero_point]
    for d in dims:
        n, sd = w.shape[d], scale.shape[d]
        if sd == 1:
            continue  # one scale along d: the same on every shard
        group = 1 if sd == whole.shape[d] else _group_length(spec, w.ndim, d, whole.shape[d], sd)
        if n % group:
            return None  # a group straddles two shards
        per = n // group  # scales per shard
        start = lax.axis_index(shard_axes[d]) * per
        parts = [None if a is None else lax.dynamic_slice_in_dim(a, start, per, axis=d) for a in parts]
    return quantize(w, spec, scale=parts[0], zero_point=parts[1])


def _axes_to_gather(w: jax.Array, spec: QuantSpec, shard_axes) -> list[int]:
    split = [d for d, axes in enumerate(shard_axes) if axes]
    if not split or spec.rounding == "stochastic":
        return split
    counts = [math.prod(lax.axis_size(a) for a in axes) for axes in shard_axes]
    whole_shape = tuple(n * c for n, c in zip(w.shape, counts))
    scale = jax.eval_shape(lambda a: compute_scale(a, spec)[0], jax.ShapeDtypeStruct(whole_shape, w.dtype))
    if len(scale.shape) != w.ndim:
        return split
    dims = []
    tile = spec.tile(w.ndim)
    for d in split:
        if tile is not None and d == tile[0] % w.ndim and w.shape[d] % tile[1]:
            dims.append(d)  # tiles straddle the shards: each shard would see part of a tile
            continue
        if scale.shape[d] == whole_shape[d]:
            continue  # one scale per element along d: nothing is shared across shards
        group = _group_length(spec, w.ndim, d, whole_shape[d], max(scale.shape[d], 1))
        if scale.shape[d] == 1 or w.shape[d] % group:
            dims.append(d)  # the scale reduces across the shards
    return dims


def _group_length(spec: QuantSpec, ndim: int, d: int, length: int, scales: int) -> int:
    """Elements per scale along axis ``d`` (of ``length``, with ``scales`` scales): the
    spec's group size on its group axis (with ``pad_groups`` the last group is short, so
    ``length / scales`` would undercount it), else ``length / scales``."""
    if spec.group_size is not None and spec.group_axis % ndim == d:
        return spec.group_size
    return -(-length // scales)
