"""``dispatch_report``: which matmul each weight of a ``qjax.quantized`` function runs.

``backend="auto"`` takes a Pallas kernel only where the platform, the op and its shape are
covered and the tuning table measured the kernel faster; everywhere else it runs XLA,
silently. This report traces the quantized function (no compute) and lists, for every op
that reads a params leaf, the primitives it became: a kernel (``pallas_call`` and its
name), XLA's ``dot_general`` / ``conv_general_dilated`` with the operand dtypes (``s8``
codes: an integer or converted formulation; floats only: not quantized). ``quantized``
puts each such op in ``jax.named_scope(f"qjax[{path}]")``; the report reads those scopes
back from the jaxpr. To learn why an op has no kernel, run it with ``backend="pallas"``:
that raises with the reason, naming the leaf.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

from qjax.numerics.transposed import is_quantized
from qjax.quant.policy import Policy
from qjax.quant.serve import quantized
from qjax.rules import leaves_with_paths

_SCOPE = re.compile(r"qjax\[(.+?)\](?:/|$)")
_COMPUTE = ("pallas_call", "dot_general", "conv_general_dilated", "ragged_dot_general")


@dataclasses.dataclass(frozen=True)
class OpDispatch:
    """What the op(s) reading one params leaf run, or one matmul between two activations
    that a :class:`qjax.OpRule` matched.

    Attributes:
      path: the leaf's path, or the matmul's name stack.
      quantized: whether the weight is quantized (a quantized leaf, or a rule with a
        ``weight`` spec; for a matmul between activations: always, as its ``OpRule``
        says); ``False``: the float op runs.
      runs: one entry per distinct compute primitive, in program order:
        ``"pallas:<kernel name>"`` or ``"xla:<primitive> <operand dtypes> -> <dtype>"``
        (a weight-only op on XLA may show float operands: codes converted in the dot).
    """

    path: str
    quantized: bool
    runs: tuple[str, ...]

    @property
    def kernel(self) -> bool:
        """Whether a Pallas kernel runs (part of) the op."""
        return any(r.startswith("pallas:") for r in self.runs)

    def __str__(self) -> str:
        return f"{self.path}{'' if self.quantized else ' (float)'}: {', '.join(self.runs)}"


def _describe(eqn) -> str:
    name = eqn.primitive.name
    if name == "pallas_call":
        info = eqn.params.get("name_and_src_info") or eqn.params.get("name")
        return f"pallas:{getattr(info, 'name', info)}"
    ins = "x".join(str(v.aval.dtype) for v in eqn.invars[:2])
    return f"xla:{name} {ins} -> {eqn.outvars[0].aval.dtype}"


def _sub_jaxprs(value) -> list:
    if isinstance(value, jcore.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jcore.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _collect(jaxpr, found: dict[str, list[str]], scope: str | None = None) -> None:
    """Compute primitives under a ``qjax[...]`` scope, by path; an equation's scope is its
    own name stack, or for a body inlined below it (``pjit``, ``scan``...) the enclosing one."""
    for eqn in jaxpr.eqns:
        m = _SCOPE.search(str(eqn.source_info.name_stack))
        here = m.group(1) if m else scope
        if here is not None and eqn.primitive.name in _COMPUTE:
            runs = found.setdefault(here, [])
            desc = _describe(eqn)
            if desc not in runs:
                runs.append(desc)
        if eqn.primitive.name == "pallas_call":
            continue  # the kernel's body: its dots are the kernel's
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                _collect(sub, found, here)


def dispatch_report(f: Callable, policy: Policy, *, backend: str = "auto") -> Callable[..., list[OpDispatch]]:
    """What ``qjax.quantized(f, policy, backend=backend)`` runs for each weight.

    Args:
      f: ``f(params, *args, **kwargs)``, as for ``qjax.quantized``.
      policy: the :class:`qjax.Policy`.
      backend: as for ``qjax.quantized``.

    Returns:
      A function of ``(params, *args, **kwargs)`` (traced only: arrays or
      ``jax.ShapeDtypeStruct``s) returning one :class:`OpDispatch` per params leaf read by a
      matmul or conv, and per matmul between two activations an ``OpRule`` matched, in
      program order.

    Raises:
      ValueError: as ``qjax.quantized`` (e.g. ``backend="pallas"`` and an op no kernel
        covers: the message names the leaf and why).

    Example:
      >>> for op in qjax.dispatch_report(model.apply, policy)(qparams, x):
      ...     print(op)  # params/Dense_0/kernel: pallas:int8_matmul_...
    """
    serve = quantized(f, policy, backend=backend)

    def report(params: Any, *args, **kwargs) -> list[OpDispatch]:
        closed = jax.make_jaxpr(lambda p, a: serve(p, *a, **kwargs))(params, args)
        found: dict[str, list[str]] = {}
        _collect(closed.jaxpr, found)
        leaves = dict(leaves_with_paths(params))

        def quantized_op(path: str) -> bool:
            if path not in leaves:  # a matmul between activations, named by its OpRule's scope
                return policy.op_match(path) is not None
            return is_quantized(leaves[path]) or policy.weight_spec(path) is not None

        return [OpDispatch(path, quantized_op(path), tuple(runs)) for path, runs in found.items()]

    return report
