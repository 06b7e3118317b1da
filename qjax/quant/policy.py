"""Quantization policies: rules from a leaf path to the quantization of that leaf
(``weight``) and of the activations of the ops that read it (``act``), and rules from an
op's name scope to the quantization of a matmul between two activations (:class:`OpRule`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from qjax.numerics.spec import PER_TOKEN, QuantSpec, spec_from_dict
from qjax.rules import Match, RuleSet, compile_pattern


@dataclasses.dataclass(frozen=True)
class GradSpecs:
    """Int8 training with the incoming gradient's format chosen per backward matmul (AQT's
    ``dlhs_bits`` / ``drhs_bits``), for :class:`Rule`'s ``grad``.

    A weight's op has two backward matmuls: the activation's gradient (``g · Wᵀ`` for
    ``x @ W``, AQT's ``dlhs``) and the weight's gradient (``Xᵀ · g``, AQT's ``drhs``).
    Each field is the gradient's spec in that matmul, as ``Rule(grad=spec)`` gives both,
    or ``None``: that matmul runs in float against the other operand as the forward pass
    quantized it (the straight-through gradient ``fake_quantized`` gives without
    ``grad``, AQT's float backward with ``use_fwd_quant``). The common choice keeps the
    weight gradient in float (``GradSpecs(activation=g8)``), which AQT users take when
    int8 weight gradients cost accuracy.

    Args:
      activation: the gradient's spec in the activation-gradient matmul, or ``None``.
      weight: the gradient's spec in the weight-gradient matmul, or ``None``.

    Raises:
      TypeError: a field is neither a ``qjax.QuantSpec`` nor ``None``.
      ValueError: both are ``None`` (no integer backward: give no ``grad``).

    Example:
      >>> g8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
      >>> qjax.Rule(r".*/kernel", weight=w8, act=a8, grad=qjax.GradSpecs(activation=g8))
    """

    activation: QuantSpec | None = None
    weight: QuantSpec | None = None

    def __post_init__(self):
        for name in ("activation", "weight"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(f"GradSpecs: {name} must be a qjax.QuantSpec or None, got {v!r}")
        if self.activation is None and self.weight is None:
            raise ValueError(
                "GradSpecs: both backward matmuls are float; give activation= and/or weight=, or no grad= "
                "(fake_quantized's straight-through gradients)"
            )

    @property
    def specs(self) -> tuple[QuantSpec, ...]:
        """The fields that are set."""
        return tuple(s for s in (self.activation, self.weight) if s is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": None if self.activation is None else self.activation.to_dict(),
            "weight": None if self.weight is None else self.weight.to_dict(),
        }


def _grad_from_dict(d: dict[str, Any]) -> QuantSpec | GradSpecs:
    """A rule's ``grad`` from :meth:`Rule.to_dict`: a spec, or the two fields of a
    :class:`GradSpecs`."""
    if isinstance(d, dict) and set(d) == {"activation", "weight"}:
        spec = lambda v: None if v is None else spec_from_dict(v)
        return GradSpecs(spec(d["activation"]), spec(d["weight"]))
    return spec_from_dict(d)


def grad_specs(grad: QuantSpec | GradSpecs) -> GradSpecs:
    """A rule's ``grad`` as :class:`GradSpecs` (a ``QuantSpec`` serves both matmuls)."""
    return grad if isinstance(grad, GradSpecs) else GradSpecs(grad, grad)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One policy rule.

    Args:
      pattern: regular expression matched with ``re.fullmatch`` against leaf paths.
      weight: how to quantize the matched leaf, or ``None`` to keep it in float.
      act: how to quantize activations of ops that read the leaf (used by the function
        transforms), or ``None``.
      grad: int8 training: how to quantize the incoming gradient of the matmuls reading
        the leaf (``fake_quantized`` then runs the forward and both backward matmuls as
        integer matmuls, AQT-style); needs ``weight`` and ``act``. ``None``: float backward.
        A :class:`GradSpecs` chooses per backward matmul (activation / weight gradient),
        ``None`` there keeping that one in float.
        The forward pass quantizes as ``weight`` and ``act`` say, as ``quantized`` serves
        it; the backward matmuls re-quantize the weight and activation in those formats
        with one scale per row of each matmul, and the gradient with one scale per tensor
        (``channel_axes=()``) or per row (``qjax.PER_TOKEN``, recommended). Other
        ``grad`` granularities (``group_size``, explicit axes) are refused at trace time,
        and so is an unsigned ``act`` format (``qjax.uint8``) for a leaf read by a
        convolution (matmuls take it).

    ``Rule(pattern, None)`` (no weight, no act) means "leave alone".

    Raises:
      TypeError / ValueError: bad pattern or spec types (the message names the pattern).
    """

    pattern: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    grad: QuantSpec | GradSpecs | None = None

    def __post_init__(self):
        compile_pattern(self.pattern)
        for name in ("weight", "act", "grad"):
            v = getattr(self, name)
            if name == "grad" and isinstance(v, GradSpecs):
                continue
            if v is not None and not isinstance(v, QuantSpec):
                what = (
                    "a qjax.QuantSpec, a qjax.GradSpecs or None"
                    if name == "grad"
                    else "a qjax.QuantSpec or None"
                )
                raise TypeError(f"Rule {self.pattern!r}: {name} must be {what}, got {v!r}")
        if self.weight is not None and self.weight.channel_axes is PER_TOKEN:
            raise ValueError(f"Rule {self.pattern!r}: qjax.PER_TOKEN is for activations, not weights")
        if self.grad is not None and (self.weight is None or self.act is None):
            raise ValueError(f"Rule {self.pattern!r}: grad= (int8 training) needs weight= and act= specs")
        for name, v in (("act", self.act), ("grad", self.grad)):
            specs = () if v is None else grad_specs(v).specs if name == "grad" else (v,)
            if any(sp.tile_size is not None for sp in specs):
                raise ValueError(f"Rule {self.pattern!r}: {name}: tile scales (tile_size) are for weights")

    @property
    def skips(self) -> bool:
        """True for a "leave alone" rule."""
        return self.weight is None and self.act is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "grad": None if self.grad is None else self.grad.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class OpRule:
    """Quantize the matmuls between two activations (attention's ``QKᵀ`` and ``PV``, a
    product with a KV cache) that run under a matching name scope.

    Leaf rules select ops by the weight they read; a matmul of two activations reads none,
    so it is selected by where it runs: ``pattern`` is matched with ``re.fullmatch``
    against the op's name stack: the Linen module path and ``jax.named_scope`` names it
    runs under, then ``jnp.einsum``'s subscripts, e.g.
    ``"Model/layer_0/attn/...qhd,...khd->...hqk"`` for a Linen
    ``MultiHeadDotProductAttention`` named ``attn``, also inside ``jit``, ``nn.remat``,
    ``nn.scan`` and other control flow (the transformation names a profile adds, such as
    ``jit(f)`` or ``checkpoint``, are not part of it; ``vmap(...)`` around an op inside
    ``f`` is). Flax NNX modules add no scope: wrap the call in ``jax.named_scope``. Only
    ``dot_general`` ops that read no params leaf and whose operands are floating point are
    matched; a function transform whose policy has an ``OpRule`` that matches none of them
    raises, listing the name stacks it saw.

    Args:
      pattern: regular expression over the name stack of the op.
      lhs, rhs: how to quantize each operand of the ``dot_general`` the op lowers to (not
        always the einsum's order: Flax's attention ``PV`` einsum lowers to
        ``dot_general(value, probs)``, so ``lhs`` is the value), dynamically (from the data, per call; e.g.
        ``QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)``: one scale per index of every
        axis not summed over), or ``None`` to keep it float. At least one.
      grad: int8 training of the op (AQT's quantized attention einsums): how to quantize
        the incoming gradient; ``fake_quantized`` then runs both backward matmuls as integer
        matmuls, each operand re-quantized in its spec's format with one scale per row of
        the matmul, as :class:`Rule`'s ``grad`` does for weight matmuls. Needs both ``lhs``
        and ``rhs``; one scale per tensor (``channel_axes=()``) or per row
        (``qjax.PER_TOKEN``), a signed format, typically rounded stochastically (pass
        ``key=``). A ``(dlhs, drhs)`` pair gives each backward matmul its own spec (AQT's
        ``dlhs_bits`` / ``drhs_bits``; ``None`` there: the straight-through float
        cotangent of the fake-quantized op). The forward pass stays the fake-quant float
        op (the same values as the integer one). ``quantized`` and ``calibrate`` ignore it.

    ``qjax.quantized`` runs a matched op as ``qjax.quantized_dot_general`` (int8 x int8 ->
    int32 when both are integer formats); ``qjax.fake_quantized`` fake-quantizes both
    operands and runs the float op, with straight-through gradients or (``grad``) the
    integer backward matmuls. A per-tensor operand spec
    (``channel_axes=()``) can be static: ``qjax.calibrate`` records its range under an
    ``"op:<name stack>:lhs"`` / ``":rhs"`` key, which ``quantized(f, policy, op_stats=stats)``
    and ``fake_quantized(f, policy, act_stats=stats)`` use (:mod:`qjax.quant.op_stats`).

    Raises:
      TypeError / ValueError: bad pattern or spec types, no spec, or a static-only spec
        option; ``grad`` without both ``lhs`` and ``rhs``, or with a granularity or format
        the integer backward cannot honour (the message names the pattern).

    Example:
      >>> per_token = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
      >>> policy = qjax.Policy([
      ...     qjax.Rule(r".*/kernel", weight=w8, act=per_token),
      ...     qjax.OpRule(r".*/attn/.*->.*", lhs=per_token, rhs=per_token),
      ... ])
    """

    pattern: str
    lhs: QuantSpec | None = None
    rhs: QuantSpec | None = None
    grad: QuantSpec | tuple[QuantSpec | None, QuantSpec | None] | None = None

    def __post_init__(self):
        compile_pattern(self.pattern)
        if isinstance(self.grad, list):
            object.__setattr__(self, "grad", tuple(self.grad))
        grads = self.grad if isinstance(self.grad, tuple) else (self.grad,)
        if isinstance(self.grad, tuple) and (
            len(grads) != 2
            or all(g is None for g in grads)
            or not all(g is None or isinstance(g, QuantSpec) for g in grads)
        ):
            raise TypeError(
                f"OpRule {self.pattern!r}: grad must be a qjax.QuantSpec, a (dlhs, drhs) pair of them with "
                f"at most one None, or None, got {self.grad!r}"
            )
        for name, v in [("lhs", self.lhs), ("rhs", self.rhs), *(("grad", g) for g in grads)]:
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(
                    f"OpRule {self.pattern!r}: {name} must be a qjax.QuantSpec or None, got {v!r}"
                )
            if v is not None and v.ste == "lsq":
                raise ValueError(f"OpRule {self.pattern!r}: {name}: ste='lsq' learns a weight scale, not one")
            if v is not None and v.tile_size is not None:
                raise ValueError(f"OpRule {self.pattern!r}: {name}: tile scales (tile_size) are for weights")
        if self.lhs is None and self.rhs is None:
            raise ValueError(f"OpRule {self.pattern!r}: give lhs= and/or rhs= (nothing to quantize)")
        if self.grad is not None:
            from qjax.quant.int8_training import check_grad_spec  # imports the ops, not this module

            if self.lhs is None or self.rhs is None:
                raise ValueError(
                    f"OpRule {self.pattern!r}: grad= (int8 training) needs lhs= and rhs= specs: both "
                    "backward matmuls re-quantize the other operand"
                )
            for g in grads:
                if g is not None:
                    check_grad_spec(g, f"OpRule {self.pattern!r}: grad")

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "lhs": None if self.lhs is None else self.lhs.to_dict(),
            "rhs": None if self.rhs is None else self.rhs.to_dict(),
            "grad": None
            if self.grad is None
            else [None if g is None else g.to_dict() for g in self.grad]
            if isinstance(self.grad, tuple)
            else self.grad.to_dict(),
        }


class Policy:
    """An immutable, ordered list of :class:`Rule` and :class:`OpRule` (first match wins
    among each kind).

    Example:
      >>> policy = qjax.Policy([
      ...     qjax.Rule(r"params/.*embed.*", None),
      ...     qjax.Rule(r"params/.*/kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,))),
      ... ])

    Attributes:
      rules: the leaf rules, in order.
      op_rules: the :class:`OpRule` entries, in order.

    Raises:
      TypeError: an entry is neither a :class:`Rule` nor an :class:`OpRule`.
    """

    def __init__(self, rules: Iterable[Rule | OpRule]):
        entries = tuple(rules)
        for i, r in enumerate(entries):
            if not isinstance(r, (Rule, OpRule)):
                raise TypeError(f"Policy entry {i} must be a qjax.Rule or qjax.OpRule, got {r!r}")
        self.rules: tuple[Rule, ...] = tuple(r for r in entries if isinstance(r, Rule))
        self.op_rules: tuple[OpRule, ...] = tuple(r for r in entries if isinstance(r, OpRule))
        self._set = RuleSet((r.pattern, None if r.skips else r) for r in self.rules)
        self._op_set = RuleSet((r.pattern, r) for r in self.op_rules)

    def op_match(self, scope: str) -> Match[OpRule] | None:
        """The first :class:`OpRule` whose pattern matches the name stack ``scope``."""
        return self._op_set.match(scope)

    def unused_op_rules(self, scopes: Iterable[str]) -> list[str]:
        """:class:`OpRule` patterns that match none of the name stacks ``scopes`` (first
        match wins: a rule shadowed by an earlier one counts as unused)."""
        return self._op_set.unused(list(scopes))

    @property
    def ruleset(self) -> RuleSet[Rule]:
        """The policy as a generic :class:`qjax.rules.RuleSet` (skip rules have value None)."""
        return self._set

    def match(self, path: str) -> Match[Rule] | None:
        """The first rule matching ``path`` (``value`` is ``None`` for a skip rule)."""
        return self._set.match(path)

    def weight_spec(self, path: str) -> QuantSpec | None:
        """The weight spec for ``path`` (``None``: keep float)."""
        m = self.match(path)
        return None if m is None or m.value is None else m.value.weight

    def act_spec(self, path: str) -> QuantSpec | None:
        """The activation spec of ops reading ``path`` (``None``: float activations)."""
        m = self.match(path)
        return None if m is None or m.value is None else m.value.act

    def unused(self, tree: Any) -> list[str]:
        """Patterns that matched no leaf of ``tree``."""
        return self._set.unused(tree)

    def to_json(self) -> str:
        """Serialise to JSON (see :meth:`from_json`)."""
        doc: dict[str, Any] = {"qjax_policy": 1, "rules": [r.to_dict() for r in self.rules]}
        if self.op_rules:
            doc["op_rules"] = [r.to_dict() for r in self.op_rules]
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """Parse a policy written by :meth:`to_json`.

        Raises:
          ValueError: not a qjax policy, or a rule is malformed.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or "rules" not in data:
            raise ValueError("not a qjax policy JSON document (no 'rules' list)")
        rules = []
        for i, r in enumerate(data["rules"]):
            try:
                rules.append(
                    Rule(
                        r["pattern"],
                        weight=None if r.get("weight") is None else spec_from_dict(r["weight"]),
                        act=None if r.get("act") is None else spec_from_dict(r["act"]),
                        grad=None if r.get("grad") is None else _grad_from_dict(r["grad"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"policy rule {i} is malformed: {e}") from e
        spec = lambda d: None if d is None else spec_from_dict(d)
        for i, r in enumerate(data.get("op_rules", [])):
            try:
                rules.append(
                    OpRule(
                        r["pattern"],
                        lhs=spec(r.get("lhs")),
                        rhs=spec(r.get("rhs")),
                        grad=tuple(map(spec, r["grad"]))
                        if isinstance(r.get("grad"), list)
                        else spec(r.get("grad")),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"policy op rule {i} is malformed: {e}") from e
        return cls(rules)

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and (self.rules, self.op_rules) == (other.rules, other.op_rules)

    def __hash__(self) -> int:
        return hash((self.rules, self.op_rules))

    def __repr__(self) -> str:
        return "Policy([\n" + "".join(f"    {r!r},\n" for r in (*self.rules, *self.op_rules)) + "])"


def check_policy(policy: object) -> Policy:
    """``policy`` itself if it is a :class:`Policy`, else a ``TypeError`` that says so (a list
    of rules must be wrapped: ``qjax.Policy([...])``)."""
    if not isinstance(policy, Policy):
        hint = " (wrap the rules: qjax.Policy([...]))" if isinstance(policy, (list, tuple)) else ""
        raise TypeError(f"policy must be a qjax.Policy, got {type(policy).__name__}{hint}")
    return policy
