"""Streaming statistics of the activation inputs of the matmuls/convs that read params.

One mechanism for everything that needs "what goes into the layer that reads weight W":
GPTQ/AWQ Hessians (``XᵀX``), Wanda's per-input-feature norms, SmoothQuant's per-channel
maxima. :func:`input_statistics` traces ``f`` once per input shape, re-evaluates it
over calibration batches and, for every ``dot_general`` / ``conv_general_dilated`` that
reads a matched params leaf, hands the activation operand to a user statistic as a 2-D
``rows`` array: one row per token/position, one column per element of the weight's
contracted axes (in the leaf's axis order, flattened). The statistic's results are summed
(or combined by ``combine=``, e.g. ``jnp.maximum`` for running maxima) over the reads of
the op and over the batches; nothing else is kept.

With ``grouped=True`` the statistic is kept per expert where a mixture-of-experts matmul
gives each expert its own tokens: a ``dot_general`` whose batch dimensions index the weight
(``"ecd,edf->ecf"``, dispatched tokens per expert) and a ``lax.ragged_dot`` (``(M, K)`` rows
sorted by expert times ``(G, K, N)``) each give one statistic per index of the weight's
batch / group axes (:attr:`InputStatistic.groups`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.graph.interpret import Handler, WeightRef, bind_eqn, materialize, run
from qjax.graph.layout import IDENTITY_LAYOUT
from qjax.graph.trace import trace
from qjax.graph.weight_ref import leaf_axes, ragged_weight
from qjax.rules import RuleSet


@dataclasses.dataclass(frozen=True)
class InputStatistic:
    """The accumulated statistic of one weight's layer inputs.

    Attributes:
      value: the statistic summed over all reads and batches: leading stacked-layer axes
        first for an op inside a ``scan`` over stacked params, then one axis per entry of
        ``groups``.
      rows: how many activation rows (tokens/positions) were summed: an ``int``, or for a
        grouped statistic an int64 array ``(*stacked layers, *groups)`` of each expert's.
      weight_axes: the axes of the params leaf that the statistic's columns run over (the
        contracted axes, in leaf order, flattened in that order).
      weight_shape: the params leaf's shape.
      depth: how many leading axes of the leaf (and of ``value``) are stacked layers (the
        op sits inside a ``scan`` over stacked params, e.g. ``nn.scan``): 0 otherwise.
      op: the primitive that reads the weight (``"dot_general"``,
        ``"conv_general_dilated"`` or ``"ragged_dot_general"``).
      groups: the leaf axes (in leaf order) that index experts with their own tokens, each
        with its own statistic (``input_statistics(grouped=True)``: a ``dot_general``'s
        batch dimensions, a ragged dot's group axis); ``()`` otherwise.
    """

    value: Any
    rows: Any
    weight_axes: tuple[int, ...]
    weight_shape: tuple[int, ...]
    depth: int = 0
    op: str = "dot_general"
    groups: tuple[int, ...] = ()


def _view_to_leaf_axes(ref: WeightRef, view_ndim: int) -> list[int]:
    """For each axis of the weight as the op sees it, the params-leaf axis it is
    (layout ops may only be transposes and dtype conversions)."""
    axes = leaf_axes(ref, view_ndim)
    if axes is None:
        moved = [op.primitive.name for op in ref.ops if op.primitive.name not in IDENTITY_LAYOUT]
        raise ValueError(
            f"{ref.path!r}: the weight reaches its matmul/conv through {moved[0]!r}; only "
            "transposes and dtype conversions can be mapped back to the params leaf's axes"
        )
    return [a + ref.depth for a in axes]


def _paired(leaf_axes: list[int], w_dims, a_dims) -> tuple[tuple, tuple]:
    """The weight's ``w_dims`` as leaf axes sorted, and the activation dims paired with them."""
    order = np.argsort([leaf_axes[d] for d in w_dims])
    return tuple(leaf_axes[w_dims[i]] for i in order), tuple(a_dims[i] for i in order)


def _batch_dims(eqn, wi: int, ref: WeightRef) -> tuple[tuple, tuple]:
    """``(weight leaf axes that are batch dimensions of the dot_general, sorted; the
    activation's batch dimensions paired with them)``."""
    leaf_axes = _view_to_leaf_axes(ref, eqn.invars[wi].aval.ndim)
    _, (lb, rb) = eqn.params["dimension_numbers"]
    return _paired(leaf_axes, *((rb, lb) if wi == 1 else (lb, rb)))


def contraction(
    eqn, wi: int, ref: WeightRef, what: str = "input statistics", grouped: bool = False
) -> tuple[tuple, tuple]:
    """``(weight leaf axes contracted, sorted; the activation axes paired with them, in the
    same order)`` of the ``dot_general``/``conv_general_dilated`` ``eqn`` whose operand
    ``wi`` is ``ref``; of a ``lax.ragged_dot`` (standard form, ``wi = 1``), the expert
    weight's K axis and the rows' K axis.

    Raises:
      ValueError: naming ``what`` and the path: the weight reaches the op through a layout
        op other than a transpose/conversion, a dot_general has batch dimensions (unless
        ``grouped``), or a convolution is grouped or has the weight as its lhs.
    """
    leaf_axes = _view_to_leaf_axes(ref, eqn.invars[wi].aval.ndim)
    if eqn.primitive.name == "ragged_dot_general":
        return (leaf_axes[1],), (1,)
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if (lb or rb) and not grouped:
            raise ValueError(
                f"{what} of {ref.path!r}: a dot_general with batch dimensions (expert weights read per "
                "expert, e.g. 'ecd,edf->ecf'), whose experts' inputs cannot be pooled "
                "(input_statistics(grouped=True) keeps one per expert, as qjax.gptq does)"
            )
        return _paired(leaf_axes, *((rc, lc) if wi == 1 else (lc, rc)))
    if wi != 1:
        raise ValueError(f"{what} of {ref.path!r}: the weight is the convolution's lhs")
    if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
        raise ValueError(f"{what} of {ref.path!r}: grouped/depthwise convolutions are not supported")
    dn = eqn.params["dimension_numbers"]
    return (leaf_axes[dn.rhs_spec[1]],), (dn.lhs_spec[1],)


def _rows(eqn, act, wi: int, ref: WeightRef, grouped: bool) -> tuple[jax.Array, tuple, tuple]:
    """The activation as ``[*batch, rows, K]`` with ``K`` ordered like the weight leaf's
    contracted axes and the batch dimensions (only with ``grouped``) like the weight leaf's
    batch axes; those contracted axes, and those batch axes."""
    w_axes, a_contract = contraction(eqn, wi, ref, grouped=grouped)
    groups, a_batch = _batch_dims(eqn, wi, ref) if eqn.primitive.name == "dot_general" else ((), ())
    rest = [a for a in range(act.ndim) if a not in a_contract and a not in a_batch]
    x = jnp.transpose(act, (*a_batch, *rest, *a_contract))
    k = int(np.prod([act.shape[a] for a in a_contract]))
    return x.reshape(*(act.shape[a] for a in a_batch), -1, k), w_axes, groups


def _per_group(statistic: Callable, rows: jax.Array, n_batch: int) -> Any:
    """``statistic`` of each ``rows[i, j, ...]`` over the ``n_batch`` leading axes."""
    for _ in range(n_batch):
        statistic = jax.vmap(statistic)
    return statistic(rows)


def _ragged_groups(statistic: Callable, rows: jax.Array, group_sizes: jax.Array) -> tuple[Any, jax.Array]:
    """``statistic`` of each expert's rows of a ragged dot (rows sorted by expert), the other
    rows zeroed, one expert at a time (memory of one copy of ``rows``), and the row counts."""
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")  # G past the last

    def one(g):
        return statistic(jnp.where((expert == g)[:, None], rows, jnp.zeros((), rows.dtype)))

    return lax.map(one, jnp.arange(group_sizes.shape[0])), group_sizes.astype(jnp.int32)


class _Collect(Handler):
    def __init__(self, rules: RuleSet | None, statistic: Callable, combine: Callable, grouped: bool):
        self.rules = rules
        self.statistic = statistic
        self.combine = combine
        self.grouped = grouped
        self.meta: dict[str, tuple] = {}

    def pool_iterations(self, key, stacked):
        # one weight read in every iteration of a scan: one op, its reads combined
        value, rows = stacked
        n = jnp.shape(rows)[0]
        pooled = jax.tree.map(lambda a: functools.reduce(self.combine, [a[i] for i in range(n)]), value)
        return pooled, jnp.sum(rows, axis=0)

    def _note(self, path: str, meta: tuple) -> None:
        """Record how ``path`` is read; its reads must agree on the statistic's layout (per
        expert or pooled), or their statistics could not be added."""
        prev = self.meta.setdefault(path, meta)
        if prev[0] != meta[0]:
            raise ValueError(
                f"input statistics of {path!r}: it is read with different contracted axes ({prev[0]} and "
                f"{meta[0]}: x @ w and y @ w.T, say), whose statistics cannot be added"
            )
        if prev[3] != meta[3] or prev[1] != meta[1]:
            raise ValueError(
                f"input statistics of {path!r}: it is read both per expert (groups along leaf axes "
                f"{prev[3] or meta[3]}) and by ops that pool every token, whose statistics cannot be added"
            )

    def _selected(self, ref: WeightRef) -> bool:
        return self.rules is None or self.rules.match(ref.path) is not None

    def target(self, eqn, invals, emit):
        refs = [i for i in (0, 1) if isinstance(invals[i], WeightRef)]
        if len(refs) != 1 or not self._selected(invals[refs[0]]):
            return None
        wi = refs[0]
        ref = invals[wi]
        args = [materialize(x) for x in invals]
        rows, w_axes, groups = _rows(eqn, args[1 - wi], wi, ref, self.grouped)
        self._note(ref.path, (w_axes, ref.depth, eqn.primitive.name, groups))
        value = _per_group(self.statistic, rows.astype(jnp.float32), len(groups))
        count = rows.shape[-2]
        emit(ref.path, (value, jnp.full(rows.shape[:-2], count, jnp.int32) if groups else count))
        return bind_eqn(eqn, args)

    def other(self, eqn, invals, emit):
        """A ``lax.ragged_dot`` reading an expert weight ``(G, K, N)``: with ``grouped``, the
        statistic of each expert's rows. Otherwise it has no statistic (its rows belong to
        different experts): skipped, or refused when a pattern asked for it."""
        ref = ragged_weight(eqn, invals)
        if ref is None or not self._selected(ref) or (not self.grouped and self.rules is None):
            return None
        if not self.grouped:
            raise ValueError(
                f"input statistics of {ref.path!r}: a lax.ragged_dot (each expert reads its own rows), "
                "whose experts' inputs cannot be pooled (input_statistics(grouped=True) keeps one per "
                "expert, as qjax.gptq does)"
            )
        w_axes, _ = contraction(eqn, 1, ref)
        group = _view_to_leaf_axes(ref, 3)[0]
        value, counts = _ragged_groups(self.statistic, invals[0].astype(jnp.float32), invals[2])
        self._note(ref.path, (w_axes, ref.depth, eqn.primitive.name, (group,)))
        emit(ref.path, (value, counts))
        return None


def input_statistics(
    f: Callable,
    params: Any,
    batches: Iterable,
    statistic: Callable[[jax.Array], Any],
    *,
    patterns: str | Sequence[str] | None = None,
    combine: Callable[[Any, Any], Any] = jnp.add,
    grouped: bool = False,
    **kwargs,
) -> dict[str, InputStatistic]:
    """Sum ``statistic(rows)`` of every matched layer's input over ``batches``.

    Args:
      f: ``f(params, *args, **kwargs)``: Linen ``apply``, ``qjax.nnx_apply(graphdef)`` or
        a plain function of a params pytree.
      params: float params.
      batches: iterable of positional-argument tuples (a bare array means ``(array,)``).
      statistic: ``rows [R, K] float32 -> pytree of arrays`` (e.g. ``lambda x: x.T @ x``);
        results are combined across reads and batches with ``combine``, so it must be
        additive (or, e.g., a maximum with ``combine=jnp.maximum``).
      patterns: param-path regular expression(s) (``re.fullmatch``) selecting the weights;
        ``None``: every weight read by a matmul/conv.
      combine: associative ``(a, b) -> a ⊕ b`` applied leafwise to merge the statistics of
        reads and batches (default ``jnp.add``; ``jnp.maximum`` for per-channel maxima).
      grouped: keep one statistic per expert of a mixture-of-experts matmul: a
        ``dot_general`` whose batch dimensions index the weight (``"ecd,edf->ecf"``), and a
        ``lax.ragged_dot`` of ``(M, K)`` rows sorted by expert and a ``(G, K, N)`` weight
        (standard dimension numbers). A ragged dot's statistic sees each expert's rows with
        the other rows zeroed, so it must ignore zero rows (Gram matrices, sums of squares,
        absolute maxima do). Default ``False``: a batch-dimension matmul is refused, a
        ragged dot skipped (refused when ``patterns`` select it).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``{path: InputStatistic}``.

    Raises:
      ValueError: no batches; a pattern matches no op; the weight reaches the op through a
        reshape (its axes cannot be mapped back), or the op has batch dimensions or is a
        ragged dot without ``grouped``, or is a grouped convolution (the error names the
        path).

    Example:
      >>> stats = input_statistics(model.apply, variables, [(x,) for x in calib],
      ...                          lambda r: r.T @ r, patterns=r".*/kernel")
      >>> h = stats["params/Dense_0/kernel"].value / stats["params/Dense_0/kernel"].rows
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    rules = None if patterns is None else RuleSet([(p, True) for p in patterns])
    cache: dict[Any, tuple] = {}

    def compiled(args):
        sig = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), args)
        key = (jax.tree.structure(args), tuple(jax.tree.leaves(sig)))
        if key not in cache:
            traced = trace(f, params, *args, **kwargs)
            handler = _Collect(rules, statistic, combine, grouped)

            def one(leaves, args_leaves):
                emitted = run(traced, handler, leaves, args_leaves)[1]
                out = {}
                for path, values in emitted.items():
                    total = functools.reduce(lambda a, b: jax.tree.map(combine, a, b), [v[0] for v in values])
                    out[path] = (total, sum(v[1] for v in values))
                return out

            cache[key] = (traced, handler, jax.jit(one))
        return cache[key]

    totals: dict[str, list] = {}
    meta: dict[str, tuple] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    n = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        traced, handler, fn = compiled(args)
        out = fn(list(traced.param_leaves), jax.tree.leaves(args))
        meta.update(handler.meta)
        shapes.update({p: tuple(np.shape(leaf)) for p, leaf in zip(traced.param_paths, traced.param_leaves)})
        for path, (value, rows) in out.items():
            rows = np.asarray(rows)
            # ungrouped rows stacked per layer inside a scan are all equal
            rows = rows.astype(np.int64) if handler.meta[path][3] else int(np.ravel(rows)[0])
            if path in totals:
                prev, prev_rows = totals[path]
                totals[path] = [jax.tree.map(combine, prev, value), prev_rows + rows]
            else:
                totals[path] = [value, rows]
        n += 1
    if n == 0:
        raise ValueError("input_statistics needs at least one batch")
    if rules is not None:
        unused = rules.unused(list(totals))
        if unused:
            raise ValueError(f"input_statistics: pattern(s) {unused} matched no matmul/conv weight")
    return {
        path: InputStatistic(value, rows, meta[path][0], shapes[path], *meta[path][1:])
        for path, (value, rows) in totals.items()
    }


def gram(rows: jax.Array) -> jax.Array:
    """``rowsᵀ·rows`` at full float32 precision (the layer-input Hessian of GPTQ up to 2/N)."""
    return lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
