"""Rebuilding ``shard_map`` around weights the graph layer rewrites."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from qjax.graph.layout import unpacked
from qjax.numerics.qarray import QArray


def scale_spec(spec: PartitionSpec, scale_shape: tuple[int, ...]) -> PartitionSpec:
    """A scale's partition spec derived from its weight's: the same mesh axes, ``None``
    where the scale dimension has size 1."""
    entries = list(spec) + [None] * (len(scale_shape) - len(spec))
    return PartitionSpec(*(None if n == 1 else e for n, e in zip(scale_shape, entries)))


def qarray_specs(q: QArray, spec: PartitionSpec):
    """A ``QArray``-shaped pytree of partition specs for an unpacked ``q`` sharded like ``spec``."""
    children = [spec, scale_spec(spec, q.scale.shape)]
    children.append(None if q.zero_point is None else scale_spec(spec, q.zero_point.shape))
    for extra in (q.act_scale, q.act_zero_point):
        children.append(None if extra is None else PartitionSpec())
    return q.replace_children(children)


def shard_map_rule(eqn, invals, handler, emit, evaluate, materialize, weight_ref):
    """Rebuild a ``shard_map`` whose body reads weights: direct params leaves enter as
    they are stored (a ``QArray`` unpacked, with derived scale specs) and are rewritten
    inside the body; emitting values (calibration) inside is not supported."""
    p = eqn.params
    args, specs, paths = [], [], []
    for x, spec in zip(invals, p["in_specs"]):
        if isinstance(x, weight_ref) and not x.ops:
            leaf = unpacked(x.leaf) if isinstance(x.leaf, QArray) else x.leaf
            args.append(leaf)
            specs.append(qarray_specs(leaf, spec) if isinstance(leaf, QArray) else spec)
            paths.append(x.path)
        else:
            args.append(materialize(x))
            specs.append(spec)
            paths.append(None)

    def forbid(key, value):
        raise ValueError(
            f"op {key!r} inside shard_map emits values (e.g. calibration statistics); calibrate "
            "the function without shard_map (statistics are per shard inside it)"
        )

    def body(*local):
        vals = [weight_ref(path, v) if path is not None else v for path, v in zip(paths, local)]
        return tuple(materialize(o) for o in evaluate(p["jaxpr"], [], vals, handler, forbid))

    fn = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(specs),
        out_specs=tuple(p["out_specs"]),
        axis_names=set(p.get("newly_manual_axes", ())) or set(p["mesh"].axis_names),
        check_vma=p.get("check_vma", True),
    )
    return list(fn(*args))
