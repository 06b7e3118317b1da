"""Per-layer sensitivity: how much the loss cares about perturbing one params leaf.

* :func:`hutchinson_trace` — Hutchinson's estimator of the trace of each leaf's diagonal
  Hessian block, ``Tr(H_ll) = E[v_lᵀ (H v)_l]`` with Rademacher probes ``v``
  (HAWQ-V2/V3). Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``),
  probes are ``vmap``-ed in chunks, and batches are streamed (the same probes on every
  batch, so the estimate is of the Hessian of the mean loss over batches).
* :func:`top_eigenvalue` — the dominant eigenvalue of each diagonal block by power
  iteration on block Hessian-vector products (HAWQ-V1).
* :func:`fisher_diagonal` / :func:`fisher_trace` — the empirical Fisher ``E[g gᵀ]`` from
  per-example gradients (its diagonal, and per-leaf traces).
* :func:`direct_sensitivity` — the measured loss change when only one leaf is quantized
  with one candidate (no approximation, one loss evaluation per pair).
* :func:`perturbation` — ``Ω = Tr(H)/n · ‖Q(W) − W‖²`` per (leaf, candidate), the
  second-order prediction ``ΔL ≈ ½ Ω`` (or ``Σ diag ⊙ (Q(W) − W)²`` from a diagonal).

Every function takes ``loss_fn(params, *batch) -> scalar`` (a mean over the batch) and
``batches``: an iterable of positional-argument tuples (a bare array means ``(array,)``),
or ``None`` for ``loss_fn(params)``. Leaves are selected by ``paths`` (regular
expressions, ``re.fullmatch`` on ``/``-joined key paths; default every float leaf).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.numerics.fake_quant import fake_quant
from qjax.numerics.transposed import is_quantized
from qjax.rules import RuleSet, leaves_with_paths

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of the trace of one leaf's (Hessian or Fisher) block.

    Attributes:
      trace: the estimate of ``Tr``.
      stderr: its standard error (sample std over probes/examples ``/ sqrt(samples)``).
      size: number of elements of the leaf (``n``).
      samples: probes (Hutchinson) or examples (Fisher) averaged.
    """

    trace: float
    stderr: float
    size: int
    samples: int

    @property
    def mean(self) -> float:
        """``Tr / n``: the average diagonal entry (the HAWQ-V2 sensitivity)."""
        return self.trace / self.size

    def __float__(self) -> float:
        return float(self.trace)


@dataclasses.dataclass(frozen=True)
class EigenEstimate:
    """The dominant (largest-magnitude, signed) eigenvalue of one leaf's Hessian block.

    Attributes:
      value: the eigenvalue estimate (the Rayleigh quotient of the last iterate).
      iterations: power iterations run.
      converged: whether the relative change fell below ``tol``.
    """

    value: float
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return float(self.value)


@dataclasses.dataclass(frozen=True)
class _Selection:
    leaves: tuple[Any, ...]
    treedef: Any
    index: tuple[int, ...]  # positions of the selected leaves in ``leaves``
    paths: tuple[str, ...]  # their paths

    @property
    def selected(self) -> list[Any]:
        return [self.leaves[i] for i in self.index]

    def merge(self, sel: Sequence[Any]) -> Any:
        leaves = list(self.leaves)
        for i, x in zip(self.index, sel):
            leaves[i] = x
        return jax.tree.unflatten(self.treedef, leaves)


def _select(params: Any, paths: str | Sequence[str] | None, what: str) -> _Selection:
    pairs = leaves_with_paths(params)
    for p, leaf in pairs:
        if is_quantized(leaf):
            raise TypeError(f"{what}: leaf {p!r} is quantized; pass the float params")
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(pairs):  # pragma: no cover - both flatten the same tree
        raise AssertionError("params flatten inconsistently")
    if isinstance(paths, str):
        paths = [paths]
    rules = None if paths is None else RuleSet([(p, True) for p in paths])
    index = [
        i
        for i, (p, leaf) in enumerate(pairs)
        if hasattr(leaf, "dtype")
        and jnp.issubdtype(leaf.dtype, jnp.inexact)
        and (rules is None or rules.match(p) is not None)
    ]
    if rules is not None:
        unused = rules.unused([pairs[i][0] for i in index])
        if unused:
            raise ValueError(f"{what}: paths pattern(s) {unused} matched no float leaf of params")
    if not index:
        raise ValueError(f"{what}: params has no float leaves to differentiate")
    return _Selection(tuple(leaves), treedef, tuple(index), tuple(pairs[i][0] for i in index))


def _batch_list(batches: Iterable | None, what: str) -> list[tuple]:
    if batches is None:
        return [()]
    out = [b if isinstance(b, tuple) else (b,) for b in batches]
    if not out:
        raise ValueError(f"{what}: batches is empty")
    return out


def _loss_of(loss_fn: LossFn, sel: _Selection) -> Callable:
    def f(selected, *batch):
        return loss_fn(sel.merge(selected), *batch)

    return f


def _hvp(f: Callable, selected, tangent, batch):
    """Forward-over-reverse Hessian-vector product of ``f`` w.r.t. the selected leaves."""
    return jax.jvp(lambda s: jax.grad(f)(s, *batch), (selected,), (tangent,))[1]


def _vdot32(a, b) -> jax.Array:
    return jnp.vdot(a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel())


def _check_finite(what: str, values: np.ndarray, paths: Sequence[str], batch: int | None) -> None:
    """Raise if ``values`` (``[..., leaves]``, concrete, from batch ``batch``; ``None``:
    all batches) hold NaN/inf, naming the leaves: a NaN sensitivity would later forbid
    every candidate of its layer without a word."""
    bad = [p for p, ok in zip(paths, np.isfinite(values).reshape(-1, len(paths)).all(0)) if not ok]
    if bad:
        where = "the batches give" if batch is None else f"batch {batch} gives"
        raise ValueError(
            f"{what}: {where} a NaN or inf for leaves {bad}: the loss or its derivatives are not "
            "finite there (NaN/inf labels or inputs, or a diverged model); check loss_fn on every batch"
        )


def _rademacher(key, leaves: Sequence[Any]) -> list[jax.Array]:
    """One ±1 probe per leaf from a single random-bits call (one threefry call site
    compiles ~3x faster than one per leaf)."""
    sizes = [math.prod(x.shape) for x in leaves]
    signs = (jax.random.bits(key, (sum(sizes),), jnp.uint8) & 1).astype(jnp.float32) * 2 - 1
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(signs[start : start + n].reshape(x.shape).astype(x.dtype))
        start += n
    return out


def hutchinson_trace(
    loss_fn: LossFn,
    params: Any,
    key: jax.Array,
    num_probes: int = 64,
    *,
    batches: Iterable | None = None,
    paths: str | Sequence[str] | None = None,
    chunk: int = 16,
) -> dict[str, TraceEstimate]:
    """Hutchinson estimate of the trace of each selected leaf's diagonal Hessian block.

    One Rademacher probe ``v`` over all selected leaves gives, for every leaf at once,
    ``v_lᵀ (H v)_l`` whose expectation is ``Tr(H_ll)``. Probes run ``chunk`` at a time
    under ``vmap``; with several batches each probe's quadratic form is averaged over the
    batches (equal weights: give equal-sized batches) before averaging over probes.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` (``loss_fn(params)`` without batches).
      params: float params pytree (no ``QArray``).
      key: PRNG key for the probes.
      num_probes: number of Rademacher probes (the standard error falls as ``1/√probes``).
      batches: iterable of argument tuples, streamed; ``None``: ``loss_fn(params)``.
      paths: regular expression(s) selecting leaves (default: every float leaf).
      chunk: probes per vmapped Hessian-vector product (memory ∝ chunk × params).

    Returns:
      ``{path: TraceEstimate}``.

    Raises:
      ValueError: ``num_probes``/``chunk`` < 1, empty batches, or a ``paths`` pattern
        matches no float leaf (the pattern is named). TypeError: a ``QArray`` leaf.

    Example:
      >>> loss = lambda p, x, y: xent(model.apply(p, x), y).mean()
      >>> tr = hutchinson_trace(loss, variables, jax.random.key(0), 128, batches=[(x, y)])
      >>> tr["params/Dense_0/kernel"].mean      # Tr(H)/n
    """
    if int(num_probes) < 1 or int(chunk) < 1:
        raise ValueError(f"hutchinson_trace: num_probes and chunk must be >= 1, got {num_probes}, {chunk}")
    sel = _select(params, paths, "hutchinson_trace")
    f = _loss_of(loss_fn, sel)
    batch_list = _batch_list(batches, "hutchinson_trace")

    @functools.partial(jax.jit, static_argnums=0)
    def quad(count, selected, k, batch):
        def one(kk):
            v = _rademacher(kk, selected)
            hv = _hvp(f, selected, v, batch)
            return jnp.stack([_vdot32(a, b) for a, b in zip(v, hv)])

        return jax.vmap(one)(jax.random.split(k, count))

    num_probes, chunk = int(num_probes), min(int(chunk), int(num_probes))
    sizes = [min(chunk, num_probes - s) for s in range(0, num_probes, chunk)]
    z = np.zeros((num_probes, len(sel.index)), np.float64)
    selected = sel.selected
    for b, batch in enumerate(batch_list):
        start = 0
        for c, count in enumerate(sizes):
            q = np.asarray(quad(count, selected, jax.random.fold_in(key, c), batch))
            _check_finite("hutchinson_trace", q, sel.paths, b)
            z[start : start + count] += q
            start += count
    z /= len(batch_list)
    std = z.std(axis=0, ddof=1) if num_probes > 1 else np.zeros(z.shape[1])
    return {
        p: TraceEstimate(
            float(z[:, j].mean()), float(std[j] / math.sqrt(num_probes)), int(x.size), num_probes
        )
        for j, (p, x) in enumerate(zip(sel.paths, selected))
    }


def top_eigenvalue(
    loss_fn: LossFn,
    params: Any,
    key: jax.Array,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    batches: Iterable | None = None,
    paths: str | Sequence[str] | None = None,
) -> dict[str, EigenEstimate]:
    """The dominant eigenvalue of each selected leaf's diagonal Hessian block, by power
    iteration on block Hessian-vector products (the tangent is zero outside the leaf).

    Args:
      loss_fn, params, batches, paths: as :func:`hutchinson_trace` (``batches`` is
        iterated once per iteration, so give a sequence).
      key: PRNG key of the random start vectors.
      iters: maximum iterations per leaf.
      tol: stop when the Rayleigh quotient changes by less than ``tol × |λ|``.

    Returns:
      ``{path: EigenEstimate}`` (largest magnitude, signed; for a positive semi-definite
      block, the top eigenvalue).

    Raises:
      ValueError: ``iters`` < 1, empty batches, or a pattern matches nothing.

    Example:
      >>> lam = top_eigenvalue(loss, variables, jax.random.key(0), batches=[(x, y)])
    """
    if int(iters) < 1:
        raise ValueError(f"top_eigenvalue: iters must be >= 1, got {iters}")
    sel = _select(params, paths, "top_eigenvalue")
    f = _loss_of(loss_fn, sel)
    batch_list = list(_batch_list(batches, "top_eigenvalue"))
    selected = sel.selected
    hvp = jax.jit(functools.partial(_hvp, f))
    out = {}
    for j, (path, leaf) in enumerate(zip(sel.paths, selected)):
        zeros = [jnp.zeros_like(x) for x in selected]
        v = jax.random.normal(jax.random.fold_in(key, j), leaf.shape, jnp.float32)
        v = v / jnp.linalg.norm(v)
        lam, converged, it = 0.0, False, 0
        for it in range(1, int(iters) + 1):
            tangent = list(zeros)
            tangent[j] = v.astype(leaf.dtype)
            w = sum(hvp(selected, tangent, b)[j].astype(jnp.float32) for b in batch_list) / len(batch_list)
            new = float(_vdot32(v, w))
            norm = float(jnp.linalg.norm(w))
            _check_finite("top_eigenvalue", np.array([new, norm]), [path], None)
            if norm == 0.0:
                lam, converged = 0.0, True
                break
            v = w / norm
            if it > 1 and abs(new - lam) <= tol * abs(new):
                lam, converged = new, True
                break
            lam = new
        out[path] = EigenEstimate(lam, it, converged)
    return out


def _fisher(loss_fn: LossFn, params: Any, batches: Iterable, paths, what: str):
    sel = _select(params, paths, what)
    f = _loss_of(loss_fn, sel)

    @jax.jit
    def per_batch(selected, batch):
        def grad_one(*example):
            return jax.grad(f)(selected, *(e[None] for e in example))

        g = jax.vmap(grad_one)(*batch)
        sq = [jnp.square(x.astype(jnp.float32)) for x in g]
        return [s.sum(0) for s in sq], jnp.stack([s.reshape(s.shape[0], -1).sum(1) for s in sq], 1)

    batch_list = _batch_list(batches, what)
    if batch_list == [()]:
        raise ValueError(f"{what}: needs batches of examples (per-example gradients)")
    diag, norms, n = None, [], 0
    for b, batch in enumerate(batch_list):
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in batch}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"{what}: every argument of a batch needs the same leading example axis")
        d, sq = per_batch(sel.selected, batch)
        diag = d if diag is None else [a + b for a, b in zip(diag, d)]
        norms.append(np.asarray(sq, np.float64))
        _check_finite(what, norms[-1], sel.paths, b)
        n += sizes.pop()
    norms = np.concatenate(norms, 0)
    if norms.size and not norms.any():
        warnings.warn(
            f"{what}: every per-example gradient is exactly zero (a loss at its minimum, e.g. a "
            "distillation loss against the model itself): the empirical Fisher carries no "
            "sensitivity information here; use hutchinson_trace (Gauss-Newton at such a point) or "
            "direct_sensitivity",
            RuntimeWarning,
            stacklevel=3,
        )
    return sel, [x / n for x in diag], norms


def fisher_diagonal(
    loss_fn: LossFn, params: Any, batches: Iterable, *, paths: str | Sequence[str] | None = None
) -> dict[str, jax.Array]:
    """Diagonal of the empirical Fisher ``(1/N) Σ_i g_i ⊙ g_i`` of each selected leaf,
    ``g_i`` the gradient of ``loss_fn`` on example ``i`` alone.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` mean loss; it is called on one
        example at a time as a batch of one (every batch argument is sliced along its
        leading axis).
      params: float params pytree.
      batches: iterable of argument tuples with a leading example axis.
      paths: regular expression(s) selecting leaves (default: every float leaf).

    Returns:
      ``{path: float32 array of the leaf's shape}``.

    Raises:
      ValueError: no batches, arguments of a batch disagree on the example count, or a
        pattern matches nothing.

    Example:
      >>> fd = fisher_diagonal(loss, variables, [(x, y)])
    """
    sel, diag, _ = _fisher(loss_fn, params, batches, paths, "fisher_diagonal")
    return dict(zip(sel.paths, diag))


def fisher_trace(
    loss_fn: LossFn, params: Any, batches: Iterable, *, paths: str | Sequence[str] | None = None
) -> dict[str, TraceEstimate]:
    """Per-leaf trace of the empirical Fisher, ``(1/N) Σ_i ‖g_{i,l}‖²``, with its standard
    error over examples. Arguments as :func:`fisher_diagonal`.

    Returns:
      ``{path: TraceEstimate}`` (``samples`` = number of examples).

    Raises:
      ValueError: as :func:`fisher_diagonal`.

    Example:
      >>> ft = fisher_trace(loss, variables, [(x, y)])
    """
    sel, _, norms = _fisher(loss_fn, params, batches, paths, "fisher_trace")
    n = norms.shape[0]
    std = norms.std(axis=0, ddof=1) if n > 1 else np.zeros(norms.shape[1])
    return {
        p: TraceEstimate(float(norms[:, j].mean()), float(std[j] / math.sqrt(n)), int(x.size), n)
        for j, (p, x) in enumerate(zip(sel.paths, sel.selected))
    }


def direct_sensitivity(
    loss_fn: LossFn,
    params: Any,
    candidates: Sequence[Candidate],
    *,
    batches: Iterable | None = None,
    paths: str | Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """The measured loss increase when only one leaf's weight is fake-quantized with one
    candidate (all other leaves float): ``L(params with Q(W_l)) − L(params)``.

    Candidates without a weight spec get 0 (activation quantization is not visible to a
    loss of params); candidates whose spec does not fit a leaf are left out of its dict.

    Args:
      loss_fn, params, batches, paths: as :func:`hutchinson_trace` (``batches`` is iterated
        once per (leaf, candidate): give a sequence).
      candidates: the :class:`Candidate` list.

    Returns:
      ``{path: {candidate name: Δloss}}``.

    Raises:
      ValueError / TypeError: bad candidates, empty batches, or a pattern matches nothing.

    Example:
      >>> d = direct_sensitivity(loss, variables, weight_candidates(), batches=[(x, y)])
      >>> d["params/Dense_0/kernel"]["int4"]
    """
    candidates = check_candidates(candidates)
    sel = _select(params, paths, "direct_sensitivity")
    f = jax.jit(_loss_of(loss_fn, sel))
    batch_list = list(_batch_list(batches, "direct_sensitivity"))
    selected = sel.selected

    def mean_loss(s):
        return float(np.mean([float(f(s, *b)) for b in batch_list]))

    losses = [float(f(selected, *b)) for b in batch_list]
    bad = [b for b, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"direct_sensitivity: the float loss is NaN or inf on batches {bad} (NaN/inf labels or "
            "inputs, or a diverged model); check loss_fn on every batch"
        )
    base = float(np.mean(losses))
    out: dict[str, dict[str, float]] = {}
    for j, (path, leaf) in enumerate(zip(sel.paths, selected)):
        row = {}
        for c in candidates:
            if c.weight is None:
                row[c.name] = 0.0
            elif c.fits(leaf) is None:
                s = list(selected)
                s[j] = fake_quant(leaf, c.weight)
                row[c.name] = mean_loss(s) - base
        out[path] = row
    return out
