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
one adapter per layer / expert. A leaf stored PyTorch-style, kept axes before contracted
ones (``(N, K)`` read as ``x @ w.T`` or ``einsum("bk,nk->bn")``, a tied LM head reading
the embedding table) gets PEFT's layout: ``A: (*batch, r, *contracted)`` (``lora_A``) and
``B: (*batch, *kept, r)`` (``lora_B``), merged as ``W + (alpha / r) * B @ A``; PEFT
adapters of such a weight load as ``{"a": lora_A, "b": lora_B}``. Weights read through
other layouts (reshaped, permuted otherwise, or by a convolution) are refused, naming the
leaf.

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
from qjax.graph.weight_ref import leaf_axes
from qjax.numerics.transposed import is_quantized
from qjax.rules import RuleSet, fold_in_path, leaves_with_paths, map_with_path

Adapters = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """How a matmul reads an adapted leaf: ``nb`` leading batch / stack axes, then the
    ``nc`` contracted axes before the ``nk`` kept ones (``out_first=False``: Flax's ``(K,
    N)``; adapters ``A (*lead, *contracted, r)``, ``B (*lead, r, *kept)``) or after them
    (``out_first=True``: PyTorch's ``(N, K)`` read as ``x @ w.T``; PEFT's ``A (*lead, r,
    *contracted)``, ``B (*lead, *kept, r)``). ``a_axes``: the axis of ``A`` paired with each
    contracting dimension of the matmul, in its order."""

    nb: int
    nc: int
    nk: int
    out_first: bool
    a_axes: tuple[int, ...]

    def shapes(self, leaf_shape: tuple[int, ...], r: int) -> tuple[tuple, tuple]:
        """``(A shape, B shape)`` for a leaf of ``leaf_shape`` and rank ``r``."""
        lead, nb, nc, nk = leaf_shape[: self.nb], self.nb, self.nc, self.nk
        if self.out_first:
            kept, contracted = leaf_shape[nb : nb + nk], leaf_shape[nb + nk :]
            return (*lead, r, *contracted), (*lead, *kept, r)
        contracted, kept = leaf_shape[nb : nb + nc], leaf_shape[nb + nc :]
        return (*lead, *contracted, r), (*lead, r, *kept)

    @property
    def b_rank_axis(self) -> int:
        return -1 if self.out_first else self.nb


def _geometry(eqn, ref: WeightRef, wi: int) -> _Geometry:
    """How the ``dot_general`` ``eqn`` reads the weight operand ``wi`` (see
    :class:`_Geometry`).

    Raises:
      ValueError: the op is not a ``dot_general``, the weight reaches it through layout
        ops other than transposes and casts, or its axes are in neither layout (names the
        leaf).
    """
    where = f"leaf {ref.path!r}: LoRA"
    if eqn.primitive.name != "dot_general":
        raise ValueError(f"{where} adapts dot_general matmuls; this leaf is read by {eqn.primitive.name}")
    ndim = len(eqn.invars[wi].aval.shape)
    leaf = leaf_axes(ref, ndim)
    if leaf is None:
        moved = [op.primitive.name for op in ref.ops if op.primitive.name not in IDENTITY_LAYOUT]
        raise ValueError(
            f"{where} needs the weight read in its stored layout or transposed; it reaches its matmul "
            f"through {moved}: leave it out of the rules"
        )
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, rc)[wi], (lb, rb)[wi]
    nb, nc = len(batch), len(contract)
    kept = [leaf[d] for d in range(ndim) if d not in contract and d not in batch]
    c_leaf = [leaf[d] for d in contract]
    nk = len(kept)
    lead_ok = [leaf[d] for d in batch] == list(range(nb))
    in_first = sorted(c_leaf) == list(range(nb, nb + nc)) and kept == list(range(nb + nc, ndim))
    out_first = kept == list(range(nb, nb + nk)) and sorted(c_leaf) == list(range(nb + nk, ndim)) and nk > 0
    if not lead_ok or not (in_first or out_first):
        raise ValueError(
            f"{where} needs the matmul to batch over the leaf's leading axes, then contract the next ones "
            "and keep the rest (Flax's (K, N)) or keep the next ones and contract the rest (PyTorch's "
            f"(N, K), read as x @ w.T); it batches over leaf axes {[leaf[d] for d in batch]}, contracts "
            f"{c_leaf} and keeps {kept} of {ndim}"
        )
    base = nb + nk if out_first else nb
    offset = nb + 1 if out_first else nb  # A's first contracted axis
    a_axes = tuple(offset + (c - base) for c in c_leaf)
    return _Geometry(nb, nc, nk, bool(out_first and not in_first), a_axes)


def _layout(a, b, shape: tuple[int, ...], path: str = "") -> tuple[bool, int]:
    """``(out_first, nb)`` of adapters ``a``, ``b`` for a leaf of ``shape``: contracted axes
    first (``A (*lead, *contracted, r)``, ``B (*lead, r, *kept)``) or PyTorch's layout
    (PEFT's ``A (*lead, r, *contracted)``, ``B (*lead, *kept, r)``), told apart by the shapes.

    Shapes that fit both (a square weight with ``r`` equal to its sizes, which
    :func:`lora_adapters` never makes for the PyTorch layout) are read as contracted-first.

    Raises:
      ValueError: the shapes fit neither layout.
    """
    in_first, out_first, nb = _fits(tuple(a.shape), tuple(b.shape), tuple(shape))
    if not (in_first or out_first):
        raise ValueError(
            f"leaf {path!r}: LoRA adapters a={a.shape}, b={b.shape} do not fit the weight {shape}"
        )
    return not in_first, nb


def _fits(a: tuple, b: tuple, shape: tuple) -> tuple[bool, bool, int]:
    """``(fits contracted-first, fits PyTorch layout, leading axes)`` of adapter shapes."""
    nb = len(a) + len(b) - 2 - len(shape)
    in_first = nb >= 0 and a[-1] == b[nb] and (*a[:-1], *b[nb + 1 :]) == shape
    out_first = nb >= 0 and b[-1] == a[nb] and (*b[:-1], *a[nb + 1 :]) == shape
    return in_first, out_first, nb


def _delta(a, b, shape: tuple[int, ...], path: str = "") -> jax.Array:
    """The weight update ``A @ B`` (or PEFT's ``B @ A``) in the leaf's layout."""
    out_first, nb = _layout(a, b, shape, path)
    batch = tuple(range(nb))
    x, y = (b, a) if out_first else (a, b)
    return lax.dot_general(x, y, (((x.ndim - 1,), (nb,)), (batch, batch)), precision=lax.Precision.HIGHEST)


def _rank(adapter, shape: tuple[int, ...], path: str = "") -> int:
    """``r`` of an adapter for a leaf of ``shape``."""
    out_first, nb = _layout(adapter["a"], adapter["b"], shape, path)
    return adapter["a"].shape[nb] if out_first else adapter["a"].shape[-1]


def _check_shapes(path: str, adapter: dict, leaf_shape: tuple, geo: _Geometry) -> None:
    a, b = adapter["a"], adapter["b"]
    r = a.shape[-1 if not geo.out_first else geo.nb] if a.ndim > geo.nb else None
    want_a, want_b = geo.shapes(tuple(leaf_shape), r)
    if a.shape != want_a or b.shape != want_b:
        raise ValueError(
            f"leaf {path!r}: LoRA adapter shapes a={a.shape}, b={b.shape} do not fit the weight "
            f"{tuple(leaf_shape)} as its matmul reads it (expected a={want_a}, b={want_b})"
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

    def _scale(self, ref: WeightRef, geo: _Geometry | None = None) -> float:
        if geo is not None:  # the matmul's layout is known
            return self.alpha / ref.aux["a"].shape[geo.nb if geo.out_first else -1]
        return self.alpha / _rank(ref.aux, tuple(ref.leaf.shape), ref.path)

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None or invals[wi].aux is None:
            return None
        ref, x = invals[wi], invals[1 - wi]
        _check_outside_shard_map(ref)
        self.matmul_paths.add(ref.path)
        geo = _geometry(eqn, ref, wi)
        nb = geo.nb
        w = materialize(ref)  # the base matmul is f's own: an outer quantized() replaces it
        _check_shapes(ref.path, ref.aux, tuple(ref.leaf.shape), geo)
        operands = [None, None]
        operands[wi], operands[1 - wi] = w, x
        base = bind_eqn(eqn, operands)[0]
        a, b = (ref.aux[k].astype(w.dtype) for k in ("a", "b"))
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        xc, xb = (lc, rc)[1 - wi], (lb, rb)[1 - wi]
        prec = eqn.params["precision"]
        t = lax.dot_general(
            x, a, ((xc, geo.a_axes), (xb, tuple(range(nb)))), precision=prec
        )  # (batch, x kept, r)
        u = lax.dot_general(
            t,
            b,
            (((t.ndim - 1,), (geo.b_rank_axis % b.ndim,)), (tuple(range(nb)), tuple(range(nb)))),
            precision=prec,
        )  # (batch, x kept, w kept)
        if wi == 0:  # the op's output is (batch, w kept, x kept)
            nx, nw = t.ndim - 1 - nb, b.ndim - 1 - nb
            u = jnp.transpose(u, (*range(nb), *range(nb + nx, nb + nx + nw), *range(nb, nb + nx)))
        return [base + (self._scale(ref, geo) * u).astype(base.dtype)]

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
        delta = _delta(ref.aux["a"], ref.aux["b"], w.shape, ref.path)
        w = w + (self._scale(ref) * delta).astype(w.dtype)
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
        geo = _geometry(eqn, ref, wi)
        lead = ref.depth + geo.nb
        now = (lead, geo.nc, geo.nk, geo.out_first)
        seen = self.found.setdefault(ref.path, now)
        if seen != now:
            raise ValueError(
                f"leaf {ref.path!r}: LoRA needs every matmul to read it the same way; one has (leading, "
                f"contracted, kept, PyTorch layout) axes {seen}, another {now}"
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
    *kept)`` zero, so ``lora(f, alpha=...)(params, adapters, ...)`` starts equal to ``f``;
    for a leaf stored with its kept axes first (PyTorch's ``(N, K)`` read transposed)
    ``A (*lead, r, *contracted)`` and ``B (*lead, *kept, r)``, as PEFT.
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
        matched leaf read by a convolution or in a layout LoRA cannot adapt (names it); a
        square leaf read transposed with a rank equal to its size (its adapters' shapes
        would fit both layouts).
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
    for path, (lead, nc, nk, out_first) in probe.found.items():
        rank, leaf = rules.match(path).value, leaves[path]
        shape = tuple(leaf.shape)
        dt = dtype or leaf.dtype
        geo = _Geometry(lead, nc, nk, out_first, ())
        a_shape, b_shape = geo.shapes(shape, rank)
        if out_first and all(_fits(a_shape, b_shape, shape)[:2]):
            raise ValueError(
                f"rule {rules.match(path).pattern!r}: leaf {path!r} ({shape}, read transposed) with rank "
                f"{rank}: its adapters' shapes {a_shape}, {b_shape} would fit the other layout too; use "
                "another rank"
            )
        bound = 1.0 / math.sqrt(math.prod(shape[lead + nk :] if out_first else shape[lead : lead + nc]))
        a = jax.random.uniform(fold_in_path(key, path), a_shape, dt, -bound, bound)
        out[path] = {"a": a, "b": jnp.zeros(b_shape, dt)}
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
        delta = _delta(a.astype(wide), b.astype(wide), jnp.shape(w), path)
        return (w.astype(wide) + (alpha / _rank(ad, jnp.shape(w), path)) * delta).astype(w.dtype)

    return map_with_path(visit, params)
