"""How fast can W8A8 MiniLM be on this CPU? An Amdahl bound for issue 7's latency goal.

Times, interleaved in one run at batch 32 x 128 tokens: the float32 MiniLM forward pass;
its 36 linear layers alone as float32 matmuls (same shapes, 4096 token rows); the same
matmuls as XLA's int8 x int8 -> int32 dot; and as the full dynamic W8A8 linear (per-token
quantize, int8 dot, rescale). If every non-linear part of the model (embeddings, attention
products, softmax, GELU, LayerNorm) kept its float time and the linears ran at the int8
time, the model would take ``T_model - T_linear_f32 + T_linear_int8``: a lower bound on any
W8A8 formulation that keeps the rest in float32.

    python experiments/minilm_latency_bound.py [--fast]

Writes ``experiments/results/minilm_latency_bound.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import time_interleaved

import qjax
from qjax.models import minilm

BATCH, SEQ = 32, 128
OUT = Path(__file__).resolve().parent / "results" / "minilm_latency_bound.md"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true")
    args = ap.parse_args(argv)
    model, variables, _tok = minilm.load_minilm()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 20000, (BATCH, SEQ)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": jnp.zeros_like(ids)}
    encode = jax.jit(lambda v, b: minilm.encode(model, v, b))

    flat = dict(qjax.rules.leaves_with_paths(variables))
    weights = [flat[p] for p in minilm.linear_paths()]
    rows = BATCH * SEQ
    xs = [jnp.asarray(rng.normal(size=(rows, w.shape[0])), jnp.float32) for w in weights]
    w8 = [jnp.asarray(rng.integers(-127, 128, w.shape), jnp.int8) for w in weights]
    x8 = [jnp.asarray(rng.integers(-127, 128, x.shape), jnp.int8) for x in xs]
    w8_scale = [jnp.full((1, w.shape[1]), 0.01, jnp.float32) for w in weights]
    spec = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)

    linear_f32 = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
    linear_i8 = jax.jit(
        lambda xs, ws: [jax.lax.dot(x, w, preferred_element_type=jnp.int32) for x, w in zip(xs, ws)]
    )

    def w8a8(xs, ws, ss):
        out = []
        for x, w, s in zip(xs, ws, ss):
            q = qjax.quantize(x, spec)
            acc = jax.lax.dot(q.values, w, preferred_element_type=jnp.int32)
            out.append(acc.astype(jnp.float32) * q.scale * s)
        return out

    w8a8 = jax.jit(w8a8)
    variants = {
        "float32 model": lambda: encode(variables, batch),
        "36 linears, float32": lambda: linear_f32(xs, weights),
        "36 linears, int8 dot only": lambda: linear_i8(x8, w8),
        "36 linears, W8A8 (quantize + int8 dot + rescale)": lambda: w8a8(xs, w8, w8_scale),
    }
    res = time_interleaved(
        variants, repeats=3 if args.fast else 7, target_s=0.3 if args.fast else 1.0, reference="float32 model"
    )
    t = {k: v["median_s"] for k, v in res.items()}
    model_t, lin = t["float32 model"], t["36 linears, float32"]
    bound_dot = (model_t - lin + t["36 linears, int8 dot only"]) / model_t
    bound_w8a8 = (model_t - lin + t["36 linears, W8A8 (quantize + int8 dot + rescale)"]) / model_t
    lines = [
        "# W8A8 MiniLM latency bound on this CPU",
        "",
        f"{datetime.datetime.now().isoformat(timespec='minutes')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}; batch {BATCH} x {SEQ} tokens; "
        "medians of interleaved samples.",
        "",
        "| what | ms | x float model |",
        "|---|---:|---:|",
        *(f"| {k} | {1e3 * v:.1f} | {v / model_t:.3f} |" for k, v in t.items()),
        "",
        f"- linear layers are {lin / model_t:.0%} of the float32 model's time;",
        f"- lower bound with int8 dots and everything else float32: {bound_dot:.2f}x float "
        f"({bound_w8a8:.2f}x with the per-token quantize and rescale);",
        f"- issue 7's goal is <= 0.33x float: {'reachable' if bound_dot <= 1 / 3 else 'NOT reachable'} "
        "this way on this CPU.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.fast:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
