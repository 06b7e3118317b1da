"""Partition-rule presets: data parallel, tensor parallel (Megatron), FSDP, hybrid FSDP + tensor.

Each preset returns a list of ``(pattern, value)`` rules for :func:`qjax.parallel.shardings`
(and :class:`~qjax.parallel.rules.PartitionRules`); prepend your own rules to override a
leaf (first match wins). :func:`logical_axis_rules` gives the same layouts for models
annotated with logical axis names (Linen ``with_logical_partitioning``, NNX
``out_sharding``).

Tensor parallelism follows Megatron-LM: the first matmul of an MLP and the query/key/value
projections are split by *columns* (output features, i.e. attention heads), the second MLP
matmul and the attention output projection by *rows* (input features), so each block needs
one all-reduce forward and one backward. Kernels use Flax's ``[inputs..., outputs...]``
layout: a column split is axis 1 (the outputs of a ``Dense``, the heads of a
``DenseGeneral`` ``[embed, heads, head_dim]`` query), a row split axis 0 (the inputs of a
``Dense``, the heads of an ``[heads, head_dim, embed]`` output projection); column biases
split on axis 0, row biases are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qjax.numerics.qarray import QArray
from qjax.parallel.rules import qarray_problem, stored_shape

COLUMN = (
    "query",
    "key",
    "value",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv",
    "qkv_proj",
    "c_attn",
    "up",
    "up_proj",
    "gate",
    "gate_proj",
    "fc1",
    "wi",
    "wi_0",
    "wi_1",
    "c_fc",
    "intermediate",
)
ROW = ("out", "o_proj", "out_proj", "down", "down_proj", "fc2", "wo", "c_proj", "output")


def _spec(n: int, entries: dict[int, str]) -> P:
    return P(*[entries.get(d) for d in range(n)])


def _fsdp_dim(leaf: Any, mesh: Mesh, axis: str, taken: dict[int, str], min_size: int) -> int | None:
    """The largest free dimension of ``leaf`` the ``axis`` devices divide (consistently for a
    ``QArray``'s groups and packing), or ``None``."""
    shape = stored_shape(leaf)
    n = mesh.shape[axis]
    if n == 1 or int(_prod(shape)) < max(min_size, 1):
        return None
    order = sorted((d for d in range(len(shape)) if d not in taken), key=lambda d: (-shape[d], d))
    for d in order:
        if shape[d] % n:
            continue
        if isinstance(leaf, QArray) and qarray_problem(leaf, _spec(len(shape), {**taken, d: axis}), mesh):
            continue
        return d
    return None


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@dataclasses.dataclass(frozen=True)
class Split:
    """Rule value: split dimension ``dim`` (after ``stacked`` leading layer axes) over mesh
    axis ``axis``; with ``fsdp``, also split the largest other dimension over that axis.

    Args:
      dim: the dimension of an unstacked leaf, or ``None`` to only apply ``fsdp``.
      axis: mesh axis of the split (``"tensor"``).
      fsdp: mesh axis for FSDP on another dimension (``None``: none).
      stacked: leading stacked-layer axes (``nn.scan``) to skip.
      min_size: leaves with fewer elements are not FSDP-split.
    """

    dim: int | None
    axis: str = "tensor"
    fsdp: str | None = None
    stacked: int = 0
    min_size: int = 0

    def __call__(self, path: str, leaf: Any, mesh: Mesh) -> P:
        ndim = len(stored_shape(leaf))
        taken: dict[int, str] = {}
        if self.dim is not None and mesh.shape[self.axis] > 1:
            d = self.dim + self.stacked
            if d >= ndim:
                raise ValueError(
                    f"leaf {path!r}: cannot split dimension {d} of a rank-{ndim} leaf over {self.axis!r}"
                )
            taken[d] = self.axis
        if self.fsdp is not None:
            d = _fsdp_dim(leaf, mesh, self.fsdp, taken, self.min_size)
            if d is not None:
                taken[d] = self.fsdp
        return _spec(ndim, taken)


def _layers(names: Sequence[str]) -> str:
    return "|".join(names)


def data_parallel() -> list[tuple[str, Any]]:
    """Everything replicated (the batch is split over ``("data", "fsdp")`` by the step).

    Example:
      >>> shardings(params, data_parallel(), make_mesh(data=8))
    """
    return [(r".*", None)]


def fsdp(axis: str = "fsdp", *, min_size: int = 0) -> list[tuple[str, Any]]:
    """Fully-sharded data parallel: every leaf split on its largest dimension that the
    ``axis`` devices divide (leaves with no such dimension, or fewer than ``min_size``
    elements, are replicated).

    Example:
      >>> shardings(params, fsdp(), make_mesh(fsdp=8))
    """
    return [(r".*", Split(None, fsdp=axis, min_size=min_size))]


def tensor_parallel(
    column: Sequence[str] = COLUMN,
    row: Sequence[str] = ROW,
    *,
    axis: str = "tensor",
    fsdp_axis: str | None = None,
    stacked: int = 0,
    min_size: int = 0,
) -> list[tuple[str, Any]]:
    """Megatron-style tensor parallelism for MLPs and attention (see the module docstring).

    Args:
      column: layer names (path parts) split by columns: QKV projections, MLP up/gate.
      row: layer names split by rows: attention output, MLP down.
      axis: the tensor mesh axis.
      fsdp_axis: also FSDP-split every leaf over this axis (hybrid); ``None``: other leaves
        replicated.
      stacked: leading stacked-layer axes of the kernels (``nn.scan`` stacks).
      min_size: smallest leaf FSDP splits.

    Returns:
      Rules for ``{...}/<layer>/kernel`` and ``.../bias`` of the named layers (and, with
      ``fsdp_axis``, a catch-all FSDP rule; without, other leaves fall through to their
      partition metadata or are replicated).

    Example:
      >>> rules = tensor_parallel(column=("Dense_0",), row=("Dense_1",))
    """
    kw = dict(axis=axis, fsdp=fsdp_axis, stacked=stacked, min_size=min_size)
    rules: list[tuple[str, Any]] = [
        (rf"(.*/)?({_layers(column)})/kernel", Split(1, **kw)),
        (rf"(.*/)?({_layers(column)})/bias", Split(0, **kw)),
        (rf"(.*/)?({_layers(row)})/kernel", Split(0, **kw)),
        (rf"(.*/)?({_layers(row)})/bias", Split(None, **kw)),
    ]
    if fsdp_axis is not None:
        rules.append((r".*", Split(None, fsdp=fsdp_axis, stacked=stacked, min_size=min_size)))
    return rules


def hybrid(
    column: Sequence[str] = COLUMN,
    row: Sequence[str] = ROW,
    *,
    tensor_axis: str = "tensor",
    fsdp_axis: str = "fsdp",
    stacked: int = 0,
    min_size: int = 0,
) -> list[tuple[str, Any]]:
    """FSDP + tensor parallel: Megatron splits over ``tensor_axis`` and, on another
    dimension of every leaf, FSDP over ``fsdp_axis``.

    Example:
      >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)
      >>> params = jax.device_put(params, shardings(params, hybrid(), mesh))
    """
    return tensor_parallel(
        column, row, axis=tensor_axis, fsdp_axis=fsdp_axis, stacked=stacked, min_size=min_size
    )


PRESETS = {"data": data_parallel, "fsdp": fsdp, "tensor": tensor_parallel, "hybrid": hybrid}

_LOGICAL = {
    "data": [("batch", ("data", "fsdp"))],
    "fsdp": [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
    ],
    "tensor": [
        ("batch", ("data", "fsdp")),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("embed", None),
        ("kv", None),
    ],
    "hybrid": [
        ("batch", ("data", "fsdp")),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("kv", None),
    ],
}


def logical_axis_rules(kind: str) -> list[tuple[str, Any]]:
    """Flax logical-axis rules giving preset ``kind``'s layout to a model annotated with the
    usual logical names (``batch``, ``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``).

    Args:
      kind: ``"data"``, ``"fsdp"``, ``"tensor"`` or ``"hybrid"``.

    Raises:
      ValueError: unknown ``kind``.

    Example:
      >>> shardings(variables, [], mesh, logical_axis_rules=logical_axis_rules("hybrid"))
    """
    if kind not in _LOGICAL:
        raise ValueError(f"logical_axis_rules: kind must be one of {sorted(_LOGICAL)}, got {kind!r}")
    return list(_LOGICAL[kind])
