"""Block-size tuning tables: per platform, the measured best :class:`BlockConfig` for a
kernel at a shape, and its time next to XLA's.

The tables live beside this module as ``tuning_<platform>.json`` and are written by
``experiments/bench_kernels.py --write-table`` on the target machine. Lookup takes the entry
of the same kernel and layout whose batch bucket (next power of two of M, at least 16)
matches and whose ``(K, N)`` is nearest in log scale (within a factor
:data:`MAX_SHAPE_RATIO`, on a weight less than :data:`MAX_SHRINK` times larger); the
dispatch in ``qjax.quantized`` uses a kernel only where such a measured entry says the
kernel beat, by at least :data:`MIN_SPEEDUP`, the XLA formulation it would otherwise run on
the same stored weight (``xla_us``).

A GPU table records the compute capability it was measured on and applies only to GPUs of
that capability (timings from a Hopper say nothing about an Ampere part); on any other GPU
the table is empty and ``backend="auto"`` runs XLA. A GPU model may also have a table of its
own, ``tuning_gpu_<model>.json`` (:func:`device_table_path`, e.g.
``tuning_gpu_nvidia_h100_80gb_hbm3.json``): on that model its entries replace the
compute-capability table's for every kernel, group size and batch bucket it measured (an
H100 and an H200 share compute capability 9.0 but not their memory bandwidth). Each file
still holds the measurements of one device only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import jax

from qjax.kernels._common import BlockConfig

_DIR = Path(__file__).parent

# the least measured speedup for which "auto" takes a kernel: run-to-run noise of the
# per-call timings was a few percent (H200, 2026-11-26), so a 2% "win" is no win
MIN_SPEEDUP = 1.05
# how far (factor in K and in N) a measured entry stands for an unmeasured shape
MAX_SHAPE_RATIO = 4.0
# and how much smaller a weight (K x N) it stands for: a kernel's fixed costs (launch, pipeline
# fill, the split-K sum) weigh more on a smaller weight, so a speedup does not carry down. On
# an H100 (2026-11-26/27) the W4A16 tile at 2.4x bf16 on 8192^2 ran at 1.9x on 4096^2, and
# XLA's (N, K) int4 path that it beat by 1.2x at 8192^2, M = 16, ran 7.8 us at 4096^2 against
# ~9 us for the kernels: an entry at 8192^2 must not stand for 4096^2.
MAX_SHRINK = 2.0


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
    # the table file it came from (set when loaded): kernel times compare within one device
    # only, and a model's table merges with the shared one (load_table)
    source: str = dataclasses.field(default="", compare=False)

    @property
    def speedup(self) -> float:
        return self.xla_us / self.kernel_us


def kernel_name(kind: str, layout: str, engine: str = "triton") -> str:
    """The table's kernel key: ``"w8a8"`` (weight ``(K, N)``), ``"w8a8_nk"`` (the ``(K, N)``
    weight transposed to ``(N, K)`` in the program), ``"w8a8_nk_stored"`` (a weight stored
    ``(N, K)``), each with ``"_wgmma"`` for the Hopper Mosaic GPU kernel; ``"w8a16"``, or
    ``"w4a16_<layout>"`` (``"w8a16_nk"``, ``"w4a16_<layout>_nk"``: a weight-only weight stored
    ``(N, K)``); ``"_gemv"`` for the CUDA-core weight-only kernel."""
    if kind == "w4a16":
        name = f"w4a16_{layout}"
    elif kind == "w8a16":
        name = "w8a16_nk" if layout == "int8_nk" else "w8a16"
    else:
        name = {"nk": "w8a8_nk", "nk_stored": "w8a8_nk_stored"}.get(layout, kind) if kind == "w8a8" else kind
    return name if engine == "triton" else f"{name}_{engine}"


def m_bucket(m: int) -> int:
    """Batch bucket: the next power of two of ``m``, at least 16."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, m)))))


def table_path(platform: str) -> Path:
    return _DIR / f"tuning_{platform}.json"


def device_table_path(platform: str, device_kind: str) -> Path:
    """The table of one device model: ``tuning_<platform>_<model>.json``, the model being
    ``device_kind`` in lower case with every run of other characters turned into ``_``
    (``"NVIDIA H100 80GB HBM3"`` -> ``tuning_gpu_nvidia_h100_80gb_hbm3.json``)."""
    slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    return _DIR / f"tuning_{platform}_{slug}.json"


def read_table(path: Path) -> tuple[TunedEntry, ...]:
    """The entries of a table file (``write_table``'s format)."""
    return _entries(json.loads(Path(path).read_text()), Path(path).name)


def table_compute_capability(path: Path) -> str | None:
    """The GPU compute capability a table was measured on (``None``: not recorded)."""
    return json.loads(Path(path).read_text()).get("compute_capability")


def gpu_compute_capability() -> str | None:
    """The default device's compute capability (``"9.0"`` on an H100 / H200), or ``None``
    when the default backend is not a GPU."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return None if cc is None else str(cc)


def gpu_device_kind() -> str | None:
    """The default device's model (``jax.Device.device_kind``, e.g. ``"NVIDIA H100 80GB
    HBM3"``), or ``None`` when the default backend is not a GPU."""
    if jax.default_backend() != "gpu":
        return None
    return jax.devices()[0].device_kind


def _entries(data: dict, source: str = "") -> tuple[TunedEntry, ...]:
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
            source=source,
        )
        for e in data.get("entries", [])
    )


def _applicable(path: Path, platform: str, device_kind: str | None = None) -> tuple[TunedEntry, ...]:
    """A table's entries if it exists and applies here (compute capability on a GPU; for a
    model's own table also the recorded device), else none."""
    if not path.exists():
        return ()
    data = json.loads(path.read_text())
    here = gpu_compute_capability() if platform == "gpu" else None
    if here is not None and data.get("compute_capability") != here:
        return ()
    if device_kind is not None and data.get("device") != device_kind:
        return ()  # two models whose names reduce to the same file name
    return _entries(data, path.name)


@functools.cache
def load_table(platform: str) -> tuple[TunedEntry, ...]:
    """The shipped table for ``platform`` (``"gpu"`` or ``"tpu"``); empty when none, and for
    ``"gpu"`` also empty on a GPU of another compute capability than the table's (off a GPU,
    as for the interpreter, the table's configs still serve as legal defaults). On a GPU
    model with a table of its own (:func:`device_table_path`), its entries come first and
    replace the compute-capability table's for each ``(kernel, group size, batch bucket)``
    they cover."""
    shared = _applicable(table_path(platform), platform)
    kind = gpu_device_kind() if platform == "gpu" else None
    own = () if kind is None else _applicable(device_table_path(platform, kind), platform, kind)
    covered = {(e.kernel, e.group_size, m_bucket(e.m)) for e in own}
    return own + tuple(e for e in shared if (e.kernel, e.group_size, m_bucket(e.m)) not in covered)


def batch_distance(e: TunedEntry, m: int) -> tuple[float, int]:
    """How far ``e`` was measured from batch ``m``: ``|log(e.m / m)|``, ties going to the
    larger measured batch (the more demanding one), whatever the table's order."""
    return abs(math.log(e.m / max(1, m))), -e.m


def shape_distance(e: TunedEntry, k: int, n: int) -> float:
    """How far ``e`` was measured from ``(K, N)``: ``|log(e.k / k)| + |log(e.n / n)|``."""
    return abs(math.log(e.k / k)) + abs(math.log(e.n / n))


def preferred(entries, m: int, k: int, n: int) -> TunedEntry | None:
    """Of entries for one op (other engines or weight layouts), the one measured at the batch
    nearest to ``m`` (:func:`batch_distance`), then at the nearest ``(K, N)``; among those,
    if all were measured at one shape on one device (one table file) the shortest kernel
    time (each entry's ``xla_us`` is its own timing of the same XLA op, so a noisy baseline
    must not choose the slower kernel), else the largest speedup (times measured on another
    device, or at another shape, do not compare). ``None`` for no entries."""
    if not entries:
        return None
    near = lambda e: (*batch_distance(e, m), shape_distance(e, k, n))
    closest = min(map(near, entries))
    nearest = [e for e in entries if near(e) == closest]
    if len({(e.m, e.k, e.n, e.source) for e in nearest}) == 1:
        return min(nearest, key=lambda e: e.kernel_us)
    return max(nearest, key=lambda e: e.speedup)


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

    Only entries of the same kernel, group size and batch bucket, measured within a factor
    :data:`MAX_SHAPE_RATIO` of K and of N and on a weight at most :data:`MAX_SHRINK` times
    larger than ``K x N``, qualify (a speedup measured at 4096 says little about K = 256,
    and one measured at 8192^2 overstates 4096^2); among them the one nearest in
    ``log K + log N``, then nearest in M (on a tie the larger M, whatever the file's order).
    """
    entries = load_table(platform) if entries is None else entries
    bucket, near = m_bucket(m), math.log(MAX_SHAPE_RATIO) + 1e-9
    same = [
        e
        for e in entries
        if e.kernel == kernel
        and e.group_size == group_size
        and m_bucket(e.m) == bucket
        and abs(math.log(e.k / k)) <= near
        and abs(math.log(e.n / n)) <= near
        and e.k * e.n < MAX_SHRINK * k * n
    ]
    if not same:
        return None
    return min(same, key=lambda e: (shape_distance(e, k, n), *batch_distance(e, m)))


def write_table(
    path: Path, device: str, date: str, entries: list[TunedEntry], compute_capability: str | None = None
) -> None:
    """Write a table (used by ``experiments/bench_kernels.py --write-table``); a GPU table
    should name the ``compute_capability`` it was measured on (see :func:`load_table`)."""
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
    head = {"device": device, "date": date}
    if compute_capability is not None:
        head["compute_capability"] = compute_capability
    path.write_text(json.dumps({**head, "entries": rows}, indent=1) + "\n")
