"""Partition rules: leaf path -> ``PartitionSpec``, through the shared rule engine.

A partition rule is a ``(pattern, value)`` pair of :class:`qjax.rules.RuleSet` (``re.fullmatch``
on the ``/``-joined leaf path, first match wins). The value is one of

* a ``jax.sharding.PartitionSpec`` of mesh axis names (``P(None, "tensor")``);
* a tuple of *logical* axis names (``("embed", "mlp")``), mapped to mesh axes with Flax's
  ``logical_axis_rules`` semantics (``flax.linen.logical_to_mesh_axes``);
* a callable ``(path, leaf, mesh) -> PartitionSpec`` (the presets' column/row/FSDP splits);
  ``leaf`` is an array, a ``jax.ShapeDtypeStruct`` or a ``QArray``;
* ``None``: leave alone, i.e. replicate.

A leaf that no rule matches takes its sharding from its box's metadata: Linen
``nn.with_partitioning`` (mesh axes), ``nn.with_logical_partitioning`` (logical names, with
the box's own rules and ``logical_axis_rules``), NNX ``out_sharding`` (mesh axes, or logical
names when ``logical_axis_rules`` or the variable's ``sharding_rules`` are given); with none
it is replicated.

A ``QArray`` is one leaf: the spec applies to its stored ``values``; scales follow
(:func:`qjax.graph.sharding.scale_spec`: the same mesh axes, ``None`` where the scale
dimension is 1), and a grouped or packed axis may only be split at group/byte boundaries.
A ``TransposedQArray`` is one leaf too, and its spec names the *logical* axes (those the
model reads, e.g. ``(K, N)`` of a ``Dense`` kernel stored ``(N, K)``): rules and presets
see it as the ``QArray`` it stands for, and the specs are moved to the stored axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import meta as flax_meta
from flax.linen import spmd as linen_spmd
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qjax.graph.sharding import qarray_specs
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray, swapped_spec
from qjax.rules import Match, RuleSet

SpecValue = P | tuple | Callable[[str, Any, Mesh], P] | None
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def as_ruleset(rules: Any) -> RuleSet:
    """``rules`` as a :class:`qjax.rules.RuleSet` (a list of ``(pattern, value)`` pairs or a RuleSet)."""
    return rules if isinstance(rules, RuleSet) else RuleSet(list(rules or ()))


def stored_shape(leaf: Any) -> tuple[int, ...]:
    """The shape a spec applies to: a ``QArray``'s stored ``values``, else the leaf's."""
    x = leaf.values if isinstance(leaf, QArray) else leaf
    return tuple(int(d) for d in np.shape(x))


def axis_size(mesh: Mesh, entry: Any) -> int:
    """Devices a spec entry (``None``, an axis name or a tuple of them) splits a dimension into."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _where(path: str, match: Match | None) -> str:
    rule = "" if match is None else f" (rule {match.index} {match.pattern!r})"
    return f"leaf {path!r}{rule}"


def logical_to_spec(names: Sequence[Any], logical_axis_rules: LogicalRules | None) -> P:
    """Map logical axis names to a mesh ``PartitionSpec`` (Flax semantics: rules in order,
    each mesh axis used once, unknown names replicated)."""
    spec = linen_spmd.logical_to_mesh_axes(tuple(names), list(logical_axis_rules or ()))
    return P() if spec is None else spec


def box_spec(box: Any, logical_axis_rules: LogicalRules | None) -> P | None:
    """The spec a Linen ``Partitioned``/``LogicallyPartitioned`` box or an NNX ``Variable``
    carries in its metadata, or ``None`` when it has none."""
    if isinstance(box, linen_spmd.LogicallyPartitioned):
        rules = list(box.rules or ()) + list(logical_axis_rules or ())
        return logical_to_spec(box.names, rules)
    if isinstance(box, flax_meta.Partitioned):
        return P(*box.names)
    if isinstance(box, nnx.Variable):
        meta = box.get_metadata()
        names = meta.get("out_sharding")
        if not names:
            return None
        if isinstance(names, P):
            names = tuple(names)
        local = meta.get("sharding_rules") or ()
        if logical_axis_rules or local:
            return logical_to_spec(names, list(local) + list(logical_axis_rules or ()))
        return P(*names)
    return None


def check_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
    """Validate ``spec`` for an array of ``shape`` on ``mesh``.

    Raises:
      ValueError: an unknown mesh axis, an axis used twice, more entries than dimensions,
        or a dimension the axes do not divide (the message starts with ``where``).
    """
    if not isinstance(spec, P):
        raise TypeError(f"{where}: partition rule gave {spec!r}, not a jax.sharding.PartitionSpec")
    if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {spec} has {len(spec)} entries but the leaf has shape {shape}")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        for name in _names(entry):
            if name not in mesh.shape:
                raise ValueError(
                    f"{where}: spec {spec} names mesh axis {name!r}; the mesh has {mesh.axis_names}"
                )
            if name in used:
                raise ValueError(f"{where}: spec {spec} uses mesh axis {name!r} twice")
            used.append(name)
        n = axis_size(mesh, entry)
        if shape[dim] % n:
            raise ValueError(
                f"{where}: dimension {dim} of shape {shape} has size {shape[dim]}, not divisible by the "
                f"{n} devices of mesh axes {entry!r} (spec {spec})"
            )
    return P(*spec, *[None] * (len(shape) - len(spec)))


def qarray_problem(q: QArray, spec: P, mesh: Mesh) -> str | None:
    """Why ``spec`` (for ``q.values``) cannot split ``q``'s scales or packed bytes
    consistently, or ``None`` when it can.

    A grouped axis split over ``n`` devices needs whole groups per shard; a packed (int4,
    int2) axis needs whole bytes per shard; a per-channel scale axis is split like its weight.
    """
    ndim = q.ndim
    entries = list(spec) + [None] * (ndim - len(spec))
    for dim, entry in enumerate(entries):
        n = axis_size(mesh, entry)
        if n == 1:
            continue
        logical = q.shape[dim]
        if q.group_axis is not None and dim == q.group_axis % ndim and q.group_size is not None:
            if logical % n or (logical // n) % q.group_size:
                return (
                    f"axis {dim} holds {logical} values in groups of {q.group_size}; split over {n} devices "
                    f"a shard has {logical / n:g} values, not a whole number of groups"
                )
        if q.packed_axis is not None and dim == q.packed_axis % ndim:
            per_byte = 8 // q.format.pack_bits
            if logical % (n * per_byte):
                return (
                    f"packed axis {dim} holds {logical} values, {per_byte} per byte; split over {n} "
                    "devices a shard would not hold whole bytes"
                )
    return None


def _stored_specs(leaf: TransposedQArray, specs: QArray) -> TransposedQArray:
    """Specs written for the logical ``QArray`` a ``TransposedQArray`` stands for, moved to
    its stored parts (the last two entries swapped), in the leaf's tree structure."""

    def swap(spec, child):
        return (
            spec
            if spec is None or child is None or np.ndim(child) < 2
            else swapped_spec(spec, np.ndim(child))
        )

    stored = leaf.stored
    children = [
        swap(getattr(specs, k), getattr(stored, k))
        for k in ("values", "scale", "zero_point", "act_scale", "act_zero_point")
    ]
    return TransposedQArray.tree_unflatten(None, [stored.replace_children(children)])


class PartitionRules:
    """Partition rules plus the logical-axis rules used to read logical names.

    Args:
      rules: ``(pattern, value)`` pairs (see the module docstring) or a ``RuleSet``.
      logical_axis_rules: Flax-style ``[(logical_name, mesh_axis or None), ...]``.

    Example:
      >>> pr = PartitionRules([(r".*/up/kernel", P(None, "tensor")), (r".*/emb", ("vocab", "embed"))],
      ...                     logical_axis_rules=[("vocab", "tensor"), ("embed", None)])
    """

    def __init__(self, rules: Any = (), *, logical_axis_rules: LogicalRules | None = None):
        if isinstance(rules, PartitionRules):
            logical_axis_rules = list(rules.logical_axis_rules) + list(logical_axis_rules or ())
            rules = rules.ruleset
        self.ruleset = as_ruleset(rules)
        self.logical_axis_rules = tuple(logical_axis_rules or ())

    def spec(self, path: str, leaf: Any, mesh: Mesh, box: Any = None) -> Any:
        """The spec of one leaf: a ``PartitionSpec`` (for a ``QArray``, a ``QArray`` of
        them: values, scale, zero point, activation scales).

        Raises:
          ValueError / TypeError: the spec does not fit the leaf or the mesh (names the leaf
            path and the rule that matched it).
        """
        if isinstance(leaf, TransposedQArray):
            logical = jax.eval_shape(TransposedQArray.as_qarray, leaf)  # abstract: no codes move
            return _stored_specs(leaf, self.spec(path, logical, mesh, box))
        match = self.ruleset.match(path)
        where = _where(path, match)
        if match is not None:
            value = match.value
            if value is None:
                spec = P()
            elif isinstance(value, P):
                spec = value
            elif isinstance(value, (tuple, list)):
                spec = logical_to_spec(value, self.logical_axis_rules)
            elif callable(value):
                spec = value(path, leaf, mesh)
            else:
                raise TypeError(
                    f"{where}: a partition rule value must be a PartitionSpec, a tuple of logical "
                    f"names, a callable or None, got {value!r}"
                )
        else:
            spec = box_spec(box, self.logical_axis_rules) or P()
        spec = check_spec(spec, stored_shape(leaf), mesh, where)
        if not isinstance(leaf, QArray):
            return spec
        problem = qarray_problem(leaf, spec, mesh)
        if problem is not None:
            raise ValueError(f"{where}: QArray {leaf!r} cannot be split with {spec}: {problem}")
        return qarray_specs(leaf, spec)

    def __repr__(self) -> str:
        return f"PartitionRules({self.ruleset!r}, logical_axis_rules={list(self.logical_axis_rules)!r})"
