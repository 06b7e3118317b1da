"""Device meshes with the three axes qjax's presets use: ``data``, ``fsdp`` and ``tensor``.

Every mesh made here has all three axes (size 1 where unused), in that order, so partition
rules and batch shardings read the same on every shape. The batch is split over
``("data", "fsdp")`` (FSDP shards the batch as well as the params); ``tensor`` splits
weights Megatron-style.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def _axis_type(axis_types: str | AxisType) -> AxisType:
    if isinstance(axis_types, AxisType):
        return axis_types
    if isinstance(axis_types, str) and axis_types.lower() in _TYPES:
        return _TYPES[axis_types.lower()]
    raise ValueError(
        f"make_mesh: axis_types must be 'auto', 'explicit' or a jax AxisType, got {axis_types!r}"
    )


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    axis_types: str | AxisType = "auto",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over all (or the given) devices.

    Args:
      data: size of the pure data-parallel axis (params replicated along it).
      fsdp: size of the fully-sharded data-parallel axis (batch and params split).
      tensor: size of the tensor-parallel (Megatron) axis.
        One of the three may be ``-1``: it takes the devices the others leave.
      axis_types: ``"auto"`` (default; the compiler propagates shardings, pin them with
        constraints) or ``"explicit"`` (shardings are part of the types), or a
        ``jax.sharding.AxisType``. Passed to ``jax.make_mesh`` deliberately, never its default.
      devices: the devices to use (default ``jax.devices()``: every device of every process).

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``("data", "fsdp", "tensor")``.

    Raises:
      ValueError: a size is not a positive integer (or more than one is ``-1``), or their
        product differs from the number of devices (the message gives both).

    Example:
      >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)   # 8 devices
      >>> dict(mesh.shape)
      {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    kind = _axis_type(axis_types)
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ValueError(f"make_mesh: {name}={n!r} must be a positive integer (or -1 for 'the rest')")
    fill = [name for name, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {', '.join(f'{f}=-1' for f in fill)}")
    known = math.prod(n for n in sizes.values() if n != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: {len(devices)} devices cannot be split with "
                f"{' × '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} (= {known}) and {fill[0]}=-1"
            )
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"make_mesh: data={sizes['data']} × fsdp={sizes['fsdp']} × tensor={sizes['tensor']} = {total} "
            f"devices, but {len(devices)} are available; make the product {len(devices)} "
            "(or pass devices=, or use -1 for one axis)"
        )
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(kind,) * 3, devices=devices)


def is_explicit(mesh: Mesh) -> bool:
    """Whether any axis of ``mesh`` is ``Explicit`` (then shardings live in the types and
    ``jax.lax.with_sharding_constraint`` is replaced by ``jax.sharding.reshard``)."""
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def batch_spec(ndim: int = 1, axes: Sequence[str] | str = BATCH_AXES) -> P:
    """``PartitionSpec`` of a batch array: leading axis over ``axes`` (one name or several),
    the rest replicated.

    Raises:
      TypeError: ``ndim`` is not an integer (for a whole batch use :func:`batch_shardings`).
      ValueError: ``ndim < 1``.
    """
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)):
        raise TypeError(
            f"ndim must be the batch array's number of axes (an int), got {type(ndim).__name__}; "
            "for the shardings of a whole batch use batch_shardings(mesh, batch)"
        )
    if ndim < 1:
        raise ValueError(f"ndim must be >= 1 (a batch array has a leading batch axis), got {ndim}")
    return P(_axis_names(axes), *[None] * (int(ndim) - 1))


def _axis_names(axes: Sequence[str] | str) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, ndim: int = 1, axes: Sequence[str] | str = BATCH_AXES) -> NamedSharding:
    """``NamedSharding`` of a batch array on ``mesh`` (leading axis over ``("data", "fsdp")``).

    Example:
      >>> x = jax.device_put(x, batch_sharding(mesh, x.ndim))
    """
    missing = [a for a in _axis_names(axes) if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch_sharding: mesh has no axis {missing} (axes: {mesh.axis_names})")
    return NamedSharding(mesh, batch_spec(ndim, axes))


def batch_shardings(mesh: Mesh, batch: Any, axes: Sequence[str] = BATCH_AXES) -> Any:
    """A tree of shardings for every array of ``batch``: split on its leading axis over
    ``axes`` (scalars replicated).

    Example:
      >>> step = train_step(loss_fn, tx, sh, batch_shardings(mesh, batch))
    """

    def one(x):
        ndim = len(getattr(x, "shape", ()))
        return batch_sharding(mesh, ndim, axes) if ndim else NamedSharding(mesh, P())

    return jax.tree.map(one, batch)
