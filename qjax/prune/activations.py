"""Activation norms per weight leaf (for Wanda), through the graph layer.

:func:`activation_norms` traces ``f(params, *args)`` to a jaxpr (:mod:`qjax.graph`) and
re-evaluates it on each calibration batch; every ``dot_general`` /
``conv_general_dilated`` that reads a params leaf accumulates, for every input feature
of the layer (each element of the activation's contracted axes), the sum of squares over
all other activation axes (batch, tokens, spatial positions). The square root is taken at
the end, so the result is the L2 norm over all calibration tokens, streamed (no
activation is kept).

The norm is returned in the **weight leaf's layout**: an array broadcastable to the
leaf, full along the axes the op contracts and size 1 elsewhere (shape ``(in, 1)`` for a
Dense kernel ``(in, out)``; ``(heads, head_dim, 1)`` for an attention output kernel
contracting two axes). Weights that reach the op through ``transpose``, ``reshape``,
``squeeze`` or dtype casts are mapped back exactly; other layout ops (slices,
broadcasts) are refused with an error naming the path.

Convolutions: the norm of input feature ``c`` is taken over batch and all spatial
positions of the input and broadcast over the kernel's spatial taps ``(1, 1, in, 1)``
for ``(h, w, in, out)``: the standard approximation (exact Wanda on convs would weight
each tap by the positions it sees; padding and stride make that a small difference).
Grouped convolutions (``feature_group_count > 1``) give the ``(in/groups, out)`` slab of
each output channel its group's features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.graph import Handler, WeightRef, bind_eqn, materialize, run, trace, weight_operand
from qjax.graph.layout import IDENTITY_LAYOUT, _reshape_groups
from qjax.rules import RuleSet

__all__ = ["ActivationNorms", "activation_norms"]


@jax.tree_util.register_pytree_with_keys_class
class ActivationNorms(Mapping):
    """``{path: norm}`` (a read-only mapping and a pytree, keyed like a dict) with
    ``stacks``: ``{path: leading stacked-layer axes}`` of every params leaf a ``scan`` over
    stacked params (``nn.scan``) slices, read by a matmul or not (a bias, a norm scale):
    :class:`~qjax.prune.pruners.Wanda` prunes the stacked weights layer by layer and, by
    default, skips leaves whose per-layer rank is below 2, as in the unrolled model."""

    def __init__(self, norms: dict[str, Any], stacks: dict[str, int] | None = None):
        self._norms = dict(norms)
        self.stacks = {p: d for p, d in (stacks or {}).items() if d}

    def __getitem__(self, path):
        return self._norms[path]

    def __iter__(self):
        return iter(self._norms)

    def __len__(self):
        return len(self._norms)

    def __repr__(self):
        return f"ActivationNorms({self._norms!r}, stacks={self.stacks!r})"

    def tree_flatten_with_keys(self):
        keys = tuple(self._norms)
        children = [(jax.tree_util.DictKey(k), self._norms[k]) for k in keys]
        return children, (keys, tuple(sorted(self.stacks.items())))

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, stacks = aux
        return cls(dict(zip(keys, children)), dict(stacks))


_IDENTITY = IDENTITY_LAYOUT


def _dot_sumsq(eqn, wi: int, x: jax.Array) -> jax.Array:
    """Sum of squares of the activation over its free axes, in the weight operand's layout
    (weight contracting and batch axes full, others 1)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, ac = (lc, rc) if wi == 0 else (rc, lc)
    wb, ab = (lb, rb) if wi == 0 else (rb, lb)
    keep = [*ab, *ac]
    others = [a for a in range(x.ndim) if a not in keep]
    xs = jnp.transpose(x.astype(jnp.float32), keep + others)
    r = jnp.sum(jnp.square(xs), axis=tuple(range(len(keep), x.ndim)))
    waxes = [*wb, *wc]
    r = jnp.transpose(r, np.argsort(waxes))
    wshape = tuple(eqn.invars[wi].aval.shape)
    full = [wshape[a] if a in waxes else 1 for a in range(len(wshape))]
    return r.reshape(full)


def _conv_sumsq(eqn, wi: int, x: jax.Array, path: str) -> jax.Array:
    p = eqn.params
    if wi != 1:
        raise ValueError(f"activation_norms: {path!r} is the input (lhs) of a convolution, not its kernel")
    if p.get("batch_group_count", 1) != 1:
        raise ValueError(f"activation_norms: {path!r} is read by a conv with batch_group_count > 1")
    wshape = tuple(eqn.invars[1].aval.shape)
    dn = p["dimension_numbers"]
    if not isinstance(dn, lax.ConvDimensionNumbers):
        dn = lax.conv_dimension_numbers(x.shape, wshape, dn)
    c_ax, o_ax, i_ax = dn.lhs_spec[1], dn.rhs_spec[0], dn.rhs_spec[1]
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(a for a in range(x.ndim) if a != c_ax))
    groups = p.get("feature_group_count", 1)
    full = [1] * len(wshape)
    full[i_ax] = wshape[i_ax]
    if groups == 1:
        return sq.reshape(full)
    n_out, n_in = wshape[o_ax], wshape[i_ax]
    table = sq.reshape(groups, n_in)[np.arange(n_out) // (n_out // groups)]  # (out, in)
    full[o_ax] = n_out
    if o_ax > i_ax:
        table = table.T
    return table.reshape(full)


def _to_leaf(r: jax.Array, ref: WeightRef, op_shape: tuple[int, ...]) -> jax.Array:
    """Map a weight-operand-layout array (broadcastable to ``op_shape``) back to the leaf
    layout through the inverse of the layout ops, compacted to size 1 along leaf axes it
    does not vary along."""
    shapes = [tuple(jnp.shape(ref.leaf))]
    for op in ref.ops:
        shapes.append(tuple(jax.eval_shape(op.apply, jax.ShapeDtypeStruct(shapes[-1], jnp.float32)).shape))
    dep = {a for a in range(len(op_shape)) if r.shape[a] != 1}
    y = jnp.broadcast_to(r, op_shape)
    for op, s_in, s_out in zip(reversed(ref.ops), reversed(shapes[:-1]), reversed(shapes[1:])):
        name = op.primitive.name
        if name in _IDENTITY:
            continue
        if name == "transpose":
            perm = tuple(op.params["permutation"])
            y = jnp.transpose(y, np.argsort(perm))
            dep = {perm[i] for i in dep}
        elif name == "rev":  # its own inverse; dependence stays on the same axes
            y = lax.rev(y, tuple(op.params["dimensions"]))
        elif name in ("reshape", "squeeze") and op.params.get("dimensions") is None:
            y = y.reshape(s_in)
            groups = _reshape_groups(s_in, s_out)
            if groups is None:
                dep = set(range(len(s_in)))
            else:
                dep = {i for gi, gj in groups if any(j in dep for j in gj) for i in gi}
        else:
            raise ValueError(
                f"activation_norms: weight {ref.path!r} reaches its matmul/conv through {name!r}; only "
                f"transpose, reshape, squeeze and dtype conversions can be mapped back to the leaf"
            )
    index = tuple(slice(None) if a in dep else slice(0, 1) for a in range(y.ndim))
    return y[index]


class _Norms(Handler):
    """Evaluates ops unchanged; emits the per-input-feature sum of squares by weight path."""

    def __init__(self, rules: RuleSet | None, depth: dict[str, int]):
        self.rules = rules
        self.depth = depth  # filled while tracing: leading stacked-layer axes per path

    def pool_iterations(self, key, stacked):
        # one weight read in every iteration of a scan (not a stack of layers): sums add up
        return jnp.sum(stacked, axis=0)

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        if self.rules is not None and self.rules.match(ref.path) is None:
            return None
        args = [materialize(v) for v in invals]
        (out,) = bind_eqn(eqn, args)
        x = args[1 - wi]
        self.depth[ref.path] = max(self.depth.get(ref.path, 0), ref.depth)
        if eqn.primitive.name == "dot_general":
            r = _dot_sumsq(eqn, wi, x)
        else:
            r = _conv_sumsq(eqn, wi, x, ref.path)
        emit(ref.path, _to_leaf(r, ref, tuple(eqn.invars[wi].aval.shape)))
        return [out]

    def materialize(self, ref: WeightRef):
        # a leaf read by any other op (a bias add, a norm scale): its stack depth still counts
        self.depth[ref.path] = max(self.depth.get(ref.path, 0), ref.depth)
        return super().materialize(ref)


def activation_norms(
    f: Callable,
    params: Any,
    batches: Iterable,
    patterns: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """Per-input-feature L2 norms of the activations that meet each weight leaf.

    Args:
      f: ``f(params, *args, **kwargs)``: a Linen ``apply``, ``qjax.nnx_apply(graphdef)`` or
        any function of a params pytree.
      params: the params (variables) passed to ``f``.
      batches: iterable of positional-argument tuples (a bare array means ``(array,)``);
        consumed once, streaming (sum of squares accumulated, square root at the end).
      patterns: optional path regex(es) (``re.fullmatch``) of the leaves to measure;
        default: every leaf read by a matmul/conv.
      **kwargs: static keyword arguments of ``f`` (e.g. ``train=False``).

    Returns:
      ``{path: norm}`` (an :class:`ActivationNorms`), each float32 and broadcastable to its
      leaf (see the module docstring; leaves inside an ``nn.scan`` stack get a leading layer
      axis, and ``.stacks`` says so: Wanda then ranks each layer on its own). A weight
      read by several ops sums the squares of all its inputs. An op in a ``cond``
      branch that did not run contributes nothing.

    Raises:
      ValueError: no batches; a pattern that matches no measured leaf; a weight whose
        layout ops cannot be inverted (names the path).

    Example:
      >>> norms = activation_norms(model.apply, variables, [x1, x2])
      >>> norms["params/Dense_0/kernel"].shape      # (in, 1)
      >>> masks = Wanda(sparsity=0.5).masks(variables, act_norms=norms)
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    rules = None if patterns is None else RuleSet([(p, True) for p in patterns])

    depth: dict[str, int] = {}

    def one(params, args):
        traced = trace(f, params, *args, **kwargs)
        _, emitted = run(traced, _Norms(rules, depth), list(traced.param_leaves), jax.tree.leaves(args))
        out = {}
        for path, values in emitted.items():
            total = None
            for v in values:  # NaN: a value from a cond branch that did not run
                v = jnp.where(jnp.isnan(v), 0.0, v)
                total = v if total is None else total + v
            out[path] = total
        return out

    step = jax.jit(one)
    acc: dict[str, jax.Array] = {}
    n = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        for path, v in step(params, args).items():
            acc[path] = v if path not in acc else acc[path] + v
        n += 1
    if n == 0:
        raise ValueError("activation_norms needs at least one batch")
    if rules is not None:
        unused = rules.unused(list(acc))
        if unused:
            raise ValueError(f"activation_norms: pattern(s) {unused} match no weight read by a matmul/conv")
    return ActivationNorms({p: jnp.sqrt(v) for p, v in acc.items()}, depth)
