"""Deterministic data per test: each test module's ``RNG`` is reseeded from the test's
name before it runs, so a test sees the same numbers however the suite is selected
or ordered (``-k``, ``-p xdist``, reruns)."""

import zlib

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _fresh_rng(request):
    module = request.module
    if hasattr(module, "RNG"):
        seed = zlib.crc32(f"{module.__name__}::{request.node.name}".encode())
        module.RNG = np.random.default_rng(seed)
