"""Memory footprint of a pytree: bytes per leaf, quantized vs float."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.numerics.transposed import is_quantized
from qjax.rules import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class LeafFootprint:
    """One leaf: its path, logical shape, storage kind, bytes held and bytes as float."""

    path: str
    shape: tuple[int, ...]
    kind: str  # dtype name, or the QArray format name
    nbytes: int
    float_nbytes: int
    quantized: bool = False


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes of every leaf and the totals.

    ``float_total`` counts each quantized leaf at its original float dtype, so
    ``ratio = float_total / total`` is the compression factor.
    """

    leaves: tuple[LeafFootprint, ...]

    @property
    def total(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    @property
    def float_total(self) -> int:
        return sum(leaf.float_nbytes for leaf in self.leaves)

    @property
    def quantized_total(self) -> int:
        """Bytes held by quantized leaves only."""
        return sum(leaf.nbytes for leaf in self.leaves if leaf.quantized)

    @property
    def ratio(self) -> float:
        return self.float_total / self.total if self.total else 1.0

    def table(self) -> str:
        """A plain-text table, one row per leaf plus the total."""
        rows = [("path", "shape", "storage", "bytes", "float bytes")]
        rows += [(f.path, str(f.shape), f.kind, str(f.nbytes), str(f.float_nbytes)) for f in self.leaves]
        rows.append(("total", "", f"{self.ratio:.2f}x smaller", str(self.total), str(self.float_total)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def footprint(tree: Any) -> Footprint:
    """Bytes per leaf of ``tree`` (``QArray`` values, scales and zero points counted).

    Example:
      >>> fp = qjax.footprint(qjax.quantize_params(params, policy))
      >>> print(fp.table()); fp.ratio
    """
    rows = []
    for path, leaf in leaves_with_paths(tree):
        if is_quantized(leaf):
            float_bytes = math.prod(leaf.shape) * leaf.dtype.itemsize
            rows.append(LeafFootprint(path, leaf.shape, leaf.format.name, leaf.nbytes, float_bytes, True))
        elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            n = math.prod(np.shape(leaf)) * jnp.dtype(leaf.dtype).itemsize
            rows.append(LeafFootprint(path, tuple(np.shape(leaf)), jnp.dtype(leaf.dtype).name, n, n))
    return Footprint(tuple(rows))
