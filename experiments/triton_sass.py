"""Offline SASS of a qjax Pallas Triton kernel: registers, spills and the K loop's
instruction mix for an sm_90a (or ``--arch 80``: sm_80) target, on a machine with no GPU.

Pallas prints the Triton module it builds (``pallas_call(debug=True)``); this script lowers
one kernel call for CUDA on the CPU, takes that module
(``tests/kernels/cuda_target.py::triton_modules``), compiles it with the ``triton``
package (``pip install triton``: the ``kernel-tools`` extra; its bundled ``ptxas`` and
``cuobjdump``) and reports what the GPU would run. XLA embeds its own Triton, so register
counts differ a little from a device run (measured on an H100: 243 vs 216 here for the same
gemv kernel), but layout conversions through shared memory (``STS`` / ``BAR.SYNC`` in the
loop), spills and the instructions per weight code show up the same.

    python experiments/triton_sass.py --layout k_halves --config 1,128,128,8,4,3,gemv --m 1
    python experiments/triton_sass.py --layout n_pairs --candidates --dequant ptx --m 64 --size 4096
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qjax.kernels import BlockConfig, api  # noqa: E402
from qjax.kernels._common import split_layout  # noqa: E402
from qjax.kernels.candidates import gpu_candidates  # noqa: E402
from tests.kernels.cuda_target import triton_modules  # noqa: E402


def compile_sass(ttir: str, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile a Triton module for ``sm_<arch>`` (``sm_90a`` for 90):
    ``{"registers", "spill_bytes", "shared", "sass"}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ttir"
        src.write_text(ttir)
        k = triton.compile(
            str(src),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        info = subprocess.run(
            [bin_dir / "ptxas", "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}", ptx, "-o", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [bin_dir / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill", info))
    return {"registers": regs, "spill_bytes": spills, "shared": k.metadata.shared, "sass": sass}


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts of the innermost backward-branch loop (the K loop)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    mix = collections.Counter()
    for i, ln in enumerate(lines):
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:  # a backward branch: the loop is [target, here]
            lo = int(m.group(1), 16)
            for j in range(i + 1):
                if addr[j] >= lo:
                    op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", lines[j])
                    if op:
                        mix[op.group(1)] += 1
            break
    return mix


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--layout",
        default="k_halves",
        choices=("k_halves", "k_pairs", "n_pairs", "int8", "k_pairs_nk", "n_pairs_nk", "int8_nk"),
        help="'_nk': the weight stored (N, K)",
    )
    p.add_argument(
        "--config", default="1,128,128,8,4,3,gemv", help="bm,bn,bk,split,warps,stages,engine[,swap]"
    )
    p.add_argument(
        "--dequant", default="logic", choices=("logic", "ptx"), help="int4 unpacking (triton engine)"
    )
    p.add_argument(
        "--split-reduce", default="xla", choices=("xla", "kernel"), help="split-K sum (triton engine)"
    )
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--size", type=int, default=8192, help="K = N")
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--sass", default=None, help="also write the SASS here")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: sm_90a, 80: sm_80)")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="compile every tuning candidate of this layout, group and --dequant at --m instead of --config",
    )
    args = p.parse_args(argv)
    if args.candidates:
        kind = "w8a16" if args.layout.startswith("int8") else "w4a16"
        cands = gpu_candidates(kind, args.m, args.size, args.size, args.group, args.layout)
        for cfg in (c for c in cands if c.dequant == args.dequant):
            try:
                print(json.dumps(report(args, cfg)), flush=True)
            except Exception as e:  # a compile failure is a finding: record it, go on
                print(json.dumps({"config": cfg.to_dict(), "error": repr(e)[:300]}), flush=True)
        return
    f = args.config.split(",")
    bm, bn, bk, split, warps, stages = map(int, f[:6])
    engine, swap = (f[6] if len(f) > 6 else "triton"), (len(f) > 7 and f[7] == "swap")
    print(
        json.dumps(
            report(
                args,
                BlockConfig(
                    bm,
                    bn,
                    bk,
                    split,
                    swap,
                    warps,
                    stages,
                    engine,
                    dequant=args.dequant,
                    split_reduce=args.split_reduce,
                ),
            )
        )
    )


def report(args, cfg: BlockConfig) -> dict:
    """Compile one weight-only kernel call at the shape ``args`` names; its SASS summary."""
    k = n = args.size
    base, nk = split_layout(args.layout)
    wshape = {"int8": (k, n), "n_pairs": (k, n // 2)}.get(base, (k // 2, n))
    sshape = (1 if args.group is None else k // args.group, n)
    x = jax.ShapeDtypeStruct((args.m, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct(wshape[::-1] if nk else wshape, jnp.int8)
    s = jax.ShapeDtypeStruct(sshape[::-1] if nk else sshape, jnp.float32)
    common = dict(group_size=args.group, platform="gpu", config=cfg, b_layout="nk" if nk else "kn")
    if base == "int8":
        fn = lambda x, w, s: api.w8a16_matmul(x, w, s, **common)
    else:
        pb = cfg.block_k if base == "k_halves" else None
        fn = lambda x, w, s: api.w4a16_matmul(x, w, s, layout=base, pack_block=pb, **common)
    out = compile_sass(triton_modules(fn, x, w, s)[0], cfg.num_warps, cfg.num_stages, args.arch)
    if args.sass:
        Path(args.sass).write_text(out["sass"])
    mix = loop_mix(out["sass"])
    per_step = cfg.block_k * cfg.block_n / (32 * cfg.num_warps)  # weight codes a thread handles per K step
    return {
        "layout": args.layout,
        "m": args.m,
        "size": args.size,
        "group": args.group,
        "arch": args.arch,
        "config": cfg.to_dict(),
        "registers": out["registers"],
        "spill_bytes": out["spill_bytes"],
        "shared": out["shared"],
        "loop_instructions": sum(mix.values()),
        "codes_per_thread_step": per_step,
        "instructions_per_code": round(sum(mix.values()) / per_step, 2),
        "loop_mix": dict(mix.most_common()),
    }


if __name__ == "__main__":
    main()
