"""Sharded calibration and GPTQ Hessian accumulation.

The calibration batches are split over the batch axes (``("data", "fsdp")``) and the
params placed by their shardings; :func:`qjax.calibrate` and
:func:`qjax.quant.gptq.input_hessians` then run as one SPMD program per batch, in which the
statistics of every op (activation ranges, ``XᵀX``) are reduced across the data shards by
the compiler's collectives (``all-reduce`` max/min for ranges, sum for Gram matrices), so
the result equals the unsharded one (ranges exactly; Gram matrices up to float summation
order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

from qjax.parallel.mesh import BATCH_AXES, batch_shardings, is_explicit
from qjax.parallel.shardings import place, replicated
from qjax.quant.calibrate import ActStats
from qjax.quant.calibrate import calibrate as _calibrate
from qjax.quant.gptq import input_hessians as _input_hessians
from qjax.quant.policy import Policy


def shard_batches(batches: Iterable, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Iterator[tuple]:
    """Each batch (a tuple of arrays, or one array) placed with its leading axis split over
    ``axes`` (already-global arrays are resharded only if needed).

    Example:
      >>> for (x,) in shard_batches(batches, mesh): ...
    """
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        yield tuple(place(args, batch_shardings(mesh, args, axes)))


def _params(params: Any, mesh: Mesh, param_shardings: Any) -> Any:
    return place(params, replicated(mesh, params) if param_shardings is None else param_shardings)


def _auto_axes(mesh: Mesh, param_shardings: Any) -> tuple[Mesh, Any]:
    """The mesh with its axes Auto, and the shardings moved onto it: calibration runs the
    model as the train and eval steps do on an Explicit-axes mesh (model code rarely names
    the output sharding of every matmul; sorts cannot run on a sharded axis)."""
    if not is_explicit(mesh):
        return mesh, param_shardings
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    if param_shardings is not None:
        param_shardings = jax.tree.map(
            lambda s: NamedSharding(auto, s.spec) if isinstance(s, NamedSharding) else s,
            param_shardings,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
    return auto, param_shardings


def calibrate(
    f: Callable,
    policy: Policy,
    params: Any,
    batches: Iterable,
    mesh: Mesh,
    *,
    param_shardings: Any = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    **kwargs,
) -> dict[str, ActStats]:
    """:func:`qjax.calibrate` with the batches split over the mesh's data shards.

    Args:
      f, policy, params, batches, kwargs: as :func:`qjax.calibrate`.
      mesh: the mesh.
      param_shardings: shardings of ``params`` (default: replicated).
      batch_axes: mesh axes the batch is split over.

    Returns:
      ``{path: ActStats}``, equal to the unsharded calibration.

    Example:
      >>> stats = qjax.parallel.calibrate(model.apply, policy, params, batches, make_mesh(data=8))
    """
    mesh, param_shardings = _auto_axes(mesh, param_shardings)
    params = _params(params, mesh, param_shardings)
    with jax.set_mesh(mesh):
        return _calibrate(f, policy, params, shard_batches(batches, mesh, batch_axes), **kwargs)


def input_hessians(
    f: Callable,
    params: Any,
    batches: Iterable,
    mesh: Mesh,
    *,
    param_shardings: Any = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    patterns=None,
    **kwargs,
) -> dict[str, jax.Array]:
    """:func:`qjax.quant.gptq.input_hessians` (GPTQ's ``XᵀX / rows`` per weight) with the
    batches split over the mesh's data shards; pass the result to
    :func:`qjax.quant.gptq.gptq_quantize`.

    Example:
      >>> h = qjax.parallel.input_hessians(model.apply, params, batches, mesh)["params/up/kernel"]
    """
    mesh, param_shardings = _auto_axes(mesh, param_shardings)
    params = _params(params, mesh, param_shardings)
    with jax.set_mesh(mesh):
        return _input_hessians(
            f, params, shard_batches(batches, mesh, batch_axes), patterns=patterns, **kwargs
        )
