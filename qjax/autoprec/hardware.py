"""Hardware capability table: which compute formats a backend runs natively, and how
fast relative to its reference float format.

Speeds are dense matmul peak-throughput ratios from the vendors' public specifications
(relative to bfloat16 on accelerators, to float32 on CPUs), or, for CPUs, measured by
``experiments/bench_ops.py``. They feed an analytical cost (``MACs / speed``) and decide
which candidates a backend can run; measured latency on the current backend is a separate
cost (:mod:`qjax.autoprec.cost`). Weight-only candidates (float activations) run in the
activation's float format on every backend (the weight is dequantized on the fly): they
save memory and bandwidth, not compute.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from qjax.autoprec.candidates import Candidate


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One backend's natively supported compute formats.

    Attributes:
      name: table key (``"tpu-v5e"``, ``"nvidia-hopper"``, ``"cpu-int8"``, ...).
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
      native: ``((format name, relative matmul throughput), ...)``; formats not listed
        are emulated (run in ``reference`` after dequantizing).
      reference: the float format activations are computed in by default
        (``"float32"`` on CPU, ``"bfloat16"`` on accelerators).
      description: where the numbers come from.
    """

    name: str
    platform: str
    native: tuple[tuple[str, float], ...]
    reference: str = "bfloat16"
    description: str = ""

    def __post_init__(self):
        native = tuple((str(k), float(v)) for k, v in dict(self.native).items())
        if not native:
            raise ValueError(f"Hardware {self.name!r}: native formats are empty")
        for k, v in native:
            if not v > 0:
                raise ValueError(f"Hardware {self.name!r}: speed of {k!r} must be > 0, got {v}")
        if self.reference not in dict(native):
            raise ValueError(f"Hardware {self.name!r}: reference {self.reference!r} must be native")
        object.__setattr__(self, "native", native)

    def runs_natively(self, fmt: str) -> bool:
        """Whether compute format ``fmt`` (``"int8"``, ``"fp8_e4m3"``, ...) is native."""
        return fmt in dict(self.native)

    def speed(self, fmt: str) -> float:
        """Relative matmul throughput of ``fmt``; an emulated format runs at the speed of
        ``reference``."""
        native = dict(self.native)
        return native.get(fmt, native[self.reference])

    def supports(self, candidate: Candidate) -> bool:
        """Whether ``candidate``'s compute format is native (float and weight-only
        candidates always are: they compute in the reference format).

        Example:
          >>> lookup("cpu").supports(w8a8), lookup("tpu-v5e").supports(w8a8)
          (False, True)
        """
        fmt = candidate.compute_format(self.reference)
        return fmt == self.reference or self.runs_natively(fmt)

    def candidate_speed(self, candidate: Candidate) -> float:
        """Relative throughput of the matmuls of a layer that uses ``candidate``."""
        return self.speed(candidate.compute_format(self.reference))

    def with_native(self, **speeds: float) -> Hardware:
        """A copy with some formats added or their speeds changed; a speed of 0 removes
        the format.

        Raises:
          ValueError: the reference format is removed.

        Example:
          >>> lookup("cpu").with_native(int8=2.0).supports(w8a8)
          True
        """
        native = dict(self.native)
        for k, v in speeds.items():
            if v == 0:
                native.pop(k, None)
            else:
                native[k] = v
        return dataclasses.replace(self, native=tuple(native.items()))


_HOPPER = "NVIDIA H100/H200 SXM dense peaks: TF32 495, BF16 989, FP8 1979, INT8 1979 T(FL)OPS"
_TPU = "TPU {v}: bf16 {bf} TFLOPS, int8 {i8} TOPS (Google Cloud TPU specifications)"

HARDWARE: Mapping[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            "cpu",
            "cpu",
            (("float32", 1.0),),
            "float32",
            "CPU without int8 dot-product instructions: integer matmuls are emulated",
        ),
        Hardware(
            "cpu-int8",
            "cpu",
            (("float32", 1.0), ("int8", 1.4)),
            "float32",
            "CPU with int8 dot-product instructions (AVX512-VNNI / AVX-VNNI / AMX-INT8, Arm "
            "dotprod/i8mm); int8 speed measured by experiments/bench_ops.py (XLA:CPU W8A8 "
            "0.70x the float32 time at batch 256, 1024x1024, AMD EPYC)",
        ),
        Hardware(
            "nvidia-ampere",
            "gpu",
            (("float32", 0.5), ("bfloat16", 1.0), ("float16", 1.0), ("int8", 2.0)),
            "bfloat16",
            "NVIDIA A100 dense peaks: TF32 156, BF16 312, INT8 624 T(FL)OPS; no fp8",
        ),
        Hardware(
            "nvidia-ada",
            "gpu",
            (
                ("float32", 0.5),
                ("bfloat16", 1.0),
                ("float16", 1.0),
                ("int8", 2.0),
                ("fp8_e4m3", 2.0),
                ("fp8_e5m2", 2.0),
            ),
            "bfloat16",
            "NVIDIA Ada (L4/L40): FP8 and INT8 at twice BF16 dense throughput",
        ),
        Hardware(
            "nvidia-hopper",
            "gpu",
            (
                ("float32", 0.5),
                ("bfloat16", 1.0),
                ("float16", 1.0),
                ("int8", 2.0),
                ("fp8_e4m3", 2.0),
                ("fp8_e5m2", 2.0),
            ),
            "bfloat16",
            _HOPPER,
        ),
        Hardware(
            "nvidia-blackwell",
            "gpu",
            (
                ("float32", 0.5),
                ("bfloat16", 1.0),
                ("float16", 1.0),
                ("int8", 2.0),
                ("fp8_e4m3", 2.0),
                ("fp8_e5m2", 2.0),
            ),
            "bfloat16",
            "NVIDIA B200 dense peaks: BF16 2.25, FP8/INT8 4.5 P(FL)OPS (fp4 is not a qjax format)",
        ),
        Hardware(
            "tpu-v5e",
            "tpu",
            (("float32", 1.0), ("bfloat16", 1.0), ("int8", 2.0)),
            "bfloat16",
            _TPU.format(v="v5e", bf=197, i8=394) + "; float32 at default precision is one bf16 pass",
        ),
        Hardware(
            "tpu-v5p",
            "tpu",
            (("float32", 1.0), ("bfloat16", 1.0), ("int8", 2.0)),
            "bfloat16",
            _TPU.format(v="v5p", bf=459, i8=918) + "; float32 at default precision is one bf16 pass",
        ),
        Hardware(
            "tpu-v6e",
            "tpu",
            (("float32", 1.0), ("bfloat16", 1.0), ("int8", 2.0)),
            "bfloat16",
            _TPU.format(v="v6e (Trillium)", bf=918, i8=1836)
            + "; float32 at default precision is one bf16 pass",
        ),
        Hardware(
            "tpu-v7x",
            "tpu",
            (("float32", 1.0), ("bfloat16", 1.0), ("fp8_e4m3", 2.0), ("fp8_e5m2", 2.0)),
            "bfloat16",
            "TPU v7x (Ironwood): fp8 4614 TFLOPS, twice bf16; int8 is not listed as a native "
            "MXU format in the public specification, so it is treated as emulated",
        ),
    )
}

# (regex on the lower-cased device kind, table key); first match wins.
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    (r".*(h100|h200|h800|gh200|h20\b).*", "nvidia-hopper"),
    (r".*(b100|b200|gb200|b300|gb300).*", "nvidia-blackwell"),
    (r".*(\bl4\b|l40|rtx 40|rtx 6000 ada|ada).*", "nvidia-ada"),
    (r".*(a100|a800|a40|a30|a10\b|a10g|rtx 30|rtx a).*", "nvidia-ampere"),
    (r".*v5 ?(lite|e).*", "tpu-v5e"),
    (r".*v5.*", "tpu-v5p"),
    (r".*v6.*", "tpu-v6e"),
    (r".*(v7|7x|ironwood).*", "tpu-v7x"),
)

_CPU_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "asimddp", "i8mm"})


def lookup(name: str) -> Hardware:
    """The table entry ``name``.

    Args:
      name: a key of :data:`HARDWARE`.

    Returns:
      The :class:`Hardware`.

    Raises:
      KeyError: unknown name (the message lists the known ones).

    Example:
      >>> lookup("tpu-v5e").speed("int8")
      2.0
    """
    try:
        return HARDWARE[name]
    except KeyError:
        raise KeyError(f"unknown hardware {name!r}; known: {sorted(HARDWARE)}") from None


def cpu_has_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (x86 VNNI/AMX-INT8, Arm
    dotprod/i8mm), read from ``/proc/cpuinfo`` flags (or the given text). Apple silicon
    (arm64 macOS) has dotprod. ``False`` when nothing can be read.

    Args:
      cpuinfo: text to search instead of ``/proc/cpuinfo``.

    Returns:
      ``bool``. Never raises (unreadable flags count as absent).

    Example:
      >>> cpu_has_int8_dot("flags : fpu avx2 avx512_vnni")
      True
    """
    if cpuinfo is None:
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            return True
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    words = set(re.findall(r"[a-z0-9_]+", cpuinfo.lower()))
    return bool(words & _CPU_INT8_FLAGS)


def detect_hardware(
    override: str | Hardware | None = None,
    *,
    devices: Sequence[Any] | None = None,
    cpuinfo: str | None = None,
) -> Hardware:
    """The capability table entry of the first device JAX uses.

    Args:
      override: a table key or a :class:`Hardware` to use instead of detecting (e.g.
        plan for ``"tpu-v5e"`` from a CPU workstation).
      devices: devices to inspect (default ``jax.devices()``); their ``platform`` and
        ``device_kind`` pick the entry.
      cpuinfo: ``/proc/cpuinfo`` text to read CPU flags from (default: the real one).

    Returns:
      A :class:`Hardware`. An unrecognised accelerator gets a generic entry in which only
      float32 and bfloat16 are native.

    Raises:
      KeyError: ``override`` names no table entry. TypeError: ``override`` has a wrong type.

    Example:
      >>> detect_hardware().name           # on a Cloud TPU v5e VM
      'tpu-v5e'
      >>> detect_hardware("nvidia-hopper").supports(w8a8)
      True
    """
    if isinstance(override, Hardware):
        return override
    if isinstance(override, str):
        return lookup(override)
    if override is not None:
        raise TypeError(f"override must be a hardware name or a Hardware, got {override!r}")
    dev = (jax.devices() if devices is None else list(devices))[0]
    plat = str(getattr(dev, "platform", "cpu")).lower()
    kind = str(getattr(dev, "device_kind", "")).lower()
    if plat == "cpu":
        return HARDWARE["cpu-int8" if cpu_has_int8_dot(cpuinfo) else "cpu"]
    for pattern, key in _DEVICE_KINDS:
        hw = HARDWARE[key]
        if hw.platform == ("tpu" if plat == "tpu" else "gpu") and re.fullmatch(pattern, kind):
            return hw
    ref = "bfloat16"
    return Hardware(
        f"{plat}-unknown",
        "tpu" if plat == "tpu" else "gpu",
        (("float32", 1.0), (ref, 1.0)),
        ref,
        f"unrecognised device kind {kind!r}: only float formats assumed native",
    )
