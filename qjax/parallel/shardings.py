"""Shardings for everything a run holds: params (with ``QArray`` values and scales), masks,
optimizer state (``sparsify`` state included), teacher params; and pinning them inside a step.

Optimizer states are matched to the params structurally: every subtree of the state that
has the params' tree structure as a prefix (Adam's ``mu``/``nu``, momentum, sparsify masks
with ``None`` for skipped leaves, ...) takes the params' shardings leaf by leaf where the
shapes agree; everything else (counts, Adafactor's factored rows, PRNG keys) is replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax.graph.sharding import scale_spec
from qjax.numerics.transposed import is_quantized
from qjax.parallel.mesh import is_explicit
from qjax.parallel.rules import PartitionRules, axis_size
from qjax.quant.lsq_params import LSQParams
from qjax.rules import is_box, leaves_with_paths, path_str


def _is_unit(x: Any) -> bool:
    return is_quantized(x) or is_box(x)


def _named(mesh: Mesh, spec_tree: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda s: isinstance(s, P))


def partition_specs(tree: Any, rules: Any, mesh: Mesh, *, logical_axis_rules=None) -> Any:
    """A tree of ``PartitionSpec`` mirroring ``tree`` (see :func:`shardings`)."""
    pr = PartitionRules(rules, logical_axis_rules=logical_axis_rules)

    def visit(kp, unit):
        path = path_str(kp)
        if isinstance(unit, LSQParams):
            specs = jax.tree_util.tree_map_with_path(
                lambda k, u: visit((*kp, *k), u), unit.params, is_leaf=_is_unit_or_lsq
            )
            return LSQParams(specs, _lsq_scale_specs(unit, specs, mesh))
        if is_box(unit):
            return jax.tree.map(lambda leaf: pr.spec(path, leaf, mesh, unit), unit, is_leaf=is_quantized)
        return pr.spec(path, unit, mesh)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_unit_or_lsq)


def _is_unit_or_lsq(x: Any) -> bool:
    return _is_unit(x) or isinstance(x, LSQParams)


def _lsq_scale_specs(trained: LSQParams, param_specs: Any, mesh: Mesh) -> dict[str, P]:
    """Each learned scale sharded like its weight: the same mesh axes, ``None`` where the
    scale has size 1 (a per-output-channel scale of a row-parallel weight is replicated) or
    where the axes do not divide it (groups fewer than the shards)."""
    flat = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
    by_path = {path: spec for (path, _), spec in zip(leaves_with_paths(trained.params), flat)}

    def one(path, scale):
        shape = np.shape(scale)
        spec = scale_spec(by_path[path], shape)
        return P(*(e if e is None or n % axis_size(mesh, e) == 0 else None for n, e in zip(shape, spec)))

    return {path: one(path, s) for path, s in trained.scales.items()}


def shardings(tree: Any, rules: Any, mesh: Mesh, *, logical_axis_rules=None) -> Any:
    """``NamedSharding`` for every array of ``tree`` by partition rules.

    Args:
      tree: params (Linen variables, NNX ``State``, plain pytree), quantized params
        (``QArray`` leaves), masks, or their ``jax.eval_shape``; boxes (Linen
        ``Partitioned``, NNX ``Variable``) are kept and their partition metadata used for
        leaves no rule matches.
      rules: partition rules (``(pattern, value)`` pairs, a ``RuleSet`` or
        :class:`~qjax.parallel.rules.PartitionRules`), e.g. from :mod:`qjax.parallel.presets`.
      mesh: the device mesh.
      logical_axis_rules: Flax-style logical-to-mesh rules for logical names.

    Returns:
      A tree with ``tree``'s structure holding ``NamedSharding``s (a ``QArray`` leaf gets a
      ``QArray`` of shardings: values by the rule, scales derived from it); usable as
      ``jax.jit`` ``in_shardings``/``out_shardings`` and with ``jax.device_put``.

    Raises:
      ValueError: a spec does not fit its leaf or the mesh (the message names the leaf
        path and the rule).

    Example:
      >>> mesh = make_mesh(fsdp=8)
      >>> params = jax.device_put(params, shardings(params, presets.fsdp(), mesh))
    """
    return _named(mesh, partition_specs(tree, rules, mesh, logical_axis_rules=logical_axis_rules))


def replicated(mesh: Mesh, tree: Any) -> Any:
    """A replicated ``NamedSharding`` (``P()``) on ``mesh`` for every array of ``tree``.

    Example:
      >>> stats = jax.device_put(stats, replicated(mesh, stats))
    """
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def _match_params(node: Any, params: Any) -> bool:
    """Whether ``node`` has the params' tree structure as a prefix (and holds arrays)."""
    if not jax.tree.leaves(node):
        return False
    try:
        jax.tree.map(lambda *_: None, params, node)
    except (ValueError, TypeError):
        return False
    return True


def state_shardings(state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state (or any state holding params-shaped subtrees).

    Args:
      state: the state or its ``jax.eval_shape`` (e.g. ``jax.eval_shape(tx.init, params)``).
      params: the params (or their shapes) the state was built from.
      param_shardings: ``shardings(params, ...)``.
      mesh: the mesh (replicated leaves are placed on it).

    Returns:
      A tree of ``NamedSharding`` with ``state``'s structure: params-shaped subtrees sharded
      like the params (a leaf whose shape differs from its param's: replicated), other
      leaves replicated.

    Example:
      >>> opt_sh = state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh)
    """
    rep = NamedSharding(mesh, P())
    flat_p = jax.tree.leaves(params)
    flat_s = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat_p) != len(flat_s):
        raise ValueError(
            f"state_shardings: params have {len(flat_p)} arrays but param_shardings "
            f"{len(flat_s)}; build them with shardings(params, ...)"
        )
    by_leaf = jax.tree.unflatten(jax.tree.structure(params), list(zip(flat_p, flat_s)))

    def like_params(node):
        def leaf(pair, sub):
            p, s = pair
            return jax.tree.map(lambda x: s if tuple(np.shape(x)) == tuple(np.shape(p)) else rep, sub)

        return jax.tree.map(
            leaf,
            by_leaf,
            node,
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], NamedSharding),
        )

    def visit(node):
        if _match_params(node, params):
            return like_params(node)
        return jax.tree.map(lambda _: rep, node)

    return jax.tree.map(visit, state, is_leaf=lambda n: _match_params(n, params))


def pin(tree: Any, sharding_tree: Any, mesh: Mesh | None = None) -> Any:
    """Constrain ``tree`` (inside ``jax.jit``) to ``sharding_tree``.

    Auto-mode meshes use ``jax.lax.with_sharding_constraint``; Explicit-mode meshes (where
    that raises) use ``jax.sharding.reshard``. Use it on gradients and optimizer state: in
    Auto mode they otherwise drift from the params' shardings.

    Example:
      >>> grads = pin(grads, param_shardings)
    """
    leaves = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    if not leaves:
        return tree
    mesh = mesh or leaves[0].mesh
    fn: Callable = jax.sharding.reshard if is_explicit(mesh) else jax.lax.with_sharding_constraint
    return fn(tree, sharding_tree)


def place(tree: Any, sharding_tree: Any) -> Any:
    """``jax.device_put(tree, sharding_tree)`` that also works in multi-process runs, where
    every process holds the same host (numpy) values in full.

    Args:
      tree: a pytree of host or device arrays.
      sharding_tree: a ``NamedSharding`` tree with ``tree``'s structure, or a prefix of it.

    Returns:
      ``tree`` as global ``jax.Array``s placed by ``sharding_tree``.

    Example:
      >>> params = place(params, shardings(params, presets.fsdp(), mesh))
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding_tree)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), sharding_tree, tree, is_leaf=is_sharding
    )


def shard_shapes(tree: Any) -> Any:
    """``{path: per-device shard shape}`` of every placed array of ``tree`` (for tests and reports).

    Example:
      >>> shard_shapes(params)["params/up/kernel"]
      (8, 16)
    """
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[path_str(kp)] = x.sharding.shard_shape(x.shape)
    return out
