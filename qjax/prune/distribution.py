"""Per-leaf sparsities from one target: ``uniform`` and ``erk`` (Erdős–Rényi-Kernel).

A distribution maps ``{path: shape}`` and a target sparsity to ``{path: sparsity}``;
:func:`leaf_counts` turns that into exact per-leaf counts of pruned elements. Per-path
overrides are rules (``(pattern, 0.3)`` or ``LeafConfig(sparsity=...)``); leaves with an
override are left out of the distribution, which spreads the target over the others.

All functions accept a traced sparsity (a static Python loop over the leaves with
``jnp`` ops); a Python float is computed in float64 NumPy instead (exact counts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.prune.sparsity import check_sparsity, target_count

__all__ = ["DISTRIBUTIONS", "erk", "erk_densities", "get_distribution", "leaf_counts", "uniform"]

Shapes = Mapping[str, tuple[int, ...]]


def _xp(sparsity: Any):
    return np if isinstance(sparsity, float | int | np.floating | np.integer) else jnp


def uniform(shapes: Shapes, sparsity: Any) -> dict[str, Any]:
    """Every leaf gets the same sparsity.

    Example:
      >>> uniform({"a": (4, 4), "b": (8, 2)}, 0.5)
      {'a': 0.5, 'b': 0.5}
    """
    return {p: sparsity for p in shapes}


def erk_densities(shapes: list[tuple[int, ...]], sparsity: Any, power_scale: float = 1.0) -> Any:
    """ERK densities (Evci et al. 2020, "Rigging the Lottery", Appendix / RigL code).

    Leaf ``l`` with shape ``s_l`` and ``n_l`` elements gets density
    ``d_l = eps * raw_l`` with ``raw_l = (sum(s_l) / prod(s_l)) ** power_scale``, and
    ``eps`` solved so that ``sum(d_l * n_l) = (1 - sparsity) * sum(n_l)``. Leaves whose
    density would exceed 1 are made dense (all leaves sharing the largest ``raw`` at once,
    as in the RigL code) and ``eps`` is re-solved for the rest, until no density exceeds
    1 (at most one round per leaf: a static loop, jit-safe). Empty leaves get density 1.

    Args:
      shapes: leaf shapes.
      sparsity: the overall target (Python float: float64 NumPy; array: float32 jnp).
      power_scale: exponent on ``raw`` (1.0 is ERK; 0 gives uniform).

    Returns:
      ``(L,)`` densities in ``[0, 1]`` (NumPy or jnp like the computation).

    Example:
      >>> erk_densities([(3, 3, 64, 64), (64, 10), (2, 2)], 0.9)   # the (2, 2) leaf stays dense
    """
    xp = _xp(sparsity)
    dtype = np.float64 if xp is np else jnp.float32
    n = np.array([math.prod(s) for s in shapes], np.float64)
    raw_np = np.array(
        [(sum(s) / math.prod(s)) ** power_scale if math.prod(s) else 0.0 for s in shapes], np.float64
    )
    if xp is np:
        s = float(check_sparsity(sparsity))
    else:
        s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    n_x, raw = xp.asarray(n, dtype), xp.asarray(raw_np, dtype)
    empty = xp.asarray(n == 0)
    kept_target = (1.0 - s) * xp.sum(n_x)

    def solve(dense):
        kept_dense = xp.sum(xp.where(dense, n_x, 0.0))
        denom = xp.sum(xp.where(dense, 0.0, raw * n_x))
        safe = xp.where(denom > 0, denom, 1.0)
        return xp.where(denom > 0, (kept_target - kept_dense) / safe, 0.0)

    dense = empty
    for _ in range(len(shapes)):
        eps = solve(dense)
        cand = xp.where(dense, -np.inf, raw)
        top = xp.max(cand) if len(shapes) else 0.0
        top = xp.where(xp.isfinite(top), top, 0.0)  # every leaf dense already
        dense = dense | ((~dense) & (cand == top) & (eps * top > 1.0))
    eps = solve(dense)
    return xp.where(dense, 1.0, xp.clip(eps * raw, 0.0, 1.0))


def erk(shapes: Shapes, sparsity: Any, power_scale: float = 1.0) -> dict[str, Any]:
    """ERK per-leaf sparsities: ``1 - erk_densities`` (see :func:`erk_densities`).

    Small layers (large ``sum(shape) / prod(shape)``) stay denser, large ones sparser; the
    element-weighted mean sparsity equals the target.

    Example:
      >>> erk({"conv": (3, 3, 64, 64), "fc": (64, 10)}, 0.9)
    """
    paths = list(shapes)
    dens = erk_densities([tuple(shapes[p]) for p in paths], sparsity, power_scale)
    return {p: 1.0 - dens[i] for i, p in enumerate(paths)}


DISTRIBUTIONS: dict[str, Callable[[Shapes, Any], dict[str, Any]]] = {"uniform": uniform, "erk": erk}


def get_distribution(distribution: str | Callable) -> Callable[[Shapes, Any], dict[str, Any]]:
    """A distribution by name (``"uniform"``, ``"erk"``) or a callable
    ``fn(shapes, sparsity) -> {path: sparsity}`` returned as is.

    Raises:
      ValueError: an unknown name (the message lists the known ones).

    Example:
      >>> get_distribution("erk") is erk
      True
    """
    if callable(distribution):
        return distribution
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; known: {sorted(DISTRIBUTIONS)} or a callable"
        )
    return DISTRIBUTIONS[distribution]


def _apportion(xp, t, n, total):
    """Integer counts ``c`` with ``0 <= c <= n``, ``sum(c) == total`` (when feasible),
    ``c`` the floor of the real targets ``t`` plus one for the largest remainders (ties by
    index: the lower index first)."""
    itype = np.int64 if xp is np else jnp.int32
    n_i = xp.asarray(n, itype)
    f = xp.clip(xp.floor(t), 0, n).astype(itype)
    rem = t - f
    d = xp.asarray(total, itype) - xp.sum(f)
    L = len(n)
    pos = xp.arange(L)
    # Add one to the largest remainders among leaves with room ...
    up_key = xp.where(f < n_i, -rem, np.inf)
    # ... or (float error only) take one from the smallest remainders among non-empty counts.
    down_key = xp.where(f > 0, rem, np.inf)
    if xp is np:
        up, down = np.argsort(up_key, kind="stable"), np.argsort(down_key, kind="stable")
        add = np.zeros(L, itype)
        add[up] = (pos < d) & (up_key[up] < np.inf)
        sub = np.zeros(L, itype)
        sub[down] = (pos < -d) & (down_key[down] < np.inf)
    else:
        up, down = jnp.argsort(up_key, stable=True), jnp.argsort(down_key, stable=True)
        add = jnp.zeros(L, itype).at[up].set(((pos < d) & (up_key[up] < jnp.inf)).astype(itype))
        sub = jnp.zeros(L, itype).at[down].set(((pos < -d) & (down_key[down] < jnp.inf)).astype(itype))
    return f + add - sub


def leaf_counts(shapes: Shapes, sparsity: Any, distribution: str | Callable = "uniform") -> dict[str, Any]:
    """Exact numbers of elements to prune per leaf.

    ``"uniform"``: each leaf prunes ``floor(sparsity * n + 0.5)`` of its ``n`` elements
    (the per-leaf rounding rule). Any other distribution (``"erk"``, a callable): the
    per-leaf real targets ``s_l * n_l`` are apportioned by largest remainder, so the total
    is exactly ``floor(sparsity * N + 0.5)`` over all ``N`` elements of these leaves.

    Args:
      shapes: ``{path: shape}`` of the leaves sharing the target.
      sparsity: the target (float in [0, 1] or a possibly traced scalar).
      distribution: ``"uniform"``, ``"erk"`` or ``fn(shapes, sparsity) -> {path: sparsity}``.

    Returns:
      ``{path: count}`` (Python ints for a Python float sparsity, else int32 scalars).

    Raises:
      ValueError: unknown distribution; a sparsity outside [0, 1]; a callable that
        leaves out a path or returns a sparsity outside [0, 1].

    Example:
      >>> leaf_counts({"a": (5,), "b": (3, 3)}, 0.5)
      {'a': 3, 'b': 5}
      >>> sum(leaf_counts({"conv": (3, 3, 8, 8), "fc": (64, 10)}, 0.9, "erk").values())
      1094
    """
    sparsity = check_sparsity(sparsity)
    fn = get_distribution(distribution)
    paths = list(shapes)
    if not paths:
        return {}
    sizes = [math.prod(shapes[p]) for p in paths]
    if fn is uniform:
        return {p: target_count(sparsity, n) for p, n in zip(paths, sizes)}
    if _xp(sparsity) is np:
        per_leaf = _per_leaf(fn, shapes, sparsity, paths, repr(distribution))
        vals = [float(check_sparsity(per_leaf[p], f"sparsity of {p!r}")) for p in paths]
        t = np.array(vals, np.float64) * np.array(sizes, np.float64)
        counts = _apportion(np, t, np.array(sizes, np.int64), target_count(sparsity, sum(sizes)))
        return {p: int(c) for p, c in zip(paths, counts)}
    key = tuple((p, tuple(shapes[p])) for p in paths)
    counts = _traced_counts(key, fn, repr(distribution), jnp.asarray(sparsity, jnp.float32))
    return dict(zip(paths, counts))


def _per_leaf(fn, shapes, sparsity, paths, distribution) -> Mapping[str, Any]:
    per_leaf = fn(shapes, sparsity)
    missing = [p for p in paths if p not in per_leaf]
    if missing:
        raise ValueError(f"distribution {distribution} returned no sparsity for {missing}")
    return per_leaf


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _traced_counts(key: tuple, fn: Callable, name: str, sparsity: jax.Array) -> list[jax.Array]:
    """Counts for an array sparsity: one compiled program per (shapes, distribution)."""
    paths = [p for p, _ in key]
    shapes = dict(key)
    sizes = [math.prod(s) for _, s in key]
    per_leaf = _per_leaf(fn, shapes, sparsity, paths, name)
    vals = jnp.stack([jnp.clip(jnp.asarray(per_leaf[p], jnp.float32), 0.0, 1.0) for p in paths])
    t = vals * jnp.asarray(sizes, jnp.float32)
    counts = _apportion(jnp, t, np.array(sizes, np.int64), target_count(sparsity, sum(sizes)))
    return [counts[i] for i in range(len(paths))]
