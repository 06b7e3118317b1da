"""The non-matmul layers of a fixed-point network, as hls4ml types them: merges (``Add``,
``Subtract``, ``Multiply``: exact arithmetic on their inputs, one cast to ``result_t``) and
table activations (``Sigmoid``, ``TanH``: lookup tables of ``table_size`` entries).

:func:`qjax.fixed.fixed_point` applies them through its ``ops=`` rules, matched against
the op's name stack (the Linen module path and ``jax.named_scope`` names it runs under,
as for :class:`qjax.OpRule`) followed by ``/`` and the primitive: ``add``, ``sub``,
``mul``, ``logistic`` (``jax.nn.sigmoid``) or ``tanh``; e.g. ``"Net/Block_0/add"`` for a
residual add in a Linen module ``Block_0``, or ``"add"`` in a plain function.

Patterns must be precise. Ops inside the functions a module calls carry the module's name
stack too: ``jax.nn.gelu``'s polynomial and ``1 + tanh``, ``silu``'s sigmoid, a Flax
LayerNorm's ``var + eps`` and BatchNorm's ``scale * rsqrt(var)`` (a value derived from
params counts as an activation). A broad ``.*/add`` rounds them all. Give the ops a scope
of their own (``with jax.named_scope("residual"): h = h + y`` matches
``.*/residual/add``); Flax NNX modules add no name stack at all, so there the scope is the
only way to tell ops apart. A merge casts both operands to one ``input`` format: choose one
that holds both operands' types (hls4ml's ``Add`` keeps each input's own type).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax.fixed.activations import sigmoid, tanh
from qjax.fixed.arith import add, mul, sub
from qjax.fixed.array import FixedArray, to_float
from qjax.fixed.cast import from_float
from qjax.fixed.format import Format

MERGES: dict[str, Callable] = {"add": add, "sub": sub, "mul": mul}
TABLES: dict[str, tuple[Callable, float]] = {"logistic": (sigmoid, 8.0), "tanh": (tanh, 4.0)}  # hls4ml ranges
PRIMITIVES = frozenset((*MERGES, *TABLES))


@dataclasses.dataclass(frozen=True)
class OpFormats:
    """The formats of one non-matmul layer of :func:`qjax.fixed.fixed_point`.

    Args:
      input: the format its operands are cast to (the previous layer's ``result_t``: the
        cast is then exact). Merges compute exactly in it; tables index by it.
      output: ``result_t``: the merge's exact result is cast to it; a table's entries are
        rounded onto it.
      table_size: table entries (hls4ml's default 1024); tables only.
      table_range: the table covers ``[-R, R)``; default hls4ml's (8 for the sigmoid, 4 for
        tanh); ``table_size / 2R`` must be a power of two.

    Raises:
      TypeError: ``input`` / ``output`` not a :class:`Format`.
      ValueError: ``table_size < 2`` or ``table_range <= 0``.
    """

    input: Format
    output: Format
    table_size: int = 1024
    table_range: float | None = None

    def __post_init__(self):
        for name in ("input", "output"):
            if not isinstance(getattr(self, name), Format):
                raise TypeError(f"OpFormats.{name} must be a qjax.fixed.Format, got {getattr(self, name)!r}")
        if int(self.table_size) < 2 or (self.table_range is not None and not self.table_range > 0):
            raise ValueError(
                f"OpFormats: table_size >= 2 and table_range > 0, got {self.table_size}, {self.table_range}"
            )


def apply(primitive: str, fmts: OpFormats, operands: list, dtype, key) -> jnp.ndarray:
    """The fixed-point result of one op on float carriers, returned as a carrier of
    ``dtype``: operands cast to ``fmts.input``, then the exact merge cast to
    ``fmts.output``, or the table of ``fmts.output`` entries. A NaN / Inf operand gives
    NaN where it reaches (a fixed-point cast would map it to a number silently). Each cast
    rounding ``STOCHASTIC`` draws its own noise."""
    carriers = [jnp.asarray(x, dtype) for x in operands]
    keys = [None] * (len(carriers) + 1) if key is None else list(jax.random.split(key, len(carriers) + 1))
    xs: list[FixedArray] = [from_float(x, fmts.input, key=k) for x, k in zip(carriers, keys)]
    if primitive in MERGES:
        y = MERGES[primitive](xs[0], xs[1], fmts.output, key=keys[-1])
    else:
        fn, default_range = TABLES[primitive]
        rng = default_range if fmts.table_range is None else fmts.table_range
        y = fn(xs[0], fmts.output, table_size=int(fmts.table_size), table_range=rng)
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in carriers])
    return jnp.where(finite, to_float(y, dtype), jnp.nan)
