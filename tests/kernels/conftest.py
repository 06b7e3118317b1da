"""Fixtures of the kernel tests."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """``experiments/bench_kernels.py`` as a module (the benchmark is a script, not a package)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_kernels

        yield bench_kernels
    finally:
        sys.path.remove(str(ROOT / "experiments"))
