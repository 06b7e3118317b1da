"""Shared benchmark timing: interleaved sampling with paired ratios, and the header and
error measure the side-by-side benchmarks record."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def report_header() -> dict[str, Any]:
    """Date, machine and jax version, for a benchmark's JSON report."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def rel_err(y, ref) -> float:
    """max |y - ref| / max |ref|, in float64."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def cell(v: dict[str, Any]) -> str:
    """A Markdown table cell: median µs, the paired ratio to the reference in brackets
    (``{"median_us", "x_f32"}``)."""
    return f"{v['median_us']:.0f} ({v['x_f32']:.2f})"


def time_interleaved(
    variants: dict[str, Callable[[], Any]], *, repeats: int, target_s: float, reference: str
) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each zero-argument variant (each call's result is
    blocked on). Variants are compiled and warmed up, then sampled in a rotating
    interleaved order; each sample is at least ``target_s`` of back-to-back calls.

    Returns:
      ``{name: {"median_s", "min_s", "ratio", "inner", "samples_s"}}``; ``ratio`` is the
      median over rounds of this variant's sample divided by ``reference``'s sample of
      the same round (a paired ratio, robust to slow drift in machine load).
    """
    inner = {}
    for name, fn in variants.items():
        jax.block_until_ready(fn())  # compile
        jax.block_until_ready(fn())  # warm
        t = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - t
        inner[name] = max(1, math.ceil(target_s / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = variants[name], inner[name]
            t = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - t) / n)
    ref = samples[reference]
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "ratio": statistics.median(a / b for a, b in zip(s, ref)),
            "inner": inner[name],
            "samples_s": s,
        }
        for name, s in samples.items()
    }
