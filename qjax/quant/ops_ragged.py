"""``quantized_ragged_dot``: ``lax.ragged_dot``, the grouped matmul of mixture-of-experts
layers, with a quantized expert weight.

``lax.ragged_dot(lhs, rhs, group_sizes)`` multiplies the rows of ``lhs`` ``(M, K)``, sorted
by expert, by that expert's ``(K, N)`` slice of ``rhs`` ``(G, K, N)``. With the weight a
``QArray`` whose scales are constant along K (per expert and output channel, per output
channel or per tensor), the codes go into the ragged dot as they are and the scales come
out after it: each row's output channels take the scales of the expert the row belongs to.

* Both operands integer (the activation quantized on the fly, or a static scale from
  calibration), codes of 8 bits or fewer, no zero points: an int8 x int8 -> int32
  ``ragged_dot``.
* Otherwise (a float activation, fp8 / codebook weights, zero points): the codes converted to
  a float dtype in which they are exact, a float ``ragged_dot``, then the scales.

Differentiable in the activation, straight-through (as ``quantized_dot_general``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.numerics.qarray import QArray
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant import ops_common as oc


@dataclasses.dataclass(frozen=True)
class _Config:
    lhs_spec: QuantSpec | None  # resolved (PER_TOKEN -> rows)
    out_dtype: Any


def check_weight(rhs: QArray) -> str | None:
    """Why ``rhs`` cannot run as codes in a ragged dot (its scales vary along K, or it is
    not 3-D), or ``None``. Takes abstract QArrays (``jax.eval_shape``) too."""
    if len(rhs.shape) != 3:
        return f"the weight must be (experts, K, N), got shape {rhs.shape}"
    if rhs.group_axis is not None or rhs.scale.shape[1] != 1:
        return "its scales vary along K (groups along the summed axis): it runs dequantized"
    return None


def valid_rows(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``(M, 1)`` booleans: the rows of ``x`` inside the groups (``lax.ragged_dot`` ignores
    the rest)."""
    return (jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None]


def grouped_rows(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x`` with the rows past the last group zeroed: ``lax.ragged_dot`` ignores them, so
    they must not set a per-tensor scale or a calibrated range either (padding of 1e4 or
    NaN made every real row's output wrong). Zeros leave max-based ranges as they are; a
    percentile or a histogram must also skip them (:func:`valid_rows`)."""
    return jnp.where(valid_rows(x, group_sizes), x, jnp.zeros((), x.dtype))


def row_spec(spec: QuantSpec) -> QuantSpec:
    """An activation spec for the ``(M, K)`` rows of a ragged dot: ``PER_TOKEN`` is one
    scale per row."""
    return spec.replace(channel_axes=(0,)) if spec.channel_axes is PER_TOKEN else spec


def _row_scales(scale: jax.Array, group_sizes: jax.Array, m: int) -> jax.Array:
    """The ``(M, N or 1)`` scales of each row: those of the expert the row belongs to
    (rows past the last group produce zeros in the ragged dot; they take the last's)."""
    s = scale[:, 0, :]  # (G or 1, N or 1)
    if s.shape[0] == 1:
        return s
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(m), side="right")
    return s[jnp.minimum(expert, s.shape[0] - 1)]


def _impl(cfg: _Config, lhs, rhs: QArray, group_sizes, lhs_scale, lhs_zero_point, key):
    rows = lhs if cfg.lhs_spec is None else grouped_rows(lhs, group_sizes)  # padding sets no scale
    a = oc.prepare("lhs", rows, cfg.lhs_spec, lhs_scale, lhs_zero_point, key)
    a = oc.unpacked(a) if a.kind == "int" else a
    b = oc.unpacked(oc.from_qarray("rhs", rhs))
    integer = (
        a.kind == "int"
        and b.kind == "int"
        and a.zero_point is None
        and b.zero_point is None
        and a.values.dtype == jnp.int8
        and b.values.dtype == jnp.int8
    )
    if integer:
        acc = lax.ragged_dot(a.values, b.values, group_sizes, preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * a.scale
    else:  # float32 (float64 for float64 input): codes, fp8 and codebook values are exact in it
        av = oc.dequantized(a)
        cdt = jnp.float64 if jnp.float64 in (av.dtype, b.values.dtype, b.scale.dtype) else jnp.float32
        codes = b.values.astype(cdt) if b.kind == "fp8" else oc.as_float_codes(b, cdt)
        y = lax.ragged_dot(av.astype(cdt), codes, group_sizes, preferred_element_type=cdt)
    y = y * _row_scales(b.scale, group_sizes, lhs.shape[0]).astype(y.dtype)
    return y.astype(cfg.out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _qragged(cfg: _Config, lhs, rhs, group_sizes, lhs_scale, lhs_zero_point, key):
    return _impl(cfg, lhs, rhs, group_sizes, lhs_scale, lhs_zero_point, key)


@_qragged.defjvp
def _qragged_jvp(cfg, primals, tangents):
    lhs, rhs, group_sizes, ls, lz, key = primals
    y = _qragged(cfg, *primals)
    rows = lhs if cfg.lhs_spec is None else grouped_rows(lhs, group_sizes)
    _, mask = oc._ste_surrogate(rows, cfg.lhs_spec, ls, lz, key)
    dl = tangents[0] if mask is None else tangents[0] * mask.astype(tangents[0].dtype)
    w = rhs.dequantize()
    acc = jnp.promote_types(jnp.result_type(dl, w), jnp.float32)
    dy = lax.ragged_dot(dl.astype(acc), w.astype(acc), group_sizes, preferred_element_type=acc)
    return y, dy.astype(y.dtype)


def quantized_ragged_dot(
    lhs,
    rhs: QArray,
    group_sizes,
    *,
    lhs_spec: QuantSpec | None = None,
    lhs_scale=None,
    lhs_zero_point=None,
    out_dtype=None,
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.ragged_dot(lhs, rhs, group_sizes)`` with a quantized expert weight.

    Args:
      lhs: ``(M, K)`` float activations, rows sorted by group.
      rhs: a :class:`qjax.QArray` of logical shape ``(G, K, N)``, scales constant along K
        (e.g. ``channel_axes=(0, 2)``: per expert and output channel).
      group_sizes: ``(G,)`` integer rows per group (summing to at most M; rows past the sum
        give zeros, as in ``lax.ragged_dot``, and do not count towards a shared scale).
      lhs_spec: quantize ``lhs`` on the fly (``qjax.PER_TOKEN``: one scale per row;
        ``channel_axes=()``: one per tensor); ``None``: weight-only.
      lhs_scale, lhs_zero_point: a static (calibrated) per-tensor scale / zero point for
        ``lhs_spec`` instead of the data's.
      out_dtype: result dtype (default: ``lhs``'s).
      key: PRNG key for ``rounding="stochastic"``.

    Returns:
      ``(M, N)`` array of ``out_dtype``; differentiable in ``lhs`` (straight-through its
      quantizer).

    Raises:
      TypeError: ``rhs`` is not a QArray or a spec is not a QuantSpec.
      ValueError: shapes that do not fit, a weight whose scales vary along K, or an
        activation spec whose scale varies along K.

    Example:
      >>> w = qjax.quantize(experts, qjax.QuantSpec(qjax.int8, channel_axes=(0, 2)))
      >>> per_row = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
      >>> y = qjax.quant.quantized_ragged_dot(x, w, sizes, lhs_spec=per_row)
    """
    if not isinstance(rhs, QArray):
        raise TypeError(f"rhs must be a qjax.QArray (G, K, N), got {type(rhs).__name__}")
    if lhs_spec is not None and not isinstance(lhs_spec, QuantSpec):
        raise TypeError(f"lhs_spec must be a qjax.QuantSpec or None, got {lhs_spec!r}")
    lhs, group_sizes = jnp.asarray(lhs), jnp.asarray(group_sizes)
    why = check_weight(rhs)
    if why is not None:
        raise ValueError(f"quantized_ragged_dot: rhs {rhs!r}: {why}")
    g, k, _ = rhs.shape
    if lhs.ndim != 2 or lhs.shape[1] != k:
        raise ValueError(
            f"quantized_ragged_dot: lhs must be (M, {k}) for rhs of shape {rhs.shape}, got {lhs.shape}"
        )
    if group_sizes.shape != (g,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"quantized_ragged_dot: group_sizes must be ({g},) integers, "
            f"got {group_sizes.shape} {group_sizes.dtype}"
        )
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"quantized_ragged_dot: lhs must be floating point, got {lhs.dtype}")
    spec = None if lhs_spec is None else row_spec(lhs_spec)
    if spec is not None:
        layout = spec.layout(lhs.shape)
        if layout.group_axis is not None or layout.scale_shape[1] != 1:
            raise ValueError(f"quantized_ragged_dot: lhs_spec {lhs_spec!r} varies its scale along K")
        if lhs_scale is not None and np.size(lhs_scale) != 1:
            raise ValueError("quantized_ragged_dot: lhs_scale must be one per-tensor value")
    elif lhs_scale is not None or lhs_zero_point is not None:
        raise ValueError("quantized_ragged_dot: lhs_scale / lhs_zero_point need an lhs_spec")
    cfg = _Config(spec, jnp.dtype(out_dtype if out_dtype is not None else lhs.dtype))
    return _qragged(cfg, lhs, rhs, group_sizes, lhs_scale, lhs_zero_point, key)


__all__ = ["check_weight", "grouped_rows", "quantized_ragged_dot", "row_spec"]
