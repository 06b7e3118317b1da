"""Quantized attention matmuls (``qjax.OpRule``): a benchmark, not a test.

A Flax ``MultiHeadDotProductAttention`` layer, timed on the local backend for each batch
and sequence length:

* ``float32``: the float layer (the reference of the ratios);
* ``W8A8``: the four projections int8 (per-channel weights, per-token activations);
* ``W8A8 + attn``: the same, plus ``QKᵀ`` and ``PV`` int8 x int8 -> int32 with per-token
  scales on both operands (``qjax.OpRule(r".*/attn/.*->.*", lhs=pt, rhs=pt)``).

Each variant's error is ``max |y - y_float32| / max |y_float32|``. Timing:
``timing.time_interleaved`` (interleaved rounds, paired ratios to float32). Writes
``bench_attention.json`` and ``.md`` to ``--out``.

Usage::

    .venv/bin/python experiments/bench_attention.py          # ~1 minute on 2 cores
    .venv/bin/python experiments/bench_attention.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn
import jax
from report import write
from timing import cell, rel_err, report_header, time_interleaved

import qjax

RESULTS = Path(__file__).resolve().parent / "results"
PER_TOKEN = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
POLICIES = {
    "W8A8": qjax.Policy([qjax.Rule(r".*/kernel", weight=W8, act=PER_TOKEN)]),
    "W8A8 + attn": qjax.Policy(
        [
            qjax.Rule(r".*/kernel", weight=W8, act=PER_TOKEN),
            qjax.OpRule(r".*/attn/.*->.*", lhs=PER_TOKEN, rhs=PER_TOKEN),
        ]
    ),
}


class Layer(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(x)


def run_case(batch: int, seq: int, dim: int, heads: int, repeats: int, target_s: float) -> dict:
    layer = Layer(heads)
    x = jax.random.normal(jax.random.key(1), (batch, seq, dim))
    v = layer.init(jax.random.key(0), x)
    fns = {"float32": (jax.jit(layer.apply), v)}
    runs = {}
    for name, policy in POLICIES.items():
        fns[name] = (jax.jit(qjax.quantized(layer.apply, policy)), qjax.quantize_params(v, policy))
        ops = qjax.dispatch_report(layer.apply, policy)(fns[name][1], x)
        runs[name] = {op.path: op.runs for op in ops}
    outs = {k: fn(p, x) for k, (fn, p) in fns.items()}
    timed = time_interleaved(
        {k: (lambda fn=fn, p=p: fn(p, x)) for k, (fn, p) in fns.items()},
        repeats=repeats,
        target_s=target_s,
        reference="float32",
    )
    return {
        "batch": batch,
        "seq": seq,
        "dim": dim,
        "heads": heads,
        "runs": runs,
        "variants": {
            k: {
                "median_us": t["median_s"] * 1e6,
                "x_f32": t["ratio"],
                "rel_err": rel_err(outs[k], outs["float32"]),
            }
            for k, t in timed.items()
        },
    }


def markdown(report: dict) -> str:
    names = ["float32", *POLICIES]
    lines = [
        f"# Quantized attention matmuls, Flax MultiHeadDotProductAttention ({report['date']}, "
        f"{report['machine']}, jax {report['jax']})",
        "",
        "Median µs per call; in brackets the paired ratio to float32 (below 1: faster). "
        "err: max |y - y_float32| / max |y_float32|.",
        "",
        "| batch × seq × dim (heads) | " + " | ".join(names) + " | err W8A8 | err W8A8 + attn |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for c in report["cases"]:
        v = c["variants"]
        lines.append(
            f"| {c['batch']}×{c['seq']}×{c['dim']} ({c['heads']}) | "
            + " | ".join(cell(v[n]) for n in names)
            + f" | {v['W8A8']['rel_err']:.1e} | {v['W8A8 + attn']['rel_err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cases", default="1x128,4x128,1x512,4x512", help="batch x sequence length")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few rounds")
    args = p.parse_args(argv)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    dim, heads, repeats, target = (args.dim, args.heads, 7, 0.2)
    if args.quick:
        cases, dim, heads, repeats, target = [(1, 16)], 32, 2, 3, 0.01
    report = {**report_header(), "cases": []}
    for batch, seq in cases:
        case = run_case(batch, seq, dim, heads, repeats, target)
        print(
            batch,
            seq,
            {k: (round(v["median_us"]), round(v["x_f32"], 2)) for k, v in case["variants"].items()},
        )
        report["cases"].append(case)
    write("bench_attention" + ("_quick" if args.quick else ""), report, markdown(report), Path(args.out))
    # the attention matmuls must be integer matmuls, or the comparison is not what it says
    for case in report["cases"]:
        attn = {k: r for k, r in case["runs"]["W8A8 + attn"].items() if "->" in k}
        if len(attn) != 2 or not all("int8xint8 -> int32" in " ".join(r) for r in attn.values()):
            raise SystemExit(f"attention matmuls did not run as int8: {attn}")


if __name__ == "__main__":
    main()
