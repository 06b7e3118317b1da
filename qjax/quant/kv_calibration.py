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

from typing import Any

import jax.numpy as jnp

from qjax.numerics.scaling import scale_from_range
from qjax.numerics.spec import QuantSpec
from qjax.quant import op_stats


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

    Args:
      stats: what ``qjax.calibrate`` returned for a policy whose ``OpRule`` specs are per
        tensor on the attention's key and value operands (an op inside an ``nn.scan`` stack
        has one range pooled over its layers, so every layer gets one scale).
      keys, values: the stats keys of the keys' and the values' ranges, e.g.
        ``"op:attn/...:rhs"`` for ``q @ k.T`` and ``"op:attn/...:lhs"`` for Flax's
        ``probs @ v`` (which lowers to ``dot_general(v, probs)``).
      spec, value_spec: the cache's static specs, as passed to ``KVCache.init`` (its format
        and symmetry map the range to a scale; ``value_spec`` defaults to ``spec``). The
        scalar scale broadcasts over any static layout (per tensor, head or channel).

    Returns:
      ``{"k_scale", "k_zero_point", "v_scale", "v_zero_point"}`` (zero points ``None`` for
      symmetric specs): ``KVCache.init(spec, ..., **kv_cache_scales(...))``.

    Raises:
      KeyError: a key not in ``stats`` (the message lists the op entries it has).
      ValueError: a range that is NaN (the op never ran on the calibration data) or
        infinite, or a spec that is not a ``QuantSpec``.

    Example:
      >>> policy = qjax.Policy([qjax.OpRule(r"attn/.*", lhs=qjax.QuantSpec(qjax.fp8_e4m3),
      ...                                   rhs=qjax.QuantSpec(qjax.fp8_e4m3))])
      >>> stats = qjax.calibrate(model.apply, policy, variables, batches)
      >>> scales = qjax.kv_cache_scales(stats, keys="op:attn/...:rhs", values="op:attn/...:lhs",
      ...                               spec=qjax.QuantSpec(qjax.fp8_e4m3))
      >>> cache = qjax.KVCache.init(qjax.QuantSpec(qjax.fp8_e4m3), batch=8, length=4096,
      ...                           heads=8, head_dim=128, **scales)
    """
    value_spec = spec if value_spec is None else value_spec
    out = {}
    for side, key, sp in (("k", keys, spec), ("v", values, value_spec)):
        if not isinstance(sp, QuantSpec):
            raise ValueError(f"{'spec' if side == 'k' else 'value_spec'} must be a QuantSpec, got {sp!r}")
        if key not in stats:
            have = sorted(k for k in stats if op_stats.is_op_key(k))
            raise KeyError(
                f"{'keys' if side == 'k' else 'values'}={key!r} is not in the calibration stats; its "
                f"op entries are {have} (an OpRule with a per-tensor spec on that operand records one)"
            )
        entry = stats[key]
        lo, hi = (jnp.asarray(v, jnp.float32) for v in (entry.lo, entry.hi))
        if jnp.ndim(lo) or jnp.ndim(hi):
            raise ValueError(f"stats[{key!r}] is not one range (shape {jnp.shape(lo)}): pass an op entry")
        if not (bool(jnp.isfinite(lo)) and bool(jnp.isfinite(hi))):
            raise ValueError(
                f"stats[{key!r}] has the range [{float(lo)}, {float(hi)}]: NaN means the op never ran on "
                "the calibration data, inf that the data held infinities"
            )
        scale, zero_point = scale_from_range(lo, hi, sp.format, sp.symmetric, sp.scale_dtype)
        out[f"{side}_scale"], out[f"{side}_zero_point"] = scale, zero_point
    return out
