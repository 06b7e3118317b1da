"""Static :class:`~qjax.quant.kv_cache.KVCache` scales from ``qjax.calibrate``.

The fp8 KV-cache recipe of serving stacks (one ``k_scale`` and one ``v_scale`` per layer,
from calibration data) needs the ranges of the keys and values the model attends over.
``qjax.calibrate`` already records them: an :class:`~qjax.quant.policy.OpRule` with a
per-tensor spec on the key side of ``q @ k.T`` and the value side of ``probs @ v`` makes it
record ``"op:<name stack>:lhs"`` / ``":rhs"`` ranges of those operands (see
:mod:`qjax.quant.op_stats` for which side is which). :func:`kv_cache_scales` turns two such
entries into the keyword arguments of :meth:`KVCache.init`.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.scaling import scale_from_range
from qjax.numerics.spec import QuantSpec
from qjax.quant import op_stats
from qjax.quant.act_delayed import ActHistory
from qjax.quant.calibrate import ActStats
from qjax.quant.transforms import _check_range


def kv_cache_scales(
    stats: dict[str, Any],
    *,
    keys: str,
    values: str,
    spec: QuantSpec,
    value_spec: QuantSpec | None = None,
) -> dict[str, Any]:
    """``k_scale`` / ``k_zero_point`` / ``v_scale`` / ``v_zero_point`` for
    :meth:`qjax.KVCache.init` from two entries of a :func:`qjax.calibrate` result.

    Which operand of an attention einsum is ``lhs`` and which ``rhs`` is the order of the
    ``dot_general`` jnp lowers it to, not the order the einsum names them in (``find_ops``
    or ``jax.make_jaxpr`` show it). For Flax's layout ``(batch, length, heads, head_dim)``:
    the keys are the ``rhs`` of ``q·kᵀ`` (``"...qhd,...khd->...hqk"``) and the values the
    ``lhs`` of ``p·v`` (``"...hqk,...khd->...qhd"`` lowers to ``dot_general(v, p)``); for a
    head-major ``"bhqk,bhkd->bhqd"`` the values are the ``rhs``. A ``values`` range within
    ``[0, 1]`` warns: it is most likely the attention probabilities.

    Calibrate with ``OpRule`` specs of the cache's symmetry: a symmetric spec records
    ``±absmax``, which an asymmetric cache spec would widen to a coarser scale.

    Args:
      stats: what ``qjax.calibrate`` returned for a policy whose ``OpRule`` specs are per
        tensor on the attention's key and value operands (an op inside an ``nn.scan`` stack
        has one range pooled over its layers, so every layer gets one scale). Traced stats
        (under ``jit``) are taken unchecked.
      keys, values: the ``"op:<name stack>:lhs"`` / ``":rhs"`` keys of the keys' and the
        values' ranges.
      spec, value_spec: the cache's static specs, as passed to ``KVCache.init`` (its format,
        symmetry and scale dtype map the range to a scale; ``value_spec`` defaults to
        ``spec``). The scalar scale broadcasts over any static layout (per tensor, head or
        channel).

    Returns:
      ``{"k_scale", "k_zero_point", "v_scale", "v_zero_point"}`` (zero points ``None`` for
      symmetric specs): ``KVCache.init(spec, ..., **kv_cache_scales(...))``.

    Raises:
      KeyError: a key not in ``stats`` (the message lists the op entries it has).
      ValueError: a key that is not an op entry (a weight op's input range), a range that is
        NaN (the op never ran on the calibration data) or infinite, or not one range.
      TypeError: a spec that is not a ``QuantSpec``, or an ``ActHistory`` entry (delayed
        scaling's state: give ``DelayedScaling.ranges`` of it).

    Warns:
      UserWarning: a ``values`` range like the probabilities' (see above).

    Example:
      >>> fp8 = qjax.QuantSpec(qjax.fp8_e4m3)
      >>> policy = qjax.Policy([qjax.OpRule(r".*attn.*", lhs=fp8, rhs=fp8)])
      >>> stats = qjax.calibrate(model.apply, policy, variables, batches)
      >>> scales = qjax.kv_cache_scales(stats, keys="op:.../attn/...qhd,...khd->...hqk:rhs",
      ...                               values="op:.../attn/...hqk,...khd->...qhd:lhs", spec=fp8)
      >>> cache = qjax.KVCache.init(fp8, batch=8, length=4096, heads=8, head_dim=128, **scales)
    """
    value_spec = spec if value_spec is None else value_spec
    out = {}
    for side, arg, key, sp in (("k", "keys", keys, spec), ("v", "values", values, value_spec)):
        if not isinstance(sp, QuantSpec):
            raise TypeError(f"{'spec' if side == 'k' else 'value_spec'} must be a QuantSpec, got {sp!r}")
        have = sorted(k for k in stats if op_stats.is_op_key(k))
        if key not in stats:
            raise KeyError(
                f"{arg}={key!r} is not in the calibration stats; its op entries are {have} (an "
                "OpRule with a per-tensor spec on that operand records one)"
            )
        if not op_stats.is_op_key(key):
            raise ValueError(
                f"{arg}={key!r} is a weight op's input range, not an attention operand's; the op "
                f"entries are {have}"
            )
        entry = stats[key]
        if isinstance(entry, ActHistory):
            raise TypeError(
                f"stats[{key!r}] is an ActHistory (delayed scaling's running state): give "
                "DelayedScaling.ranges(histories)"
            )
        lo, hi = (jnp.asarray(v, jnp.float32) for v in (entry.lo, entry.hi))
        if jnp.ndim(lo) or jnp.ndim(hi):
            raise ValueError(f"stats[{key!r}] is not one range (shape {jnp.shape(lo)}): pass an op entry")
        _check_concrete(key, side, lo, hi)
        scale, zero_point = scale_from_range(lo, hi, sp.format, sp.symmetric, sp.scale_dtype)
        out[f"{side}_scale"], out[f"{side}_zero_point"] = scale, zero_point
    return out


def _check_concrete(key: str, side: str, lo, hi) -> None:
    """Refuse a non-finite range (the check static activation scales use) and warn on a
    values range like the probabilities'; traced ranges pass."""
    try:
        _check_range(ActStats(lo, hi))
    except ValueError as e:
        raise ValueError(f"stats[{key!r}]: {e}") from None
    try:
        lo, hi = float(np.asarray(lo)), float(np.asarray(hi))
    except jax.errors.TracerArrayConversionError:
        return
    # probabilities: [0, <= 1] by min / max, [-a, a] with a <= 1 by a symmetric calibrator
    if side == "v" and 0.0 < hi <= 1.0 and (lo >= 0.0 or lo == -hi):
        warnings.warn(
            f"values={key!r} has the range [{lo:g}, {hi:g}], within [-1, 1]: it looks like the "
            "attention probabilities, the other operand of that einsum (see kv_cache_scales' "
            "docstring on which side is which)",
            stacklevel=3,
        )
