"""Lowering a kernel for CUDA on a machine without a GPU.

Pallas Triton reads the target GPU's compute capability while lowering; jax 0.11 refuses
to guess it when no GPU is attached and takes it from the abstract mesh's device instead.
:func:`lower_for_cuda` names an H100 there (on jax 0.10 the same call lowers for the same
default target), so the Triton CUDA lowering tests run on both versions. (The Mosaic GPU
``wgmma`` kernel lowers without it, and fails to lower inside it on jax 0.11.)
"""

import contextlib
import io
import os
import re

import jax
from jax._src.mesh import AbstractDevice, AbstractMesh

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")

# `make precheck-gpu` sets it: lower every tuning candidate at every tuned shape, not a sample
FULL_LOWERING = os.environ.get("QJAX_FULL_LOWERING") == "1"


def lower_for_cuda(fn, *args) -> str:
    """The lowered module text of ``jax.jit(fn)(*args)`` for CUDA, targeting an H100."""
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_modules(fn, *args) -> list[str]:
    """The Triton modules (MLIR text, locations stripped) Pallas builds while lowering
    ``fn(*args)`` for CUDA: it prints them with ``pallas_call(debug=True)``."""
    from jax.experimental import pallas as pl

    orig = pl.pallas_call
    pl.pallas_call = lambda *a, **k: orig(*a, **{**k, "debug": True})  # the kernels call pl.pallas_call
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            lower_for_cuda(fn, *args)
    finally:
        pl.pallas_call = orig
    modules = []
    for start in (m.start() for m in re.finditer(r"^module @", buf.getvalue(), re.M)):
        lines, depth = [], 0
        for line in buf.getvalue()[start:].splitlines():
            lines.append(line)
            depth += line.count("{") - line.count("}")
            if depth == 0:
                break
        modules.append(re.sub(r' \[unknown\]| "[^"]*"\(#loc\d+\)| #loc\d*', "", "\n".join(lines)))
    return modules
