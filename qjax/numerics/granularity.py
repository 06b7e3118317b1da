"""Granularity: which elements share a scale.

Three granularities compose:

* per-tensor: one scale (``channel_axes=()``),
* per-channel over any set of axes: one scale per index of ``channel_axes``,
* per-group: axis ``group_axis`` is cut into consecutive groups of ``group_size``
  elements, each with its own scale (combinable with channel axes).

Scales are stored with the rank of the tensor: size ``shape[a]`` on channel axes,
``ceil(shape[g] / group_size)`` on the group axis and 1 elsewhere, so a scale
broadcasts against the tensor's "grouped view" after one ``expand_dims``.

All axes are normalised to negative indices, so a ``QArray`` keeps working when a
transform such as ``jax.vmap`` removes leading axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qjax.numerics.calibration import _unsharded


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Return ``axis`` as a negative index into a rank-``ndim`` array.

    Raises:
      ValueError: the axis is out of range (the message names ``what``).
    """
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for an array of rank {ndim}")
    return axis - ndim if axis >= 0 else axis


@dataclasses.dataclass(frozen=True)
class Layout:
    """Granularity resolved against a concrete shape (all axes negative)."""

    shape: tuple[int, ...]
    channel_axes: tuple[int, ...]
    group_axis: int | None
    group_size: int | None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_groups(self) -> int:
        if self.group_axis is None:
            return 1
        return math.ceil(self.shape[self.group_axis] / self.group_size)

    @property
    def padded_length(self) -> int:
        return self.num_groups * self.group_size

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the stored scale (rank of the tensor)."""
        out = []
        for a in range(-self.ndim, 0):
            if a in self.channel_axes:
                out.append(self.shape[a])
            elif a == self.group_axis:
                out.append(self.num_groups)
            else:
                out.append(1)
        return tuple(out)

    @property
    def group_count(self) -> int:
        """Number of elements that share one scale (padding included)."""
        n = 1
        for a in range(-self.ndim, 0):
            if a in self.channel_axes:
                continue
            n *= self.group_size if a == self.group_axis else self.shape[a]
        return n

    def grouped_reduce_axes(self) -> tuple[int, ...]:
        """Axes (negative, in the grouped view) reduced to compute one scale."""
        if self.group_axis is None:
            return tuple(a for a in range(-self.ndim, 0) if a not in self.channel_axes)
        # In the grouped view the group axis g becomes (num_groups, group_size); axes
        # right of g keep their negative index, axes left of it shift by one.
        axes = []
        for a in range(-self.ndim, 0):
            if a == self.group_axis:
                axes.append(a)  # the group_size axis sits at g's old negative index
            elif a not in self.channel_axes:
                axes.append(a - 1 if a < self.group_axis else a)
        return tuple(axes)


def resolve_layout(
    shape: Sequence[int],
    channel_axes: Sequence[int],
    group_axis: int | None,
    group_size: int | None,
    pad_groups: bool = False,
) -> Layout:
    """Check a granularity against ``shape`` and normalise it.

    Raises:
      ValueError: an axis is out of range or repeated, the group axis is also a channel
        axis, or ``group_size`` does not divide the group axis and ``pad_groups`` is off.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    chans = tuple(normalize_axis(a, ndim, "channel_axes entry") for a in channel_axes)
    if len(set(chans)) != len(chans):
        raise ValueError(f"channel_axes {tuple(channel_axes)} repeats an axis (rank {ndim})")
    gaxis = None
    if group_axis is not None:
        gaxis = normalize_axis(group_axis, ndim, "group_axis")
        if gaxis in chans:
            raise ValueError(f"group_axis={group_axis} is also in channel_axes={tuple(channel_axes)}")
        length = shape[gaxis]
        if length % group_size and not pad_groups:
            raise ValueError(
                f"group_size={group_size} does not divide axis {group_axis} of length {length} "
                f"(shape {shape}); choose a divisor or pass pad_groups=True to pad the last group"
            )
    return Layout(shape, tuple(sorted(chans)), gaxis, group_size if gaxis is not None else None)


def _explicit(x) -> tuple:
    """``(mesh, per-axis spec entries)`` of ``x``'s type on an Explicit mesh, else
    ``(None, None)``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(e is None for e in spec):
        return None, None
    return sharding.mesh, [*spec, *([None] * (x.ndim - len(spec)))]


def _reshape(x, shape, mesh, entries):
    """``x.reshape(shape)``, with ``entries`` as the output's sharding on an Explicit mesh."""
    if mesh is None:
        return x.reshape(shape)
    return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(mesh, P(*entries)))


def _shards(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def to_grouped(x: jnp.ndarray, layout: Layout, pad_mode: str = "edge") -> jnp.ndarray:
    """Split the group axis of ``x`` into ``(num_groups, group_size)``.

    A last group shorter than ``group_size`` is padded (``"edge"`` repeats the last
    element, which leaves min/max/absmax of that group unchanged; ``"zero"`` pads zeros).
    On an Explicit mesh a group axis whose shards hold whole groups stays sharded (on the
    groups); otherwise it is gathered first.
    """
    if layout.group_axis is None:
        return x
    g = x.ndim + layout.group_axis
    mesh, entries = _explicit(x)
    extra = layout.padded_length - x.shape[g]
    if entries is not None and extra:  # an edge pad cannot run on a sharded array: gather it
        x = _unsharded(x, tuple(range(x.ndim)))
        entries = [None] * x.ndim
    elif entries is not None and entries[g] is not None and layout.num_groups % _shards(mesh, entries[g]):
        x = _unsharded(x, (g,))
        entries[g] = None
    if extra:
        widths = [(0, 0)] * x.ndim
        widths[g] = (0, extra)
        x = jnp.pad(x, widths, mode="edge" if pad_mode == "edge" else "constant")
    shape = (*x.shape[:g], layout.num_groups, layout.group_size, *x.shape[g + 1 :])
    return _reshape(
        x, shape, mesh, None if entries is None else [*entries[:g], entries[g], None, *entries[g + 1 :]]
    )


def from_grouped(xg: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """Inverse of :func:`to_grouped` (drops the padding)."""
    if layout.group_axis is None:
        return xg
    g = xg.ndim - 1 + layout.group_axis
    mesh, entries = _explicit(xg)
    merged = None if entries is None else [*entries[:g], entries[g], *entries[g + 2 :]]
    x = _reshape(xg, (*xg.shape[:g], layout.padded_length, *xg.shape[g + 2 :]), mesh, merged)
    length = layout.shape[layout.group_axis]
    if length != layout.padded_length:
        x = _slice_axis(x, g, length)
    return x


def _slice_axis(x: jnp.ndarray, axis: int, length: int) -> jnp.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, length)
    return x[tuple(index)]


def reduce_groups(fn, xg: jnp.ndarray, layout: Layout) -> tuple[jnp.ndarray, ...]:
    """Apply a per-group keepdims reduction ``fn(part) -> tuple of arrays`` to the
    grouped view, giving a short (padded) last group only its real elements.

    Padding repeats the last element, which leaves absmax/min/max unchanged but would
    bias statistics that count elements (percentile, MSE, mean); so a padded last group
    is reduced on its own and the results are concatenated along the groups axis.
    """
    length = layout.shape[layout.group_axis] if layout.group_axis is not None else 0
    rem = length % layout.group_size if layout.group_axis is not None else 0
    if not rem:
        return tuple(fn(xg))
    gpos = xg.ndim - 1 + layout.group_axis  # the num_groups axis of the grouped view
    n = layout.num_groups
    last = jax.lax.slice_in_dim(jax.lax.slice_in_dim(xg, n - 1, n, axis=gpos), 0, rem, axis=gpos + 1)
    parts = [tuple(fn(last))]
    if n > 1:
        parts.insert(0, tuple(fn(jax.lax.slice_in_dim(xg, 0, n - 1, axis=gpos))))
    return tuple(jnp.concatenate(rs, axis=gpos) for rs in zip(*parts))


def scale_to_grouped(scale: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """Stored scale -> broadcastable against the grouped view."""
    if layout.group_axis is None:
        return scale
    return jnp.expand_dims(scale, scale.ndim + layout.group_axis + 1)


def scale_from_grouped(scale_g: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """Grouped-view keepdims scale -> stored scale."""
    if layout.group_axis is None:
        return scale_g
    return jnp.squeeze(scale_g, scale_g.ndim + layout.group_axis)
