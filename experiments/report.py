"""Shared experiment reporting: machine metadata and writing results files."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np

import qjax

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Date, machine, versions and load average for a results file."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "qjax": qjax.__version__,
        "load_avg_1min_start": os.getloadavg()[0],
    }


def write(name: str, result: dict[str, Any], markdown: str, out: Path = RESULTS) -> None:
    """Write ``{out}/{name}.json`` and ``{out}/{name}.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def rank_corr(a, b) -> float:
    """Spearman rank correlation of two sequences (ties broken by position)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
