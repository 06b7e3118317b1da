"""How values a handler emits inside a loop body pool over the iterations: running min /
max of ``(lo, hi)`` ranges or means of the non-NaN values (NaN marks "not executed", e.g.
an untaken ``cond`` branch). Used for ``while_loop`` bodies (in the carry) and for ops of a
``scan`` that read one weight in every iteration (over the stacked values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_init(how: str, shape):
    """The empty accumulator for values shaped like ``shape`` (``how``: ``"min_max"`` or ``"mean"``)."""
    if how == "min_max":
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shape)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    return zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.int32), shape)  # sums, counts


def acc_step(how: str, acc, value):
    """``acc`` with one iteration's ``value`` added (NaN entries ignored)."""
    if how == "min_max":
        (lo_acc, hi_acc), (lo, hi) = acc, value
        return jnp.fmin(lo_acc, lo), jnp.fmax(hi_acc, hi)
    sums, counts = acc
    seen = jax.tree.map(lambda v: ~jnp.isnan(v), value)
    sums = jax.tree.map(lambda t, v, m: t + jnp.where(m, v, 0), sums, value, seen)
    return sums, jax.tree.map(lambda c, m: c + m, counts, seen)


def acc_result(how: str, acc):
    """The pooled value (NaN where no iteration contributed)."""
    if how == "min_max":
        return acc
    sums, counts = acc
    return jax.tree.map(lambda t, c: jnp.where(c > 0, t / jnp.maximum(c, 1), jnp.nan), sums, counts)


def pool_iterations(how: str, stacked):
    """Values stacked over a scan's iterations, pooled as a ``while_loop``'s carry pools
    them (NaN: not executed, ignored)."""
    if how == "min_max":
        lo, hi = stacked
        return jnp.nanmin(lo, axis=0), jnp.nanmax(hi, axis=0)
    seen = jax.tree.map(lambda v: ~jnp.isnan(v), stacked)
    sums = jax.tree.map(lambda v, m: jnp.sum(jnp.where(m, v, 0), axis=0), stacked, seen)
    counts = jax.tree.map(lambda m: jnp.sum(m, axis=0), seen)
    return acc_result("mean", (sums, counts))
