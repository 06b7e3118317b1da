"""LoRA as a function transform: low-rank adapters on the matmuls that read chosen
params leaves, without editing the model.

For a leaf ``W`` that a ``dot_general`` reads as its weight, the adapted function computes
``x @ W + (alpha / r) * (x @ A) @ B`` in place of ``x @ W``. ``A`` spans the axes of
``W`` the matmul contracts, ``B`` the axes it keeps, so ``W + (alpha / r) * A @ B`` is the
merged weight (:func:`merge_lora`). Any other read of the leaf (a gather, an elementwise
op, an output) sees that merged weight, so the adapted function is the model with merged
weights.

* :func:`lora_adapters` traces ``f`` once and builds the adapters ``{path: {"a": A,
  "b": B}}`` for the leaves a rule gives a rank (``A`` uniform in ``±1/sqrt(fan_in)`` as
  PEFT's default, ``B`` zero: the adapted function starts equal to ``f``).
* :func:`lora` turns ``f(params, *args)`` into ``g(params, adapters, *args)``. The
  adapters are a separate pytree: train them alone with optax (the base stays frozen).
* :func:`merge_lora` folds them into float weights for export.

Layout of the adapters: a leaf whose matmul batches over its leading axes (``nn.scan``
stacks, sliced per layer by the graph walker; experts in ``"end,edf->enf"``) and then
contracts the next ones has ``A: (*batch, *contracted, r)`` and ``B: (*batch, r, *kept)``:
one adapter per layer / expert. Weights read through other layouts (transposed,
``(N, K)`` PyTorch-style, reshaped, or by a convolution) are refused, naming the leaf.

QLoRA (a frozen quantized base, float adapters): ``qjax.quantized(qjax.lora(f, alpha=a),
policy)(qparams, adapters, x)``. The adapted function keeps the base matmul ``x @ W``
unchanged, so the outer transform quantizes it, while ``x @ A`` and ``@ B`` read the
adapters (arguments, not params) in float. ``fake_quantized`` composes the same way.
The other order, ``lora(quantized(f, policy))``, does not: inside it the weight reaches its
matmul through quantization ops, not as a params leaf.

The graph walking is :mod:`qjax.graph.interpret`'s: the adapters ride along with their
leaf as its ``aux`` (so a ``scan`` over a stacked leaf slices them per layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qjax.graph.interpret import Handler, WeightRef, bind_eqn, materialize, run, weight_operand
from qjax.graph.layout import IDENTITY_LAYOUT
from qjax.graph.trace import trace
from qjax.numerics.transposed import is_quantized
from qjax.rules import RuleSet, fold_in_path, leaves_with_paths, map_with_path

Adapters = dict[str, dict[str, jax.Array]]


def _geometry(eqn, ref: WeightRef, wi: int) -> tuple[int, int]:
    """``(batch, contracted)``: how many leading axes of the weight operand the matmul
    batches over, and how many it contracts right after them.

    Raises:
      ValueError: the op is not a ``dot_general``, the weight reaches it through layout
        ops other than casts, or its batch / contracted axes are not leading (names the leaf).
    """
    where = f"leaf {ref.path!r}: LoRA"
    if eqn.primitive.name != "dot_general":
        raise ValueError(f"{where} adapts dot_general matmuls; this leaf is read by {eqn.primitive.name}")
    moved = [op.primitive.name for op in ref.ops if op.primitive.name not in IDENTITY_LAYOUT]
    if moved:
        raise ValueError(
            f"{where} needs the weight read in its stored layout; it reaches its matmul through "
            f"{moved} (e.g. x @ w.T): store it (K, N) or leave it out of the rules"
        )
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, rc)[wi], (lb, rb)[wi]
    nb, nc = len(batch), len(contract)
    if tuple(batch) != tuple(range(nb)) or tuple(contract) != tuple(range(nb, nb + nc)):
        raise ValueError(
            f"{where} needs the matmul to batch over the weight's leading axes and contract the "
            f"next ones; it batches over axes {tuple(batch)} and contracts axes {tuple(contract)} "
            f"of the weight's {len(eqn.invars[wi].aval.shape)}"
        )
    return nb, nc


def _delta(a, b, ndim: int):
    """``A @ B`` over the rank axis, batched over the leading axes the two share: a weight
    of ``ndim`` axes (stacked / batch axes, contracted axes, kept axes)."""
    nb = a.ndim + b.ndim - 2 - ndim
    dims = (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)


def _check_shapes(path: str, adapter: dict, wshape: tuple, nb: int, nc: int) -> None:
    a, b = adapter["a"], adapter["b"]
    r = a.shape[-1] if a.ndim else None
    want_a, want_b = (*wshape[: nb + nc], r), (*wshape[:nb], r, *wshape[nb + nc :])
    if a.shape != want_a or b.shape != want_b:
        raise ValueError(
            f"leaf {path!r}: LoRA adapter shapes a={a.shape}, b={b.shape} do not fit the weight "
            f"{tuple(wshape)} as its matmul reads it (expected a={want_a}, b={want_b})"
        )


class _LoRA(Handler):
    """Adds ``scale * (x @ A) @ B`` to each matmul that reads a leaf with adapters."""

    def __init__(self, adapters: Adapters, alpha: float):
        self.adapters, self.alpha = adapters, alpha
        self.matmul_paths: set[str] = set()  # adapted leaves some matmul read as its weight
        self.other_reads: dict[str, str] = {}  # adapted leaf -> the first other op reading it

    def aux(self, path: str):
        return self.adapters.get(path)

    def acts_on(self, ref: WeightRef) -> bool:
        return ref.aux is not None

    def _scale(self, adapter) -> float:
        return self.alpha / adapter["a"].shape[-1]

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None or invals[wi].aux is None:
            return None
        ref, x = invals[wi], invals[1 - wi]
        _check_outside_shard_map(ref)
        self.matmul_paths.add(ref.path)
        nb, nc = _geometry(eqn, ref, wi)
        w = materialize(ref)  # the base matmul is f's own: an outer quantized() replaces it
        _check_shapes(ref.path, ref.aux, w.shape, nb, nc)
        operands = [None, None]
        operands[wi], operands[1 - wi] = w, x
        base = bind_eqn(eqn, operands)[0]
        a, b = (ref.aux[k].astype(w.dtype) for k in ("a", "b"))
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        xc, xb = (lc, rc)[1 - wi], (lb, rb)[1 - wi]
        prec = eqn.params["precision"]
        t = lax.dot_general(
            x, a, ((xc, tuple(range(nb, nb + nc))), (xb, tuple(range(nb)))), precision=prec
        )  # (batch, x kept, r)
        u = lax.dot_general(
            t, b, (((t.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))), precision=prec
        )  # (batch, x kept, w kept)
        if wi == 0:  # the op's output is (batch, w kept, x kept)
            nx, nw = t.ndim - 1 - nb, b.ndim - 1 - nb
            u = jnp.transpose(u, (*range(nb), *range(nb + nx, nb + nx + nw), *range(nb, nb + nx)))
        return [base + (self._scale(ref.aux) * u).astype(base.dtype)]

    def read(self, ref: WeightRef, where: str) -> None:
        if ref.aux is not None:
            self.other_reads.setdefault(ref.path, where)

    def check_read(self) -> None:
        """Every adapted leaf must reach a matmul as its weight (else the adapter would only
        shift the weight: e.g. ``lora(quantized(f))``, where quantization ops read it)."""
        unread = {p: self.other_reads.get(p) for p in self.adapters if p not in self.matmul_paths}
        if unread:
            reads = ", ".join(f"{p!r} (read by {w or 'nothing'})" for p, w in sorted(unread.items()))
            raise ValueError(
                f"adapters for leaves no dot_general reads as its weight: {reads}. For QLoRA compose "
                "qjax.quantized(qjax.lora(f, alpha=...), policy), not lora(quantized(f, policy))"
            )

    def materialize(self, ref: WeightRef):
        """A read that is not a matmul (a gather, an elementwise op) sees the merged weight."""
        if ref.aux is None:
            return materialize(ref)
        _check_outside_shard_map(ref)
        w = ref.float_leaf()
        w = w + (self._scale(ref.aux) * _delta(ref.aux["a"], ref.aux["b"], w.ndim)).astype(w.dtype)
        return materialize(dataclasses.replace(ref, leaf=w))  # the layout ops, replayed


def _check_outside_shard_map(ref: WeightRef) -> None:
    if any(ref.shard_axes):
        raise ValueError(f"leaf {ref.path!r}: LoRA adapters inside a shard_map body are not supported")


class _Probe(Handler):
    """Records how the matmuls read each leaf a rule gives a rank: ``(leaf shape, dtype,
    leading batch/stack axes, contracted axes)``."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.found: dict[str, tuple] = {}
        self.weights: set[str] = set()  # every leaf a matmul reads as its weight

    def _rank(self, path: str):
        m = self.rules.match(path)
        return None if m is None else m.value

    def acts_on(self, ref: WeightRef) -> bool:
        return self._rank(ref.path) is not None

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        if eqn.primitive.name == "dot_general":
            self.weights.add(ref.path)
        if self._rank(ref.path) is None:
            return None
        nb, nc = _geometry(eqn, ref, wi)
        lead = ref.depth + nb
        seen = self.found.setdefault(ref.path, (lead, nc))
        if seen != (lead, nc):
            raise ValueError(
                f"leaf {ref.path!r}: LoRA needs every matmul to read it the same way; one contracts "
                f"{seen[1]} axes after {seen[0]} leading ones, another {nc} after {lead}"
            )
        return None


def _check_rules(rules: RuleSet) -> None:
    for i, (pattern, rank) in enumerate(rules):
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(
                f"rule {i} {pattern!r}: the LoRA rank must be a positive int or None, got {rank!r}"
            )


def lora_adapters(
    f: Callable,
    rules: Sequence[tuple[str, int | None]],
    key: jax.Array,
    params: Any,
    *args,
    dtype=None,
    **kwargs,
) -> Adapters:
    """Fresh LoRA adapters for ``f(params, *args, **kwargs)`` (traced once, abstractly).

    Every leaf whose first matching rule gives a rank and that a ``dot_general`` reads as
    its weight gets ``{"a": A, "b": B}``: ``A`` of shape ``(*lead, *contracted, r)``
    uniform in ``±1/sqrt(prod(contracted))`` (PEFT's default), ``B`` of shape ``(*lead, r,
    *kept)`` zero, so ``lora(f, alpha=...)(params, adapters, ...)`` starts equal to ``f``.
    ``lead`` are the leaf's stacked axes (``nn.scan``) and the matmul's batch axes.
    Matched leaves that no matmul reads (biases under ``".*"``) get none.

    Args:
      f: ``f(params, *args, **kwargs)``.
      rules: ``[(pattern, rank), ...]`` matched as every qjax rule (``re.fullmatch`` on
        the leaf path, first match wins); rank ``None`` leaves a leaf alone.
      key: PRNG key (folded with each leaf's path).
      params, args, kwargs: example inputs (only shapes matter).
      dtype: the adapters' dtype; default: the leaf's (a ``QArray``'s logical dtype).

    Returns:
      ``{leaf path: {"a": A, "b": B}}``.

    Raises:
      ValueError: a rule with a rank gives adapters to no leaf (names the pattern); a
        matched leaf read by a convolution or in a layout LoRA cannot adapt (names it).
    """
    rules = RuleSet(rules)
    _check_rules(rules)
    probe = _Probe(rules)
    traced = trace(f, params, *args, **kwargs)
    jax.eval_shape(lambda p, a: run(traced, probe, p, a)[0], list(traced.param_leaves), jax.tree.leaves(args))
    leaves = dict(zip(traced.param_paths, traced.param_leaves))
    used = {rules.match(p).index for p in probe.found}
    for i, (pattern, rank) in enumerate(rules):
        if rank is not None and i not in used:
            raise ValueError(
                f"rule {i} {pattern!r} gives LoRA adapters to no leaf: it matches no params leaf that a "
                f"dot_general reads as its weight (leaves read so: {sorted(probe.weights)})"
            )
    out = {}
    for path, (lead, nc) in probe.found.items():
        rank, leaf = rules.match(path).value, leaves[path]
        shape = tuple(leaf.shape)
        dt = dtype or leaf.dtype
        fan_in = math.prod(shape[lead : lead + nc])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(fold_in_path(key, path), (*shape[: lead + nc], rank), dt, -bound, bound)
        b = jnp.zeros((*shape[:lead], rank, *shape[lead + nc :]), dt)
        out[path] = {"a": a, "b": b}
    return out


def _check_adapters(adapters: Adapters, paths: Sequence[str]) -> None:
    if not isinstance(adapters, dict):
        raise TypeError(
            f"adapters must be a dict {{leaf path: {{'a': A, 'b': B}}}}, got {type(adapters).__name__}"
        )
    known = set(paths)
    for path, ad in adapters.items():
        if path not in known:
            raise ValueError(
                f"adapters: {path!r} is not a params leaf path (build adapters with qjax.lora_adapters)"
            )
        if not isinstance(ad, dict) or set(ad) != {"a", "b"}:
            raise ValueError(f"adapters[{path!r}] must be {{'a': A, 'b': B}}")


def lora(f: Callable, *, alpha: float) -> Callable:
    """``f`` with LoRA adapters on the matmuls that read the adapted leaves.

    ``g(params, adapters, *args, **kwargs)`` computes ``f(params, *args, **kwargs)`` with
    every ``dot_general`` that reads a leaf ``W`` with adapters ``{"a": A, "b": B}`` as
    ``x @ W + (alpha / r) * (x @ A) @ B`` (``r = A.shape[-1]``); other reads of ``W`` see
    ``W + (alpha / r) * A @ B`` (:func:`merge_lora`). ``W`` may be a float array or a
    ``QArray`` (read dequantized; for integer execution of the base wrap the result:
    ``qjax.quantized(qjax.lora(f, alpha=a), policy)``, which keeps the adapters float).

    Args:
      f: ``f(params, *args, **kwargs)``.
      alpha: LoRA's alpha; the adapter's output is scaled by ``alpha / r``.

    Returns:
      ``g(params, adapters, *args, **kwargs)``; differentiate it with respect to
      ``adapters`` to train them (``jax.grad(loss, argnums=1)``).

    Raises:
      ValueError: an adapter path that is no params leaf or that ``f`` never reads, or an
        adapted leaf read by a convolution or in a layout LoRA cannot adapt (names it).

    Example:
      >>> adapters = qjax.lora_adapters(model.apply, [(r".*/kernel", 8)], key, variables, x)
      >>> y = qjax.lora(model.apply, alpha=16.0)(variables, adapters, x)
    """

    @functools.wraps(f)
    def g(params, adapters: Adapters, *args, **kwargs):
        traced = trace(f, params, *args, **kwargs)
        _check_adapters(adapters, traced.param_paths)
        handler = _LoRA(adapters, alpha)
        outs, _ = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
        handler.check_read()
        return jax.tree.unflatten(traced.out_tree, outs)

    return g


def merge_lora(params: Any, adapters: Adapters, *, alpha: float) -> Any:
    """``params`` with each adapted leaf ``W`` replaced by ``W + (alpha / r) * A @ B``
    (computed in float32 or wider, cast to ``W``'s dtype): the float weights that
    :func:`lora`'s function computes with, for export or for ``quantize_params``.

    Raises:
      ValueError: an adapter path that is no leaf of ``params``, a ``QArray`` leaf (merge
        into the float params, then quantize), or shapes that do not fit (names the leaf).
    """
    _check_adapters(adapters, [p for p, _ in leaves_with_paths(params)])

    def visit(path, w):
        ad = adapters.get(path)
        if ad is None:
            return w
        if is_quantized(w):
            raise ValueError(
                f"leaf {path!r}: merge_lora folds adapters into float weights; this one is quantized "
                "(merge into the float params, then quantize_params)"
            )
        a, b = ad["a"], ad["b"]
        wide = jnp.promote_types(w.dtype, jnp.float32)
        delta = _delta(a.astype(wide), b.astype(wide), w.ndim)
        if delta.shape != w.shape:
            raise ValueError(f"leaf {path!r}: A @ B has shape {delta.shape}, the weight {w.shape}")
        return (w.astype(wide) + (alpha / a.shape[-1]) * delta).astype(w.dtype)

    return map_with_path(visit, params)
