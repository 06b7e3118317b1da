"""Tracing a function of a params pytree to a jaxpr whose invars carry param paths."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qjax.numerics.transposed import TransposedQArray, is_quantized, swapped_spec
from qjax.rules import leaves_with_paths, map_with_path


def abstract_params(params: Any) -> Any:
    """``params`` with every ``QArray`` (or ``TransposedQArray``) replaced by the float
    array it stands for, as a ``jax.ShapeDtypeStruct`` (the model function is traced on
    float params)."""

    def visit(_, leaf):
        if not is_quantized(leaf):
            return leaf
        # in Explicit mesh mode the codes' sharding is part of their type: the float
        # array they stand for gets the same spec (packing halves an axis, not its spec;
        # a TransposedQArray's logical axes are its stored ones with the last two swapped)
        codes = leaf.stored.values if isinstance(leaf, TransposedQArray) else leaf.values
        sharding = getattr(jax.typeof(codes), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is None or all(e is None for e in spec):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        if isinstance(leaf, TransposedQArray):
            sharding = sharding.update(spec=swapped_spec(spec, leaf.ndim))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return map_with_path(visit, params)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced ``f(params, *args, **kwargs)``.

    Attributes:
      jaxpr: the closed jaxpr; its first ``len(param_paths)`` invars are the params leaves.
      param_paths: the path of each params leaf, in flatten order.
      param_leaves: the params leaves as given (``QArray``s kept), in the same order.
      out_tree: the treedef of ``f``'s output.
    """

    jaxpr: Any
    param_paths: tuple[str, ...]
    param_leaves: tuple[Any, ...]
    out_tree: Any


def trace(f, params: Any, *args, **kwargs) -> Traced:
    """Trace ``f(params, *args, **kwargs)`` to a jaxpr, remembering which invar is which
    params leaf. ``QArray`` leaves are traced as float arrays of their logical shape.
    Positional ``args`` are traced (arrays); keyword arguments are static (e.g.
    ``train=False``) and closed over.

    Raises:
      TypeError: from ``f`` itself when it cannot be traced.
    """
    pairs = leaves_with_paths(params)
    abstract = abstract_params(params)
    closed, out_shape = jax.make_jaxpr(lambda p, a: f(p, *a, **kwargs), return_shape=True)(abstract, args)
    n = len(jax.tree.leaves(abstract))
    if n != len(pairs):  # pragma: no cover - both flatten the same tree
        raise AssertionError(f"params flatten to {n} leaves but {len(pairs)} paths")
    return Traced(
        jaxpr=closed,
        param_paths=tuple(p for p, _ in pairs),
        param_leaves=tuple(leaf for _, leaf in pairs),
        out_tree=jax.tree.structure(out_shape),
    )


def nnx_apply(graphdef, method: str = "__call__"):
    """Turn an NNX ``graphdef`` into ``f(state, *args, **kwargs)`` for the function
    transforms: ``qjax.quantized(qjax.nnx_apply(graphdef), policy)(state, x)``.

    Args:
      graphdef: from ``graphdef, state = nnx.split(model)``.
      method: the model method to call.
    """
    from flax import nnx

    def apply(state, *args, **kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return apply
