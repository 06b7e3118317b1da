"""Feature capture: the inputs and outputs of chosen layers of any model, addressed by
param-path patterns, without editing the model.

:func:`capture` is a graph-layer transform (:mod:`qjax.graph`): the function is traced to
a jaxpr and re-evaluated; every ``dot_general`` / ``conv_general_dilated`` that reads a
params leaf whose path matches one of the patterns (``re.fullmatch``, first match, as
the rule engine) is evaluated unchanged and its activation operand (``"input"``) and
result (``"output"``) are emitted under the leaf's path. This works for Flax Linen
(``model.apply``), NNX (``qjax.nnx_apply(graphdef)`` on ``nnx.split`` state) and plain
functions of a params pytree, under ``jit``/``grad``/``vmap``; ops inside ``nn.scan`` /
``lax.scan`` give values stacked along a leading layer axis.

The op result is the matmul/conv *before* the bias and the nonlinearity (those are not
ops that read the kernel). ``add_bias=True`` adds the sibling ``…/bias`` leaf (Flax's
``Dense``/``DenseGeneral``/``Conv`` convention: the bias broadcasts against the output's
trailing axes). For module outputs of Linen models, :func:`capture_linen` wraps Flax's
own ``capture_intermediates`` with the same pattern syntax on module paths.

Composition: ``qjax.fake_quantized(capture(f, patterns), policy)`` captures the features
of the fake-quantized model (the capture is traced first, keeping param provenance, then
the quantization replaces the ops); ``capture(fake_quantized(...))`` sees no
param-reading ops, since the weights pass through ``fake_quant`` first, and raises. A
pattern that matches no weight read by a matmul/conv is an error.
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from qjax.graph import Handler, WeightRef, bind_eqn, materialize, run, trace
from qjax.numerics.transposed import is_quantized
from qjax.rules import RuleSet

Features = dict[str, dict[str, jax.Array]]


def _ruleset(patterns: str | Sequence[str]) -> RuleSet:
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("capture needs at least one path pattern")
    return RuleSet([(p, True) for p in patterns])


class _Capture(Handler):
    """Evaluates matched ops unchanged and emits ``{"input", "output"}``."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        # leading axes that the output and the bias share: stacked (scanned) layers, then the
        # op's batch dimensions (an ``nn.vmap``'d layer, ``DenseGeneral(batch_dims=...)``)
        self.depth: dict[str, int] = {}
        self.seen: set[str] = set()  # every weight a matmul/conv reads, matched or not

    def target(self, eqn, invals, emit):
        refs = [i for i in (0, 1) if isinstance(invals[i], WeightRef)]
        self.seen.update(invals[i].path for i in refs)
        matched = [i for i in refs if self.rules.match(invals[i].path) is not None]
        if not matched:
            return None
        wi = matched[0]
        args = [materialize(x) for x in invals]
        (out,) = bind_eqn(eqn, args)
        batch = len(eqn.params["dimension_numbers"][1][0]) if eqn.primitive.name == "dot_general" else 0
        self.depth[invals[wi].path] = invals[wi].depth + batch
        emit(invals[wi].path, {"input": args[1 - wi], "output": out})
        return [out]


def _check_matched(patterns: Sequence[str], seen: set[str], param_paths: Sequence[str]) -> None:
    """Raise for a pattern that matched no weight read by a matmul/conv, naming it and what
    was found (a typo would otherwise give empty features and a silently zero hint loss).
    A pattern shadowed by an earlier one is fine (capturing is the same either way)."""
    unused = [p for p in patterns if not any(re.fullmatch(p, s) for s in seen)]
    if not unused:
        return
    msg = f"capture: pattern(s) {unused} match no weight read by a matmul/conv; weights read: {sorted(seen)}"
    leaves = [p for p in param_paths if any(re.fullmatch(u, p) for u in unused)]
    if leaves:
        msg += (
            f". Params leaves {leaves} match but no matmul/conv reads them directly (they pass "
            "through another computation first, e.g. the quantization of qjax.fake_quantized / "
            "qjax.quantized): capture the float function and quantize outside, "
            "qjax.fake_quantized(capture(f, patterns), policy), or capture f on "
            "qjax.fake_quant_params(params, policy)"
        )
    raise ValueError(msg)


def _key(path: str, i: int) -> str:
    return path if i == 0 else f"{path}@{i}"


def _bias_added(path: str, output: jax.Array, depth: int, leaves: dict[str, Any]) -> jax.Array:
    """``output + bias`` for the sibling ``…/bias`` leaf of ``path`` (if any); ``depth``
    leading axes of both are stacked layers (an op inside a scan over stacked params) and
    the op's batch dimensions (a vmapped layer), the rest of the bias matches the output's
    trailing axes."""
    bias_path = posixpath.join(posixpath.dirname(path), "bias")
    bias = leaves.get(bias_path)
    if bias is None:
        return output
    if is_quantized(bias):
        bias = bias.dequantize()
    feat = tuple(bias.shape[depth:])
    ok = output.ndim >= depth + len(feat) and tuple(output.shape[output.ndim - len(feat) :]) == feat
    if not ok or tuple(output.shape[:depth]) != tuple(bias.shape[:depth]):
        raise ValueError(
            f"capture(add_bias=True): bias {bias_path!r} of shape {bias.shape} does not broadcast "
            f"against the output of {path!r} of shape {output.shape}: add_bias supports a bias whose "
            f"first {depth} axes (scanned layers, then the op's batch axes) lead the output and whose "
            "other axes are the output's last ones (Flax's channels-last Dense/Conv)"
        )
    shape = bias.shape[:depth] + (1,) * (output.ndim - depth - len(feat)) + feat
    return output + bias.reshape(shape).astype(output.dtype)


def capture(f: Callable, patterns: str | Sequence[str], *, add_bias: bool = False) -> Callable:
    """``f`` returning also the inputs and outputs of the matmuls/convs that read params
    leaves matched by ``patterns``.

    Args:
      f: ``f(params, *args, **kwargs)``: a Linen ``apply``, ``qjax.nnx_apply(graphdef)``,
        or any function of a params pytree. Positional args are traced, keyword
        arguments static.
      patterns: regular expression(s) matched with ``re.fullmatch`` against param leaf
        paths (``params/Dense_0/kernel``; NNX: ``layer/kernel``), e.g.
        ``r"params/Conv_1/kernel"`` or ``r".*/Dense_\\d+/kernel"``.
      add_bias: add the sibling ``bias`` leaf to each output (see module docstring).

    Returns:
      ``g(params, *args, **kwargs) -> (outputs, {path: {"input": x, "output": y}})``. An
      op read ``n > 1`` times (weight sharing) gives keys ``path``, ``path@1``, …,
      ``path@{n-1}`` in evaluation order; ops inside a scan give per-iteration values
      stacked on a leading axis (``nn.scan`` layers share one path); an op in a
      ``cond`` branch that did not run gives NaN. Capturing inside ``while_loop`` bodies
      is refused by the graph layer (their trip count is data-dependent).

    Raises:
      ValueError: no pattern; a pattern that matches no weight read by a matmul/conv
        (names it and lists the weights read; for a leaf that reaches its op through a
        quantization, e.g. ``capture(qjax.fake_quantized(f, policy), ...)``, it says to
        capture the float function instead).

    Example:
      >>> out, feats = capture(model.apply, [r"params/Dense_0/kernel"])(variables, x)
      >>> feats["params/Dense_0/kernel"]["output"]      # x @ kernel, before the bias
    """
    rules = _ruleset(patterns)

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        traced = trace(f, params, *args, **kwargs)
        handler = _Capture(rules)
        outs, emitted = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
        _check_matched(rules.patterns, handler.seen, traced.param_paths)
        leaves = dict(zip(traced.param_paths, traced.param_leaves))
        features: Features = {}
        for path, values in emitted.items():
            for i, v in enumerate(values):
                out = v["output"]
                if add_bias:
                    out = _bias_added(path, out, handler.depth.get(path, 0), leaves)
                features[_key(path, i)] = {"input": v["input"], "output": out}
        return jax.tree.unflatten(traced.out_tree, outs), features

    return g


def capture_linen(module: Any, patterns: str | Sequence[str], *, method: str = "__call__") -> Callable:
    """Module outputs of a Flax Linen model through Flax's ``capture_intermediates``,
    for modules whose path (names joined by ``/``, e.g. ``Block_0/Dense_1``) matches one
    of ``patterns``. Unlike :func:`capture` the output is the module's return value
    (after bias and whatever the module computes).

    Returns:
      ``g(variables, *args, **kwargs) -> (outputs, {module_path: {"output": y}})``; a
      module called several times gives ``module_path``, ``module_path@1``, …
    """
    rules = _ruleset(patterns)

    def keep(mdl, method_name: str) -> bool:
        return method_name == method and rules.match("/".join(mdl.path)) is not None

    def g(variables, *args, **kwargs):
        out, state = module.apply(
            variables, *args, capture_intermediates=keep, mutable=["intermediates"], **kwargs
        )
        features: Features = {}
        flat = jax.tree_util.tree_flatten_with_path(
            state.get("intermediates", {}), is_leaf=lambda x: isinstance(x, tuple)
        )[0]
        for kp, values in flat:
            names = [str(getattr(k, "key", k)) for k in kp]
            path = "/".join(n for n in names if n != method)
            for i, y in enumerate(values):
                features[_key(path, i)] = {"output": y}
        return out, features

    return g
