"""Shardings around the ops the graph layer rewrites: ``shard_map`` rebuilt around weights,
and rewritten ops on Explicit-axes meshes run with the axes Auto."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qjax.graph.layout import unpacked
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray, is_quantized, swapped_spec


def like_output(out_types, fn):
    """``fn``, run with the mesh's Explicit axes made Auto and its outputs given the
    shardings of ``out_types`` (an aval, e.g. the replaced equation's output type, or a
    tuple of them), when those live on a mesh with Explicit axes; else ``fn`` itself.

    A rewritten op (a quantized matmul: blocks per scale group, one contraction per int4
    bit field, scales applied after; an integer backward pass) runs many small ops on the
    operands. On an Explicit mesh each would need its own output sharding (a contraction
    over axes sharded on both sides) or cannot run at all (a slice of one group out of an
    axis split across devices). The original op's types already say where the results
    live, so the body runs under Auto axes (the compiler places it) and the results are
    resharded to those types, as the float op would have produced them.
    """
    types = out_types if isinstance(out_types, tuple) else (out_types,)
    shardings = tuple(getattr(t, "sharding", None) for t in types)
    meshes = [getattr(s, "mesh", None) for s in shardings]
    if any(m is None for m in meshes):
        return fn
    # only the Explicit axes: inside a shard_map body the manual ones stay Manual
    explicit = tuple(
        dict.fromkeys(
            name
            for m in meshes
            for name, kind in zip(m.axis_names, m.axis_types)
            if kind == jax.sharding.AxisType.Explicit
        )
    )
    if not explicit:
        return fn
    # a value typed on no mesh (an array never placed on the mesh): replicated on it
    shardings = tuple(PartitionSpec() if not m.axis_names else s for s, m in zip(shardings, meshes))
    out = shardings if isinstance(out_types, tuple) else shardings[0]
    return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=out)


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


def _shards_sharing(ref, spec: PartitionSpec, mesh) -> int:
    """How many shards of the weight one element of its aux covers: the product of the mesh
    axes that split the weight along the axes where the aux has size 1 (an LSQ scale per
    output channel of a weight split along K is shared by every K shard, and LSQ scales its
    gradient by ``1 / sqrt(elements per scale)``, counted over all of them)."""
    leaves = jax.tree.leaves(ref.aux)
    if not leaves:
        return 1
    shape = jax.numpy.shape(leaves[0])
    ndim = len(ref.leaf.shape if is_quantized(ref.leaf) else jax.numpy.shape(ref.leaf))
    if shape and len(shape) != ndim:
        return 1  # not aligned with the weight's axes: nothing to count
    entries = list(spec) + [None] * (ndim - len(spec))
    count = 1
    for d, entry in enumerate(entries):
        if entry is None or (shape and shape[d] != 1):
            continue
        for axis in (entry,) if isinstance(entry, str) else entry:
            count *= mesh.shape[axis]
    return count


def _split_axes(spec: PartitionSpec, ndim: int, manual) -> tuple[tuple[str, ...], ...]:
    """The manual mesh axes that split each of ``ndim`` axes under ``spec`` (``()``: whole)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    names = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
    return tuple(tuple(a for a in names(e) if a in manual) for e in entries[:ndim])


def shard_map_rule(eqn, invals, handler, emit, evaluate, weight_ref, emitter):
    """Rebuild a ``shard_map`` whose body reads weights: direct params leaves enter as
    they are stored (a ``QArray`` unpacked, with derived scale specs) and are rewritten
    inside the body. Values the handler emits inside (only with ``handler.per_shard_emits``)
    leave the body stacked along a new leading axis over every manual mesh axis and are
    emitted outside once per shard."""
    p = eqn.params
    args, specs, refs = [], [], []  # refs: the params leaf passed as each argument, or None
    for x, spec in zip(invals, p["in_specs"]):
        if isinstance(x, weight_ref) and not x.ops:
            if isinstance(x.leaf, TransposedQArray):
                # enters as stored, the spec (of the logical operand) moved to the stored axes
                stored = unpacked(x.leaf.stored)
                args.append(TransposedQArray(stored))
                specs.append(
                    TransposedQArray.tree_unflatten(
                        None, [qarray_specs(stored, swapped_spec(spec, stored.ndim))]
                    )
                )
            else:
                leaf = unpacked(x.leaf) if isinstance(x.leaf, QArray) else x.leaf
                args.append(leaf)
                specs.append(qarray_specs(leaf, spec) if isinstance(leaf, QArray) else spec)
            refs.append(x)
        else:
            args.append(handler.materialize(x) if isinstance(x, weight_ref) else x)
            specs.append(spec)
            refs.append(None)
    mesh = p["mesh"]
    manual = set(p.get("newly_manual_axes", ())) or set(mesh.axis_names)
    manual_axes = tuple(a for a in mesh.axis_names if a in manual)  # mesh order
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = [a for a in manual_axes if types[a] == jax.sharding.AxisType.Explicit]
    # the handler's aux of each leaf (a learned LSQ scale, a calibration range) enters as
    # extra arguments after the body's own, split like a scale of its weight (replicated
    # where it has size 1)
    auxes = [None if ref is None else ref.aux for ref in refs]
    aux_leaves, aux_tree = jax.tree.flatten(auxes)
    aux_specs = [
        scale_spec(spec, jax.numpy.shape(a))
        for aux, spec in zip(auxes, p["in_specs"])
        for a in jax.tree.leaves(aux)
    ]
    if explicit:
        aux_leaves = [jax.sharding.reshard(a, sp) for a, sp in zip(aux_leaves, aux_specs)]
    aux_shards = [
        1 if ref is None else _shards_sharing(ref, spec, mesh) for ref, spec in zip(refs, p["in_specs"])
    ]
    n_args = len(args)
    args += aux_leaves
    specs += aux_specs

    def forbid(key, value):
        raise ValueError(
            f"op {key!r} inside shard_map emits values that cannot be combined across shards "
            "(per-feature statistics or captured activations of a shard cover part of the "
            "features; only per-tensor calibration ranges combine); collect them from a "
            "version of the function without shard_map"
        )

    def body(*local):
        local, aux_local = local[:n_args], jax.tree.unflatten(aux_tree, local[n_args:])
        vals = [
            v
            if ref is None
            else weight_ref(
                ref.path,
                v,
                depth=ref.depth,
                aux=aux,
                aux_shared=ref.aux_shared * shared,
                shard_axes=_split_axes(spec, len(ref.leaf.shape), manual),
            )
            for ref, v, aux, shared, spec in zip(refs, local, aux_local, aux_shards, p["in_specs"])
        ]
        local_emit = emitter() if handler.per_shard_emits else forbid
        outs = tuple(
            handler.materialize(o) if isinstance(o, weight_ref) else o
            for o in evaluate(p["jaxpr"], [], vals, handler, local_emit)
        )
        if not handler.per_shard_emits:
            return outs, {}
        # one leading axis per shard: out_specs stack the shards' values along it
        return outs, jax.tree.map(lambda v: jax.numpy.expand_dims(v, 0), local_emit.values)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=(tuple(p["out_specs"]), PartitionSpec(manual_axes)),
        axis_names=manual,
        check_vma=p.get("check_vma", True),
    )
    outs, emitted = fn(*args)
    if emitted and explicit:  # Explicit axes: replicate the (small) stacks before slicing shards
        # a NamedSharding needs no mesh context (find_ops' count markers are emitted outside one)
        whole = NamedSharding(mesh, PartitionSpec()) if isinstance(mesh, Mesh) else PartitionSpec()
        emitted = jax.tree.map(lambda v: jax.sharding.reshard(v, whole), emitted)
    shards = math.prod(mesh.shape[a] for a in manual_axes)
    for key, values in emitted.items():
        for value in values:
            for i in range(shards):
                emit(key, jax.tree.map(lambda v, i=i: v[i], value))
    return list(outs)
