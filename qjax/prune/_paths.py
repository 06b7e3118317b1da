"""Leaf paths of params-shaped trees: mapping with ``None`` leaves and boxes, and resolving a
tree's path (an optimizer state's, a tree over ``variables["params"]``) to a params path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from qjax.numerics.transposed import is_quantized
from qjax.rules import is_box, path_str


def _is_unit(x: Any) -> bool:
    return x is None or is_box(x) or is_quantized(x)


def map_leaves(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Apply ``fn(path, leaf)`` to every leaf, ``None`` leaves (mask trees) included; boxes
    (NNX ``Variable``s) are transparent and kept.

    Args:
      fn: ``(path, leaf or None) -> new leaf``.
      tree: any pytree.

    Returns:
      The mapped tree, same structure.

    Example:
      >>> map_leaves(lambda p, x: None if x is None else x.shape, masks)
    """

    def visit(kp, unit):
        path = path_str(kp)
        if is_box(unit):
            return jax.tree.map(
                lambda leaf: fn(path, leaf), unit, is_leaf=lambda x: x is None or is_quantized(x)
            )
        return fn(path, unit)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_unit)


def _flat(tree: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def keep(path, leaf):
        out[path] = leaf
        return leaf

    map_leaves(keep, tree)
    return out


def _suffix_index(paths) -> dict[str, set[str]]:
    """``{every /-suffix of every path: the paths ending with it}``."""
    index: dict[str, set[str]] = {}
    for q in paths:
        parts = q.split("/")
        for i in range(len(parts)):
            index.setdefault("/".join(parts[i:]), set()).add(q)
    return index


def resolve_path(path: str, shapes, suffixes: dict[str, set[str]], planned=()) -> str | None:
    """The params path a tree path refers to: an exact match, else the params path sharing
    its longest ``/``-suffix. So ``0/mu/params/Dense_0/kernel`` (adam over variables) and
    ``0/mu/Dense_0/kernel`` (adam over ``variables["params"]``) both mean
    ``params/Dense_0/kernel``; ``0/count`` means nothing. Of several params paths with that
    suffix, the one that only adds a leading collection (``params/``) wins.

    Raises:
      ValueError: several params paths fit equally and one of them is in ``planned``.
    """
    parts = path.split("/")
    for i in range(len(parts)):
        s = "/".join(parts[i:])
        if s in shapes:
            return s
        found = suffixes.get(s)
        if not found:
            continue
        if len(found) == 1:
            return next(iter(found))
        near = [q for q in found if q.count("/") == s.count("/") + 1]
        if len(near) == 1:
            return near[0]
        if "/" in s and any(q in planned for q in found):
            raise ValueError(
                f"leaf {path!r} matches several params paths by its suffix {s!r}: {sorted(found)}; "
                "pass a tree whose paths name the module fully (e.g. over the whole variables)"
            )
        return None
    return None


def _trainable(params: Any) -> set[str]:
    """Paths of the trainable leaves: NNX ``Param``s (not ``BatchStat``s); in Linen variables
    (a mapping with a ``params`` key) the ``params`` collection; otherwise every leaf."""
    linen = isinstance(params, Mapping) and "params" in params
    units = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None or is_box(x))[0]
    out = set()
    for kp, x in units:
        path = path_str(kp)
        if isinstance(x, nnx.Variable):
            keep = isinstance(x, nnx.Param)
        else:
            keep = not linen or path.split("/", 1)[0] == "params"
        if keep:
            out.add(path)
    return out
