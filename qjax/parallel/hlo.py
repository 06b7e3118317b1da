"""Collectives of a compiled (partitioned) HLO module, and the bytes they move.

Read the text of ``jax.jit(f).lower(...).compile().as_text()`` (or
:meth:`qjax.parallel.ShardedStep.hlo`): every ``all-reduce``, ``all-gather``,
``reduce-scatter``, ``all-to-all`` and ``collective-permute`` (synchronous or ``-start``),
with its result shapes, the size of its device groups and, for reductions, the reduction
(``add``, ``maximum``, ...). Per-device traffic is estimated with ring algorithms:
all-reduce ``2(n-1)/n·S``, all-gather ``(n-1)/n·S_out``, reduce-scatter ``(n-1)·S_out``,
all-to-all ``(n-1)/n·S``, collective-permute ``S``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "f16": 2,
    "bf16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_ROOT = re.compile(r"^\s*ROOT\s+%?[\w.\-]+\s*=\s*\S+\s+([\w\-]+)\(")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of an HLO module.

    Attributes:
      kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` or
        ``collective-permute``.
      name: the instruction name.
      shapes: ``(dtype, shape)`` of each result (a tuple-shaped all-reduce has several).
      group_size: devices per replica group.
      reduction: the reduction's root op (``add``, ``maximum``, ``minimum``, ...) or ``None``.
      nbytes: bytes of the results.
      traffic: estimated bytes each device sends (ring algorithms, see the module docstring).
    """

    kind: str
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int
    reduction: str | None
    nbytes: int
    traffic: float


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if m:
        sizes = {k.strip("' "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        names = [n.strip("' ") for n in m.group(2).split(",") if n.strip("' ")]
        return math.prod(sizes[n] for n in names)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    if m:
        return 2
    return 1


def _reductions(text: str) -> dict[str, str]:
    """``{computation name: root op}`` of every computation in the module."""
    out, current = {}, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            continue
        m = _ROOT.match(line)
        if m and current is not None:
            out[current] = m.group(1)
            current = None
    return out


def _traffic(kind: str, nbytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * nbytes
    if kind in ("all-gather", "all-to-all"):
        return (n - 1) / n * nbytes
    if kind == "reduce-scatter":
        return (n - 1) * nbytes
    return float(nbytes)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module's text.

    Args:
      hlo_text: ``compiled.as_text()``.

    Returns:
      The collectives in text order (``-done`` halves of async pairs are not counted).

    Example:
      >>> ops = collectives(step.hlo(state, batch))
      >>> sum(op.traffic for op in ops)   # estimated bytes sent per device per step
    """
    reductions = _reductions(hlo_text)
    out = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        name, result, kind = m.group(1), m.group(2), m.group(3)
        shapes = tuple(
            (dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE.findall(result)
            if dt in _DTYPE_BYTES
        )
        if m.group(4) and kind in ("all-gather", "collective-permute", "all-to-all") and len(shapes) > 1:
            shapes = shapes[len(shapes) // 2 :]  # async start: (operands, results[, contexts])
        nbytes = int(sum(_DTYPE_BYTES[dt] * int(np.prod(s)) for dt, s in shapes))
        to_apply = re.search(r"to_apply=%?([\w.\-]+)", line)
        reduction = reductions.get(to_apply.group(1)) if to_apply else None
        n = _group_size(line)
        out.append(Collective(kind, name, shapes, n, reduction, nbytes, _traffic(kind, nbytes, n)))
    return out


def summary(ops: list[Collective]) -> dict[str, dict[str, float]]:
    """``{kind: {"count", "bytes", "traffic"}}`` totals (kinds that occur), for reports."""
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        s = out.setdefault(op.kind, {"count": 0, "bytes": 0, "traffic": 0.0})
        s["count"] += 1
        s["bytes"] += op.nbytes
        s["traffic"] += op.traffic
    return out
