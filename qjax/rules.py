"""The rule engine: which leaf of a pytree gets which treatment.

Leaves are addressed by their key path joined with ``/`` (``params/Dense_0/kernel``):
dict keys, attribute names and sequence indices are path parts. Boxes (Flax NNX
``Variable``s, Linen ``Partitioned`` and other ``AxisMetadata``) are transparent, so an
NNX kernel is ``a/kernel``, not ``a/kernel/value``; a ``QArray`` (or
``TransposedQArray``) is one leaf.

Rules are an ordered list of ``(pattern, value)`` matched with ``re.fullmatch``; the
first match wins; a rule whose value is ``None`` means "leave alone". Quantization
policies, pruning filters and partition rules all use this one mechanism.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import jax
from flax import nnx
from flax.core import meta as flax_meta

from qjax.numerics.transposed import is_quantized

T = TypeVar("T")

_BOX_TYPES = (nnx.Variable, flax_meta.AxisMetadata)


def is_box(x: Any) -> bool:
    """A metadata box whose contents, not itself, are the leaf (NNX Variable, Partitioned)."""
    return isinstance(x, _BOX_TYPES)


def _is_unit(x: Any) -> bool:
    return is_quantized(x) or is_box(x)


class TransparentKey:
    """A key-path entry that adds no path part: a container whose child keeps the
    container's own path (:class:`qjax.LSQParams` holds the params under one)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransparentKey)

    def __hash__(self) -> int:
        return hash(TransparentKey)

    def __repr__(self) -> str:
        return "TransparentKey()"

    def __str__(self) -> str:  # jax.tree_util.keystr: no part either
        return ""


def key_str(key: Any) -> str:
    """One path part as text."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """Join a JAX key path with ``/`` (``(DictKey('params'), DictKey('w'))`` -> ``params/w``)."""
    return "/".join(key_str(k) for k in keypath if not isinstance(k, TransparentKey))


def fold_in_path(key: jax.Array | None, path: str) -> jax.Array | None:
    """A PRNG key for one leaf: ``key`` folded with a stable hash of its path (``None``
    stays ``None``). Independent per leaf, reproducible across processes."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in flatten order; boxes transparent, a ``QArray`` (or
    ``TransposedQArray``) one leaf."""
    out = []
    for kp, unit in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_unit)[0]:
        prefix = path_str(kp)
        if is_box(unit):
            for leaf in jax.tree.leaves(unit, is_leaf=is_quantized):
                out.append((prefix, leaf))
        else:
            out.append((prefix, unit))
    return out


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Apply ``fn(path, leaf)`` to every leaf, keeping boxes and structure.

    ``fn`` may return any pytree (e.g. turn an array into a ``QArray``); inside a box
    the result is put back into the same box.
    """

    def visit(kp, unit):
        path = path_str(kp)
        if is_box(unit):
            return jax.tree.map(lambda leaf: fn(path, leaf), unit, is_leaf=is_quantized)
        return fn(path, unit)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_unit)


@dataclasses.dataclass(frozen=True)
class Match(Generic[T]):
    """The rule that matched a path: its position, pattern and value."""

    index: int
    pattern: str
    value: T


class RuleSet(Generic[T]):
    """An ordered, immutable list of ``(pattern, value)`` rules.

    Args:
      rules: ``(pattern, value)`` pairs, or objects with a ``pattern`` attribute (then the
        object itself is the value).

    Raises:
      ValueError: a pattern is not a valid regular expression (names the rule).
      TypeError: a pattern is not a string.

    Example:
      >>> rules = RuleSet([(r".*/bias", None), (r".*/kernel", 0.9)])
      >>> rules.match("params/Dense_0/kernel").value
      0.9
    """

    def __init__(self, rules: Iterable[tuple[str, T]] | Iterable[Any]):
        entries = []
        for i, rule in enumerate(rules):
            if hasattr(rule, "pattern") and not isinstance(rule, tuple):
                pattern, value = rule.pattern, rule
            else:
                try:
                    pattern, value = rule
                except (TypeError, ValueError):
                    raise TypeError(f"rule {i} must be a (pattern, value) pair, got {rule!r}") from None
            entries.append((i, pattern, value, compile_pattern(pattern, i)))
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter((p, v) for _, p, v, _ in self._entries)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p for _, p, _, _ in self._entries)

    def match(self, path: str) -> Match[T] | None:
        """The first rule whose pattern fully matches ``path``, or ``None``."""
        for i, pattern, value, regex in self._entries:
            if regex.fullmatch(path):
                return Match(i, pattern, value)
        return None

    def resolve(self, tree: Any) -> dict[str, Match[T] | None]:
        """``{path: match or None}`` for every leaf of ``tree``."""
        return {path: self.match(path) for path, _ in leaves_with_paths(tree)}

    def unused(self, tree_or_paths: Any) -> list[str]:
        """Patterns that matched no leaf (first-match semantics: a rule shadowed by an
        earlier one counts as unused). Accepts a pytree or an iterable of path strings."""
        if isinstance(tree_or_paths, (list, tuple, set)) and all(isinstance(p, str) for p in tree_or_paths):
            paths = list(tree_or_paths)
        else:
            paths = [p for p, _ in leaves_with_paths(tree_or_paths)]
        used = {m.index for m in map(self.match, paths) if m is not None}
        return [p for i, p, _, _ in self._entries if i not in used]

    def __repr__(self) -> str:
        body = ", ".join(f"({p!r}, {v!r})" for p, v in self)
        return f"RuleSet([{body}])"


def compile_pattern(pattern: Any, index: int | None = None) -> re.Pattern:
    """Compile a rule pattern, with an error that names it.

    Raises:
      TypeError: not a string; ValueError: not a valid regular expression.
    """
    where = f"rule {index} " if index is not None else ""
    if not isinstance(pattern, str):
        raise TypeError(f"{where}pattern must be a string regular expression, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}pattern {pattern!r} is not a valid regular expression: {e}") from None


def map_matched(fn: Callable[[str, Any, Match[T]], Any], tree: Any, rules: RuleSet[T]) -> Any:
    """Apply ``fn(path, leaf, match)`` to leaves whose first matching rule has a
    non-``None`` value; every other leaf is returned unchanged."""

    def visit(path, leaf):
        m = rules.match(path)
        if m is None or m.value is None:
            return leaf
        return fn(path, leaf, m)

    return map_with_path(visit, tree)
