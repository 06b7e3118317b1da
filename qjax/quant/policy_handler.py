"""The policy-driven handler of the graph walker that ``quantized``, ``fake_quantized`` and
``calibrate`` share: which rule an op's weight matched, errors named by leaf and rule, a
warning for weights whose activations a rule quantizes but that no matmul/conv reads, and
the :class:`~qjax.quant.policy.OpRule` matching of matmuls between two activations."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax.graph.interpret import Handler, WeightRef, run, weight_operand
from qjax.graph.ops import operand_channel_axes
from qjax.graph.trace import trace
from qjax.graph.weight_ref import ragged_weight  # noqa: F401  (re-exported)
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.policy import Policy, Rule


def _rule(policy: Policy, path: str) -> Rule | None:
    m = policy.match(path)
    return None if m is None else m.value


def _resolve_act_spec(spec: QuantSpec, eqn, operand: int) -> QuantSpec:
    """``PER_TOKEN`` -> the concrete non-contracting axes of this operand."""
    if spec.channel_axes is not PER_TOKEN:
        return spec
    ndim = len(eqn.invars[operand].aval.shape)
    return spec.replace(channel_axes=operand_channel_axes(eqn.primitive.name, eqn.params, operand, ndim))


def _rule_text(policy: Policy, path: str) -> str:
    m = policy.match(path)
    return "" if m is None else f" (matched rule {m.index} {m.pattern!r})"


def _reraise_named(policy: Policy, paths: list[str], where: str | None, e: Exception):
    """Re-raise ``e`` naming the first leaf of ``paths``, its rule and ``where`` (the op),
    unless it names one of them already (or there is none)."""
    if not paths or any(repr(p) in str(e) for p in paths):
        raise e
    at = "" if where is None else f", {where}"
    raise type(e)(f"leaf {paths[0]!r}{_rule_text(policy, paths[0])}{at}: {e}") from e


def _named_errors(method):
    """Re-raise errors of a handler's ``target`` naming the leaf path and its rule."""

    @functools.wraps(method)
    def target(self, eqn, invals, emit):
        try:
            return method(self, eqn, invals, emit)
        except (TypeError, ValueError) as e:
            refs = [x.path for x in invals if isinstance(x, WeightRef)]
            _reraise_named(self.policy, refs, eqn.primitive.name, e)

    return target


def _named_materialize_errors(method):
    """Re-raise errors of a handler's ``materialize`` (a weight read by an op that is not a
    matmul/conv, quantized by its rule) naming the leaf path and its rule."""

    @functools.wraps(method)
    def materialize(self, ref):
        try:
            return method(self, ref)
        except (TypeError, ValueError) as e:
            _reraise_named(self.policy, [ref.path], None, e)

    return materialize


class _PolicyHandler(Handler):
    """A handler driven by a policy: finds the op's weight operand and its rule, and notes
    which weights target ops read (:meth:`warn_unread_activations`)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self._targeted: set[str] = set()
        self._other_reads: dict[str, str] = {}  # path -> the first non-target op reading it
        self._activation_scopes: list[str] = []  # name stacks of the matmuls between activations

    @property
    def visits_activation_ops(self) -> bool:
        return bool(self.policy.op_rules)

    def activation_op(self, eqn, invals, scope: str, emit):
        """A matmul between two activations: the first ``OpRule`` matching its name
        stack ``scope``, handed to :meth:`quantize_activation_op` with its specs resolved
        for the op (``PER_TOKEN`` -> axes); errors name the scope and the rule. A matmul
        of integers (already quantized by the user) runs as it is."""
        self._activation_scopes.append(scope)
        m = self.policy.op_match(scope)
        if m is None or not all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.invars):
            return None
        try:
            lspec, rspec = (
                None if spec is None else _resolve_act_spec(spec, eqn, i)
                for i, spec in enumerate((m.value.lhs, m.value.rhs))
            )
            return self.quantize_activation_op(eqn, invals, lspec, rspec, scope, emit)
        except (TypeError, ValueError) as e:
            raise type(e)(f"matmul at name scope {scope!r} (op rule {m.index} {m.pattern!r}): {e}") from e

    def quantize_activation_op(self, eqn, invals, lhs_spec, rhs_spec, scope: str, emit) -> list | None:
        """What a matched matmul between two activations becomes; ``None`` (default) runs
        it unchanged."""
        return None

    def check_op_rules(self) -> None:
        """Raise when an ``OpRule`` matched no matmul between two activations (a typo
        in a scope pattern would otherwise leave attention in float silently)."""
        unused = self.policy.unused_op_rules(self._activation_scopes)
        if unused:
            seen = sorted(set(self._activation_scopes))
            found = (
                f"The name stacks of such matmuls were: {seen}"
                if seen
                else "The function has none outside custom_jvp / custom_vjp bodies, which are not searched "
                "(e.g. the products of qjax.KVCache.attend, already on codes, or a fused attention kernel)"
            )
            raise ValueError(
                f"op rule patterns {unused} matched no matmul between two activations (re.fullmatch "
                f"against the op's name stack). {found}"
            )

    def weight(self, invals) -> tuple[int, WeightRef, Rule | None] | None:
        """``(operand index, weight ref, matched rule or None)``, or ``None`` when the op
        does not read exactly one weight."""
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        self._targeted.add(ref.path)
        return wi, ref, _rule(self.policy, ref.path)

    def acts_on(self, ref: WeightRef) -> bool:
        return _rule(self.policy, ref.path) is not None

    def read(self, ref: WeightRef, where: str) -> None:
        self._other_reads.setdefault(ref.path, where)

    def finish(self) -> None:
        """Called once the function has been evaluated: warns about activations no
        matmul/conv quantized (:meth:`warn_unread_activations`), and raises for an
        ``OpRule`` that matched no op (:meth:`check_op_rules`)."""
        self.warn_unread_activations()
        self.check_op_rules()

    def warn_unread_activations(self) -> None:
        """Warn, once per leaf, about each leaf whose rule quantizes the activations of the
        ops reading it (``act=``, or ``grad=`` int8 training) but that no matmul/conv reads
        as its weight: something else read it (a ``concatenate`` building a fused weight, a
        ``pad``, a gather), so no activation was quantized for it."""
        for path, where in self._other_reads.items():
            rule = _rule(self.policy, path)
            if path in self._targeted or rule is None or (rule.act is None and rule.grad is None):
                continue
            what = "act= (activation quantization)" if rule.grad is None else "grad= (int8 training)"
            warnings.warn(
                f"leaf {path!r}{_rule_text(self.policy, path)} asks for {what}, but no matmul/conv "
                f"reads it as its weight: it is read by {where!r} (e.g. a weight concatenated with "
                "others or padded at call time), so the activations of the op that uses it stay "
                "float. Quantize each part by its own matmul, or store the fused weight as one leaf.",
                UserWarning,
                stacklevel=2,
            )


def _run(f, handler_factory: Callable[[], Handler], params, args, kwargs):
    traced = trace(f, params, *args, **kwargs)
    handler = handler_factory()
    outs, emitted = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
    if isinstance(handler, _PolicyHandler):
        handler.finish()
    return jax.tree.unflatten(traced.out_tree, outs), emitted
