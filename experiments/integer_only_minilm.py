"""Integer-only inference of the real all-MiniLM-L6-v2 sentence encoder (I-BERT's setting).

``qjax.integer_only`` runs the six encoder layers on integers from the first quantized
matmul to the last hidden states: int8 × int8 → int32 matmuls (the 36 linear layers and
attention's ``QKᵀ`` / ``PV`` through ``OpRule`` with calibrated static scales), softmax,
GELU and LayerNorm evaluated on integers (fitted fixed-point pieces), residual adds and
requantization by dyadic multipliers. The embeddings (a table lookup and their
LayerNorm) and the mean pooling run in float, as the model's input and output.

Compared on the same quantization (weights int8 per channel, activations int8 per tensor,
static, percentile-calibrated; attention operands int8 / probabilities uint8, static):
``qjax.quantized`` (the matmuls in integers, rescaled in float, softmax / GELU / LayerNorm
in float) against ``integer_only``. Metrics against the float model's embeddings of
``experiments/data/sentences.txt`` (every 3rd sentence calibrates, the rest are evaluated,
as in ``ptq_minilm.py``): mean / minimum cosine similarity and Spearman correlation of the
pairwise similarities; CPU latency of batch 32 × 128 tokens (interleaved paired timing).

Run: ``.venv/bin/python experiments/integer_only_minilm.py [--fast]``; writes
experiments/results/integer_only_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from ptq_minilm import BATCH, KERNELS, SEQ, batches, metrics, sentence_split, w_spec
from report import machine, write
from timing import time_interleaved

import qjax
from qjax.models import load_minilm

A8 = qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.99))
P8 = qjax.QuantSpec(qjax.uint8)  # probabilities in [0, 1]
POLICY = qjax.Policy(
    [
        qjax.Rule(KERNELS, weight=w_spec(qjax.int8), act=A8),
        qjax.OpRule(r".*/attention/bqhd,bkhd->bhqk", lhs=A8, rhs=A8),  # QKᵀ
        qjax.OpRule(r".*/attention/bhqk,bkhd->bqhd", lhs=A8, rhs=P8),  # PV: dot_general(value, probs)
    ]
)


def pooled(hidden, mask) -> jax.Array:
    """The model's mean pooling and L2 normalisation, in float."""
    m = mask[..., None].astype(jnp.float32)
    p = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="few sentences, short timing (smoke test)")
    args = ap.parse_args()
    model, variables, tok = load_minilm()
    calib_s, eval_s, calib, data = sentence_split(tok, args.fast)
    hidden = lambda v, ids, mask, types: model.apply(v, ids, mask, types, return_hidden=True)

    t0 = time.perf_counter()
    stats = qjax.calibrate(hidden, POLICY, variables, calib)
    qp = qjax.quantize_params(variables, POLICY, act_stats=stats)
    quantize_s = time.perf_counter() - t0
    served = jax.jit(qjax.quantized(hidden, POLICY, op_stats=stats))
    t0 = time.perf_counter()
    integer = qjax.integer_only(hidden, POLICY, qp, op_stats=stats, calibration=calib)
    ranges_s = time.perf_counter() - t0
    float_fn = jax.jit(hidden)

    variants = {
        "float": lambda b: float_fn(variables, *b),
        "W8A8 static, served (float softmax / GELU / LayerNorm)": lambda b: served(qp, *b),
        "W8A8 static, integer-only": lambda b: integer(*b),
    }
    ref = np.concatenate([np.asarray(pooled(variants["float"](b), b[1])) for b in data])
    rows: dict[str, dict] = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        emb = np.concatenate([np.asarray(pooled(fn(b), b[1])) for b in data])
        rows[name] = {**metrics(emb, ref), "first_pass_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:56s} {rows[name]}", flush=True)

    bench = batches(tok, (eval_s * 4)[:BATCH], BATCH, padding="max_length")[0]
    lat = time_interleaved(
        {name: (lambda fn=fn: fn(bench)) for name, fn in variants.items()},
        repeats=3 if args.fast else 7,
        target_s=0.3 if args.fast else 1.0,
        reference="float",
    )
    for name, r in lat.items():
        rows[name]["latency_ms"] = round(1e3 * r["median_s"], 1)
        rows[name]["latency_vs_float"] = round(r["ratio"], 3)

    result = {
        "machine": machine(),
        "rows": rows,
        "eval_sentences": len(eval_s),
        "calib_sentences": len(calib_s),
        "calibrate_and_quantize_s": round(quantize_s, 1),
        "integer_ranges_s": round(ranges_s, 1),
    }
    md = markdown(result)
    print(md)
    if not args.fast:
        write("integer_only_minilm", result, md)


def markdown(result: dict) -> str:
    mach = result["machine"]
    lines = [
        "# Integer-only all-MiniLM-L6-v2 (real weights)",
        "",
        f"{mach['date']}, {mach['processor']}, {mach['cpu_count']} cores, jax {mach['jax']}. "
        f"{result['eval_sentences']} evaluation sentences, {result['calib_sentences']} calibration "
        f"sentences; latency: batch {BATCH} x {SEQ} tokens, median of interleaved samples, ratio "
        "paired against float in the same run. Embeddings and pooling in float; the six encoder "
        "layers integer-only in the last row.",
        "",
        "| variant | mean cos | min cos | Spearman (pairwise sims) | latency ms (vs float) | first pass s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lat = f"{r['latency_ms']} ({r['latency_vs_float']:.2f}×)" if "latency_ms" in r else ""
        lines.append(
            f"| {name} | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | {r['spearman']:.5f} | {lat} | "
            f"{r['first_pass_s']} |"
        )
    lines += [
        "",
        f"Calibration and quantization: {result['calibrate_and_quantize_s']} s; the integer program's "
        f"intermediate ranges (a float pass over the calibration batches): {result['integer_ranges_s']} s. "
        "The first pass includes tracing and compiling (for integer-only: fitting each nonlinearity).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
