"""Block-size tuning tables: per platform, the measured best :class:`BlockConfig` for a
kernel at a shape, and its time next to XLA's.

The tables live beside this module as ``tuning_<platform>.json`` and are written by
``experiments/bench_kernels.py --write-table`` on the target machine. Lookup takes the entry of the same
kernel and layout whose batch bucket (next power of two of M, at least 16) matches and whose
``(K, N)`` is nearest in log scale; the dispatch in ``qjax.quantized`` uses a kernel only
where such a measured entry says the kernel beat XLA (``speedup > 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from qjax.kernels._common import BlockConfig

_DIR = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class TunedEntry:
    """One measured point: the best config for ``kernel`` at ``(m, k, n)``."""

    kernel: str  # kernel_name(): "w4a16_<layout>", "w8a16", "w8a8", "w8a8_nk", "w8a8_nk_wgmma"
    m: int
    k: int
    n: int
    group_size: int | None
    config: BlockConfig
    kernel_us: float
    xla_us: float

    @property
    def speedup(self) -> float:
        return self.xla_us / self.kernel_us


def kernel_name(kind: str, layout: str, engine: str = "triton") -> str:
    """The table's kernel key: ``"w8a8"`` (weight ``(K, N)``), ``"w8a8_nk"`` (weight
    ``(N, K)``), ``"w8a8_nk_wgmma"`` (the Hopper Mosaic GPU kernel), ``"w8a16"``, or
    ``"w4a16_<layout>"``."""
    if kind == "w4a16":
        name = f"w4a16_{layout}"
    else:
        name = "w8a8_nk" if kind == "w8a8" and layout == "nk" else kind
    return name if engine == "triton" else f"{name}_{engine}"


def m_bucket(m: int) -> int:
    """Batch bucket: the next power of two of ``m``, at least 16."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, m)))))


def table_path(platform: str) -> Path:
    return _DIR / f"tuning_{platform}.json"


def read_table(path: Path) -> tuple[TunedEntry, ...]:
    """The entries of a table file (``write_table``'s format)."""
    data = json.loads(Path(path).read_text())
    return tuple(
        TunedEntry(
            kernel=e["kernel"],
            m=e["m"],
            k=e["k"],
            n=e["n"],
            group_size=e.get("group_size"),
            config=BlockConfig.from_dict(e["config"]),
            kernel_us=e["kernel_us"],
            xla_us=e["xla_us"],
        )
        for e in data.get("entries", [])
    )


@functools.cache
def load_table(platform: str) -> tuple[TunedEntry, ...]:
    """The shipped table for ``platform`` (``"gpu"`` or ``"tpu"``); empty when none."""
    path = table_path(platform)
    return read_table(path) if path.exists() else ()


def lookup(
    platform: str,
    kernel: str,
    m: int,
    k: int,
    n: int,
    group_size: int | None,
    entries: tuple[TunedEntry, ...] | None = None,
) -> TunedEntry | None:
    """The tuned entry nearest to ``(m, k, n)`` for ``kernel``, or ``None``.

    Only entries of the same kernel, group size and batch bucket qualify; among them the
    one nearest in ``log K + log N``.
    """
    entries = load_table(platform) if entries is None else entries
    bucket = m_bucket(m)
    same = [
        e for e in entries if e.kernel == kernel and e.group_size == group_size and m_bucket(e.m) == bucket
    ]
    if not same:
        return None
    return min(same, key=lambda e: abs(math.log(e.k / k)) + abs(math.log(e.n / n)))


def write_table(path: Path, device: str, date: str, entries: list[TunedEntry]) -> None:
    """Write a table (used by ``experiments/bench_kernels.py --write-table``)."""
    rows = [
        {
            "kernel": e.kernel,
            "m": e.m,
            "k": e.k,
            "n": e.n,
            "group_size": e.group_size,
            "config": e.config.to_dict(),
            "kernel_us": round(e.kernel_us, 3),
            "xla_us": round(e.xla_us, 3),
        }
        for e in entries
    ]
    path.write_text(json.dumps({"device": device, "date": date, "entries": rows}, indent=1) + "\n")
