"""Per-input-channel smoothing factors: ``x @ W == (x / s) @ (diag(s) · W)``.

A factor ``s`` (shape ``[K]``, positive) of the matmul reading weight ``W`` multiplies
the weight's input rows by ``s`` and divides its activation input by ``s``; the product is
unchanged in exact arithmetic, but the ranges each operand presents to a quantizer move
(SmoothQuant migrates activation outliers into the weight; AWQ enlarges salient weight
rows). ``K`` runs over the weight's contracted axes in leaf order, flattened, exactly like
the columns of :func:`qjax.graph.statistics.input_statistics` (``InputStatistic.weight_axes``).

* :func:`smooth` applies factors to params: weight rows scaled, and the ``1/s`` folded
  into the producer's params where :func:`qjax.graph.fold.fold_groups` allows it
  (LayerNorm/RMSNorm ``gamma``/``beta``, a previous linear layer's output columns and
  bias); the other factors are returned as *runtime factors*.
* :func:`with_input_scales` applies runtime factors: ``f`` re-evaluated with the
  activation of each listed matmul divided by its factor. The weight still flows from
  ``params`` to the matmul, so ``qjax.quantized``/``qjax.calibrate``/``input_statistics``
  compose with it.

Invariant: ``with_input_scales(f, runtime)(smoothed, x) == f(params, x)`` up to float
rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.fold import FoldGroup, fold_groups, non_matmul_reads
from qjax.graph.interpret import Handler, WeightRef, bind_eqn, materialize, run, weight_operand
from qjax.graph.statistics import contraction
from qjax.graph.trace import trace
from qjax.graph.weight_ref import ragged_weight
from qjax.numerics.transposed import is_quantized
from qjax.rules import leaves_with_paths, map_with_path

FactorKey = str | tuple[str, ...]
_OPAQUE = frozenset({"scan", "cond", "while", "shard_map"})  # matmul reads inside: handled by the walker


def _contraction(eqn, wi: int, ref: WeightRef) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The contracted weight-leaf axes and their paired activation axes (see
    :func:`qjax.graph.statistics.contraction`). Expert weights read per expert (batch
    dimensions, ``"ecd,edf->ecf"``) share one factor on their contracted axes: dividing
    every expert's inputs by it and scaling every expert's rows keeps the product."""
    return contraction(eqn, wi, ref, "smoothing", grouped=True)


def _check_depth(ref: WeightRef) -> None:
    if ref.depth:
        raise ValueError(
            f"smoothing {ref.path!r}: the weight is read inside a scan over stacked params; per-layer "
            "factors of a stacked weight are not supported"
        )


class _InputTransform(Handler):
    """Rebinds every matmul reading a weight of ``table`` with its activation transformed:
    ``transform(act, act_axes, table[path], path)`` (``act_axes``: the activation axes the
    matmul contracts, paired with the weight's contracted axes in leaf order)."""

    def __init__(self, table: Mapping[str, Any], transform: Callable, what: str):
        self.table, self.transform, self.what = table, transform, what
        self.seen: set[str] = set()

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None or invals[wi].path not in self.table:
            return None
        return self._apply(eqn, invals, wi)

    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot``'s rows, transformed like a matmul's activation (one factor
        or permutation on K shared by all experts)."""
        ref = ragged_weight(eqn, invals)
        if ref is None or ref.path not in self.table:
            return None
        return self._apply(eqn, invals, 1)

    def _apply(self, eqn, invals, wi: int):
        ref = invals[wi]
        if ref.depth:
            raise ValueError(
                f"{self.what} {ref.path!r}: the weight is read inside a scan over stacked params; one "
                "input transform per layer of a stacked weight is not supported"
            )
        args = [materialize(x) for x in invals]
        _, a_axes = _contraction(eqn, wi, ref)
        args[1 - wi] = self.transform(args[1 - wi], a_axes, self.table[ref.path], ref.path)
        self.seen.add(ref.path)
        return bind_eqn(eqn, args)


def transform_inputs(f: Callable, table: Mapping[str, Any], transform: Callable, what: str) -> Callable:
    """``f`` re-evaluated with the activation input of every matmul reading a weight of
    ``table`` transformed (:class:`_InputTransform`); the weights still flow from ``params``
    into the matmuls. Calling the result raises ``ValueError`` for a path no matmul reads."""

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        traced = trace(f, params, *args, **kwargs)
        handler = _InputTransform(table, transform, what)
        outs, _ = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
        missing = sorted(set(table) - handler.seen)
        if missing:
            raise ValueError(f"{what}: no matmul/conv reads {missing}")
        return jax.tree.unflatten(traced.out_tree, outs)

    return g


def _divide(act, a_axes, s, path: str):
    sizes = [act.shape[a] for a in a_axes]
    if s.shape != (math.prod(sizes),):
        raise ValueError(f"input factor of {path!r}: shape {s.shape}, the matmul contracts {sizes}")
    s_nd = jnp.transpose(s.reshape(sizes), np.argsort(a_axes))
    shape = [act.shape[d] if d in a_axes else 1 for d in range(act.ndim)]
    return (act / s_nd.reshape(shape).astype(act.dtype)).astype(act.dtype)


def _expand(factors: Mapping[FactorKey, Any]) -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    for key, s in factors.items():
        for path in (key,) if isinstance(key, str) else tuple(key):
            if path in out:
                raise ValueError(f"input factor of {path!r} given twice")
            out[path] = jnp.asarray(s)
    return out


def with_input_scales(f: Callable, factors: Mapping[FactorKey, Any]) -> Callable:
    """``f`` with the activation input of the matmuls reading each listed weight divided
    by its per-input-channel factor (the runtime half of :func:`smooth`).

    Args:
      f: ``f(params, *args, **kwargs)``.
      factors: ``{path or tuple of paths: s}``, ``s`` of shape ``[K]`` in the order of
        the weight's contracted axes (leaf order, flattened); every read of the weight
        is divided. Empty: ``f`` itself is returned.

    Returns:
      ``g(params, *args, **kwargs)``; the weights still flow from ``params`` into the
      matmuls, so ``qjax.quantized(g, policy)`` and ``qjax.calibrate(g, ...)`` see them.

    Raises:
      ValueError (when ``g`` is called): a path is read by no matmul, the factor's shape
      does not match, or the weight sits in a ``scan`` over stacked params (names the path).

    Example:
      >>> smoothed, runtime = smooth(model.apply, variables, factors, x)
      >>> y = qjax.quantized(with_input_scales(model.apply, runtime), policy)(qparams, x)
    """
    table = _expand(factors)
    if not table:
        return f
    return transform_inputs(f, table, _divide, "with_input_scales")


class _Axes(Handler):
    def __init__(self):
        self.axes: dict[str, tuple[int, ...]] = {}

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is not None:
            self._record(eqn, invals[wi], wi)
        return None

    def other(self, eqn, invals, emit):
        ref = ragged_weight(eqn, invals)
        if ref is not None:
            self._record(eqn, ref, 1)
        return None

    def _record(self, eqn, ref: WeightRef, wi: int) -> None:
        try:
            _check_depth(ref)
            axes = _contraction(eqn, wi, ref)[0]
        except ValueError as e:
            axes = e  # reported only if a factor is asked for this path
        prev = self.axes.setdefault(ref.path, axes)
        if not isinstance(prev, Exception) and prev != axes:
            self.axes[ref.path] = ValueError(f"smoothing {ref.path!r}: read with different contracted axes")


def input_axes(f: Callable, params: Any, *args, **kwargs) -> dict[str, tuple[int, ...] | Exception]:
    """``{path: contracted leaf axes}`` of every weight a matmul/conv of ``f`` reads
    (an exception instead, raised by :func:`smooth` if a factor is given for it)."""
    traced = trace(f, params, *args, **kwargs)
    handler = _Axes()
    jax.eval_shape(
        lambda p, a: run(traced, handler, p, a)[0], list(traced.param_leaves), jax.tree.leaves(args)
    )
    return handler.axes


def row_factor(s: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """``s`` (``[K]``) reshaped to broadcast over a leaf of ``shape`` along ``axes``."""
    return jnp.reshape(s, [shape[a] if a in axes else 1 for a in range(len(shape))])


def _check_factor(path: str, s, k: int) -> jax.Array:
    s = jnp.asarray(s)
    if s.shape != (k,):
        raise ValueError(f"input factor of {path!r}: shape {s.shape}, expected ({k},)")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
        raise ValueError(f"input factor of {path!r}: must be finite and positive")
    return s


def smooth(
    f: Callable,
    params: Any,
    factors: Mapping[FactorKey, Any],
    *args,
    groups: list[FoldGroup] | None = None,
    **kwargs,
) -> tuple[Any, dict[str, jax.Array]]:
    """Apply per-input-channel factors: weight rows × ``s``, activations ÷ ``s`` folded
    into params where possible.

    A factor keyed by the exact set of paths of a foldable group (see
    :func:`qjax.graph.fold.fold_groups`; a 1-path group may be keyed by the path) is
    folded into that group's producer leaves; any other key (a path of a non-foldable
    group, a part of a group, several paths sharing one factor) gets runtime factors.

    Args:
      f: ``f(params, *args, **kwargs)``.
      params: float params.
      factors: ``{path or tuple of paths: s}``, ``s`` of shape ``[K]``, positive.
      *args: example positional arguments of ``f`` (shapes and dtypes matter).
      groups: precomputed ``fold_groups(f, params, *args, **kwargs)``.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``(smoothed params, runtime factors {path: s})``:
      ``with_input_scales(f, runtime)(smoothed, *args) == f(params, *args)`` up to rounding.

    Raises:
      ValueError: a path is not a weight read by a matmul, is also read by another op
        (e.g. a tied embedding's lookup), is already quantized, is given twice, or its
        factor has the wrong shape or is not positive (names the path). Factors are
        validated, so ``smooth`` runs eagerly (not under ``jit``).

    Example:
      >>> groups = fold_groups(model.apply, variables, x)
      >>> s = {g.paths: my_factor(g) for g in groups}
      >>> smoothed, runtime = smooth(model.apply, variables, s, x, groups=groups)
    """
    if groups is None:
        groups = fold_groups(f, params, *args, **kwargs)
    axes = input_axes(f, params, *args, **kwargs)
    others = non_matmul_reads(f, params, *args, **kwargs)
    leaves = dict(leaves_with_paths(params))
    foldable = {frozenset(g.paths): g for g in groups if g.foldable}
    new: dict[str, jax.Array] = {}
    runtime: dict[str, jax.Array] = {}
    seen: set[str] = set()

    def current(path):
        leaf = new.get(path, leaves[path])
        if is_quantized(leaf):
            raise ValueError(f"smoothing {path!r}: the leaf is quantized; smooth float params")
        return jnp.asarray(leaf)

    def put(path, value, like):
        new[path] = value.astype(like.dtype)

    for key, s in factors.items():
        paths = (key,) if isinstance(key, str) else tuple(key)
        for path in paths:
            if path not in axes:
                raise ValueError(f"input factor for {path!r}: no matmul/conv reads this params leaf")
            if isinstance(axes[path], Exception):
                raise axes[path]
            if path in seen:
                raise ValueError(f"input factor of {path!r} given twice")
            other = [p for p in others.get(path, []) if p not in _OPAQUE]
            if other:
                raise ValueError(
                    f"input factor of {path!r}: the leaf is also read by {other[0]!r} (not as a matmul "
                    "weight), which scaling its rows would change"
                )
            seen.add(path)
        for path in paths:
            w = current(path)
            k = math.prod(w.shape[a] for a in axes[path])
            sp = _check_factor(path, s, k)
            put(path, w * row_factor(sp, w.shape, axes[path]), w)
        group = foldable.get(frozenset(paths))
        if group is None:
            runtime.update(dict.fromkeys(paths, sp))
            continue
        ext = jnp.ones(group.num_channels + 1, sp.dtype).at[group.channel_ids].set(sp)
        for path, ids in group.targets:
            leaf = current(path)
            put(path, leaf / ext[ids], leaf)
    return map_with_path(lambda p, leaf: new.get(p, leaf), params), runtime
