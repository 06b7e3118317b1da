"""Why the small-batch W4A16 kernels stream their weight at only ~1 TB/s: a GPU probe.

Times (CUPTI device time), at K = N = 8192, next to each other:

* XLA's bf16 dot at M = 1 and an XLA int32 reduction over the packed weight words (what
  "reading the weight" costs XLA);
* a Pallas Triton *streaming probe*: the ``gemv`` kernel's grid, tiles and K loop, but the
  body only adds the loaded int32 words (no unpacking, no float math) -- if it is as slow
  as the kernel, the bound is the load loop Pallas/Triton builds, not the arithmetic;
* the ``gemv`` kernel (k_halves, M = 1) and the tensor-core kernel (n_pairs, M = 16, swapped).

With ``--ncu`` it instead runs each kernel once with no timing, for Nsight Compute
(``ncu --kernel-name regex:qjax ...``); ``XLA_FLAGS=--xla_dump_to=DIR`` beside it keeps the
PTX. Writes a JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from qjax.kernels import BlockConfig, api
from qjax.kernels._common import as_int8
from qjax.kernels.gpu_gemv import as_words

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_checks import weight_in_layout
from kernel_timing import rotations, time_calls


def _probe_kernel(w_ref, o_ref, *, steps, rows):
    def body(t, acc):
        return acc + w_ref[pl.ds(pl.multiple_of(t * rows, rows), rows), :]

    acc = lax.fori_loop(0, steps, body, jnp.zeros((rows, w_ref.shape[1]), jnp.int32))
    o_ref[...] = jnp.sum(acc, axis=0, keepdims=True)


def stream_probe(words, *, rows, cols, split, warps, stages, interpret=False):
    """Sum of int32 ``words`` ``(R, C)`` over rows, per ``split`` chunk: ``(split, C)``."""
    r, c = words.shape
    rc = r // split
    return pl.pallas_call(
        functools.partial(_probe_kernel, steps=rc // rows, rows=rows),
        out_shape=jax.ShapeDtypeStruct((split, c), jnp.int32),
        grid=(c // cols, split),
        in_specs=[pl.BlockSpec((rc, cols), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((1, cols), lambda j, s: (s, j)),
        compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=stages),
        name="qjax_probe_stream",
        interpret=interpret,
    )(words)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results/profile_w4a16.json")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--ncu", action="store_true", help="run each kernel once, no timing (for ncu)")
    p.add_argument("--interpret", action="store_true", help="a CPU smoke test (use a small --size)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    k = n = args.size
    it = args.interpret
    codes = rng.integers(-8, 8, (k, n))
    w_kh = weight_in_layout(codes, "k_halves", 128)  # (K/2, N) bytes
    w_np = weight_in_layout(codes, "n_pairs")
    words = as_words(as_int8(w_kh))  # what the gemv kernel reads
    s = jnp.asarray(rng.uniform(0.01, 0.1, (1, n)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(1, k)), jnp.bfloat16)
    x16 = jnp.asarray(rng.normal(size=(16, k)), jnp.bfloat16)
    gemv = BlockConfig(1, 128, 128, 8, False, 4, 3, engine="gemv")
    mma = BlockConfig(16, 128, 128, 8, True, 4, 4)

    cases = {
        "xla_bf16_m1": (lambda x, w: x @ w, x1, "bf16"),
        "xla_sum_words": (lambda x, w: jnp.sum(w, axis=0), x1, "words"),
        "gemv_k_halves_m1": (
            lambda x, w: api.w4a16_matmul(
                x, w, s, layout="k_halves", pack_block=128, platform="gpu", config=gemv, interpret=it
            ),
            x1,
            "kh",
        ),
        "mma_n_pairs_m16": (
            lambda x, w: api.w4a16_matmul(
                x, w, s, layout="n_pairs", platform="gpu", config=mma, interpret=it
            ),
            x16,
            "np",
        ),
    }
    for rows, cols, split, warps, stages in [
        (64, 32, 8, 4, 3),  # the gemv config's word tile and grid
        (64, 32, 8, 4, 1),  # no software pipelining
        (64, 32, 8, 4, 5),
        (64, 128, 8, 4, 3),  # 4x wider tiles
        (128, 64, 8, 8, 3),
        (32, 32, 32, 4, 3),  # many small programs
        (64, 32, 2, 4, 3),  # few long programs
    ]:
        name = f"probe_r{rows}_c{cols}_s{split}_w{warps}_st{stages}"
        cfgd = dict(rows=rows, cols=cols, split=split, warps=warps, stages=stages, interpret=it)
        cases[name] = (lambda x, w, c=cfgd: stream_probe(w, **c), x1, "words")
    weights = {
        "bf16": jnp.asarray(codes, jnp.bfloat16),
        "words": words,
        "kh": w_kh,
        "np": w_np,
    }
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "k": k, "n": n, "cases": {}}
    for name, (fn, x, wkey) in cases.items():
        w = weights[wkey]
        try:
            if args.ncu:
                jax.block_until_ready(jax.jit(fn)(x, w))  # one launch of each kernel
                continue
            r = rotations(w.nbytes)
            ws = [w] + [
                w ^ jnp.zeros((), w.dtype) if w.dtype != jnp.bfloat16 else w + 0 for _ in range(r - 1)
            ]
            wall, dev = time_calls(fn, [x], ws, device=True)
            gbps = None if dev is None else w.nbytes / dev / 1e9
            report["cases"][name] = {"wall_us": wall * 1e6, "device_us": dev and dev * 1e6, "GBps": gbps}
        except Exception as e:
            report["cases"][name] = {"error": repr(e)[:400]}
        print(name, report["cases"].get(name), flush=True)
    if not args.ncu:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
