"""Static (calibrated) scales for the matmuls between two activations that an
:class:`~qjax.quant.policy.OpRule` quantizes.

``qjax.calibrate`` records the per-tensor range of each operand whose ``OpRule`` spec is
per tensor (``channel_axes=()``), keyed ``"op:<name stack>:lhs"`` / ``":rhs"`` beside the
leaf paths of the weight ops. ``qjax.quantized(f, policy, op_stats=stats)`` and
``qjax.fake_quantized(f, policy, act_stats=stats)`` then quantize those operands with the
recorded scale instead of one computed per call (a static int8 KV cache read, static
attention probabilities). ``quantize_params`` ignores these entries: no weight holds them.
An op inside an ``nn.scan`` stack has one name stack for every layer, so its range is
pooled over the layers (min / max).

``lhs`` / ``rhs`` are the operands of the ``dot_general`` the op lowers to, which is not
always the order the einsum names them in: Flax's (Linen and NNX) attention computes
``PV`` as ``einsum("...hqk,...khd->...qhd", probs, value)``, which lowers to
``dot_general(value, probs)``, so there ``lhs`` is the value and ``rhs`` the
probabilities. ``qjax.graph.find_ops`` / ``jax.make_jaxpr`` show the operands' shapes.

With ``fake_quantized(..., act_stats_momentum=m)`` an op entry moves like a weight op's.
Inside a scan stack each layer quantizes with its own moved range while the returned
entry pools them (min / max), so training sees per-layer scales that the served (pooled)
scale coarsens; a stack's op scales are best calibrated with ``qjax.calibrate``. With a
``qjax.DelayedScaling`` every layer quantizes with the entry's one history range and the
layers' batch ranges are pooled into the pushed one.
"""

from __future__ import annotations

from qjax.numerics.spec import PER_TOKEN, QuantSpec

PREFIX = "op:"
SIDES = ("lhs", "rhs")


def op_key(scope: str, side: str) -> str:
    """The stats key of operand ``side`` (``"lhs"`` / ``"rhs"``) of the op at ``scope``."""
    return f"{PREFIX}{scope}:{side}"


def is_op_key(key: str) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX)


def split(stats: dict | None) -> tuple[dict, dict]:
    """``(leaf entries, op entries)`` of a ``calibrate`` result."""
    stats = stats or {}
    ops = {k: v for k, v in stats.items() if is_op_key(k)}
    return {k: v for k, v in stats.items() if k not in ops}, ops


def is_static(spec: QuantSpec | None) -> bool:
    """Whether an ``OpRule`` operand spec is per tensor, so calibrated ranges fit it."""
    return (
        spec is not None
        and spec.channel_axes is not PER_TOKEN
        and not spec.channel_axes
        and spec.group_size is None
    )


def pool_layers(lo, hi, ndim: int = 0) -> tuple:
    """A range ``(lo, hi)`` with its axes beyond the last ``ndim`` pooled (min / max): an op
    of a scan body has one name stack for every layer, so one scale for the stack."""
    import jax.numpy as jnp

    axes = tuple(range(jnp.ndim(lo) - ndim))
    return (jnp.nanmin(lo, axis=axes), jnp.nanmax(hi, axis=axes)) if axes else (lo, hi)


def scope_side(key: str) -> tuple[str, str]:
    """``(scope, side)`` of an op stats key."""
    scope, side = key[len(PREFIX) :].rsplit(":", 1)
    return scope, side


class Lookup:
    """The op stats a transform was given, the static scale of each operand, and which
    entries an op used (an entry no op uses is a typo or another model's)."""

    def __init__(self, op_stats: dict, momentum=None):
        from qjax.quant.act_delayed import ActHistory
        from qjax.quant.calibrate import ActStats

        bad = [k for k, v in op_stats.items() if not isinstance(v, ActStats)]
        if bad:
            hint = any(isinstance(op_stats[k], ActHistory) for k in bad)
            raise TypeError(
                f"op stats {bad} must be ActStats, as qjax.calibrate returns them"
                + (" (an ActHistory: give DelayedScaling.ranges(histories))" if hint else "")
            )
        self.stats, self.used, self.momentum = dict(op_stats), set(), momentum
        self.without_entry: set[str] = set()  # running stats: per-tensor operands left dynamic

    def scale(self, scope: str, side: str, spec: QuantSpec | None, operand=None, emit=None) -> tuple | None:
        """``(scale, zero_point)`` for operand ``side`` of the op at ``scope``, or ``None``
        (dynamic) without an entry. With a ``momentum`` (running averages) the entry's range
        is first moved toward ``operand``'s and the moved range ``emit``-ted.

        Raises:
          ValueError: an entry for an operand whose spec is not per tensor.
        """
        from qjax.quant import act_ema  # these import the policy modules
        from qjax.quant.transforms import _static_act_scale

        key = op_key(scope, side)
        if key not in self.stats:
            if self.momentum is not None and self.stats and is_static(spec):
                self.without_entry.add(key)
            return None
        self.used.add(key)
        if spec is None:
            raise ValueError(f"op stats {key!r} given, but the matching op rule keeps that operand float")
        if not is_static(spec):
            raise ValueError(
                f"op stats {key!r} given, but the {side} spec of the matching op rule is not per-tensor "
                f"(channel_axes={spec.channel_axes}): static scales are per tensor"
            )
        stats = self.stats[key]
        if self.momentum is not None:
            return act_ema.moved_scale(key, (stats.lo, stats.hi), spec, operand, self.momentum, emit)
        return _static_act_scale(stats, spec)

    def check_all_used(self) -> None:
        unused = sorted(set(self.stats) - self.used)
        if unused:
            raise ValueError(
                f"op stats {unused} match no matmul between two activations that an OpRule quantizes "
                "(their name stacks changed, or the stats belong to another model)"
            )
