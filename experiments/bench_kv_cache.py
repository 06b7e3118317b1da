"""A KV cache stored as codes (``qjax.KVCache``): a benchmark, not a test.

One decode step (one new query token per sequence, grouped-query attention) over a cache
of ``length`` tokens, timed on the local backend:

* ``bf16 cache`` / ``f32 cache``: a float cache read by ``jax.nn.dot_product_attention``
  (XLA's implementation), the reference of the ratios;
* ``int8/token``: ``KVCache`` with one int8 scale per token and head;
* ``int8/token, int8 q``: the same with the query quantized per token too, so ``q Kᵀ`` is
  int8 x int8 -> int32;
* ``int8/token, int8 q, uint8 p``: the attention weights quantized too (uint8, one scale
  per query row), so ``P V`` is an integer matmul as well;
* ``int8 k/channel, v/token``: keys with a static per-(head, channel) scale calibrated
  on other keys of the same distribution, values per token;
* ``... own range``: the same, the scales taken from the cached keys themselves (no
  clipping: the error of the granularity alone, an upper bound for static scales);
* ``int4/g32``: int4 codes packed two per byte, a scale per token, head and 32 channels;
* ``int4 k/channel, v/g32``: int4 keys with static asymmetric per-channel scales, int4
  values per token and 32 channels;
* ``int4 KIVI`` / ``int2 KIVI``: keys with asymmetric per-channel scales over blocks of
  32 tokens (computed as the blocks fill, no calibration), values asymmetric per token
  in groups of 32 channels (KIVI's layout);
* ``fp8/token``: fp8 e4m3 codes, a scale per token and head.

Keys get a few outlier channels (x10), as real models' keys have. Each variant's error is
``max |y - y64| / max |y64|`` against float64 attention over the unquantized float32 cache
(so the float caches show their own rounding). Bytes: the cache's keys and values with
scales. Timing: ``timing.time_interleaved`` (interleaved rounds, paired ratios to the
bf16 cache). Writes ``bench_kv_cache.json`` and ``.md`` to ``--out``.

Usage::

    .venv/bin/python experiments/bench_kv_cache.py           # ~2 minutes on 2 cores
    .venv/bin/python experiments/bench_kv_cache.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from report import write
from timing import rel_err, report_header, time_interleaved

import qjax

RESULTS = Path(__file__).resolve().parent / "results"
PER_TOKEN = dict(channel_axes=qjax.PER_TOKEN)
INT8_TOKEN = qjax.QuantSpec(qjax.int8, **PER_TOKEN)
INT4_G32 = qjax.QuantSpec(qjax.int4, channel_axes=(0, 1, 2), group_size=32, group_axis=3)
INT8_CHANNEL = qjax.QuantSpec(qjax.int8, channel_axes=(2, 3))  # static, calibrated
INT4_CHANNEL = qjax.QuantSpec(qjax.int4, channel_axes=(2, 3), symmetric=False)
# KIVI: keys per channel over blocks of 32 tokens, values per token in groups of 32 channels
KIVI_K = {
    bits: qjax.QuantSpec(bits, channel_axes=(0, 2, 3), group_size=32, group_axis=1, symmetric=False)
    for bits in (qjax.int4, qjax.int2)
}
KIVI_V = {
    bits: qjax.QuantSpec(bits, channel_axes=(0, 1, 2), group_size=32, group_axis=3, symmetric=False)
    for bits in (qjax.int4, qjax.int2)
}
U8_ROWS = qjax.QuantSpec(qjax.uint8, **PER_TOKEN)  # attention weights: one scale per query row
# name: (key spec, value spec, query spec[, weights spec])
CACHES = {
    "int8/token": (INT8_TOKEN, INT8_TOKEN, None),
    "int8/token, int8 q": (INT8_TOKEN, INT8_TOKEN, INT8_TOKEN),
    "int8/token, int8 q, uint8 p": (INT8_TOKEN, INT8_TOKEN, INT8_TOKEN, U8_ROWS),
    "int8 k/channel, v/token": (INT8_CHANNEL, INT8_TOKEN, None),
    "int8 k/channel own range, v/token": (INT8_CHANNEL, INT8_TOKEN, None),
    "int4/g32": (INT4_G32, INT4_G32, None),
    "int4 k/channel, v/g32": (INT4_CHANNEL, INT4_G32, None),
    "int4 k/channel own range, v/g32": (INT4_CHANNEL, INT4_G32, None),
    "int4 KIVI (k/channel-block32, v/g32)": (KIVI_K[qjax.int4], KIVI_V[qjax.int4], None),
    "int2 KIVI (k/channel-block32, v/g32)": (KIVI_K[qjax.int2], KIVI_V[qjax.int2], None),
    "fp8/token": (
        qjax.QuantSpec(qjax.fp8_e4m3, **PER_TOKEN),
        qjax.QuantSpec(qjax.fp8_e4m3, **PER_TOKEN),
        None,
    ),
}
FLOATS = {"bf16 cache": jnp.bfloat16, "f32 cache": jnp.float32}


def reference(q, k, v, index) -> np.ndarray:
    """float64 decode attention (one query token): query head j reads kv head j // group."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, _, hq, d = q.shape
    group = hq // k.shape[2]
    kk = np.repeat(k, group, axis=2)  # (B, T, Hq, D)
    vv = np.repeat(v, group, axis=2)
    logits = np.einsum("bhd,bthd->bht", q[:, 0], kk) / np.sqrt(d)
    logits = np.where(np.arange(k.shape[1])[None, None] <= np.asarray(index)[:, None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bht,bthd->bhd", p, vv)[:, None]


def run_case(batch, length, heads, q_heads, head_dim, repeats, target_s) -> dict:
    rng = np.random.default_rng(0)
    channel = np.ones(head_dim)
    channel[rng.choice(head_dim, 4, replace=False)] = 10.0  # outlier key channels
    k = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)) * channel, jnp.float32)
    # static per-channel key scales come from other keys of the same distribution (calibration)
    k_calib = jnp.asarray(rng.normal(size=(4, 256, heads, head_dim)) * channel, jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(batch, 1, q_heads, head_dim)), jnp.float32)
    index = jnp.full((batch,), length - 1, jnp.int32)  # the last position: reads the whole cache
    visible = (jnp.arange(length)[None, :] <= index[:, None])[:, None, None, :]  # (B, 1, 1, T)

    fns, nbytes = {}, {}
    for name, dtype in FLOATS.items():
        kc, vc, qc = k.astype(dtype), v.astype(dtype), q.astype(dtype)
        step = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=visible, implementation="xla")
        )
        fns[name] = lambda step=step, qc=qc, kc=kc, vc=vc: step(qc, kc, vc)
        nbytes[name] = 2 * k.size * jnp.dtype(dtype).itemsize
    q_bf16 = q.astype(jnp.bfloat16)
    for name, (k_spec, v_spec, q_spec, *p_spec) in CACHES.items():
        static = {}
        if k_spec.channel_axes == (2, 3):
            sample = k if "own range" in name else k_calib
            static["k_scale"], static["k_zero_point"] = qjax.compute_scale(sample, k_spec)
        cache = qjax.KVCache.init(
            k_spec, value_spec=v_spec, batch=batch, length=length, heads=heads, head_dim=head_dim, **static
        )
        cache = jax.jit(lambda c, k, v: c.update(k, v, 0))(cache, k, v)
        p_spec = p_spec[0] if p_spec else None
        step = jax.jit(
            lambda c, q, q_spec=q_spec, p_spec=p_spec: c.attend(q, index, q_spec=q_spec, p_spec=p_spec)
        )
        fns[name] = lambda step=step, cache=cache: step(cache, q_bf16)
        nbytes[name] = cache.nbytes
    want = reference(q, k, v, index)
    outs = {name: fn() for name, fn in fns.items()}
    timed = time_interleaved(fns, repeats=repeats, target_s=target_s, reference="bf16 cache")
    return {
        "batch": batch,
        "length": length,
        "heads": heads,
        "q_heads": q_heads,
        "head_dim": head_dim,
        "variants": {
            name: {
                "median_us": t["median_s"] * 1e6,
                "x_bf16": t["ratio"],
                "bytes": nbytes[name],
                "bytes_x_bf16": nbytes[name] / nbytes["bf16 cache"],
                "rel_err": rel_err(outs[name], want),
            }
            for name, t in timed.items()
        },
    }


def markdown(report: dict) -> str:
    names = [*FLOATS, *CACHES]
    lines = [
        f"# KV cache stored as codes, one decode step ({report['date']}, {report['machine']}, "
        f"{report['device']}, jax {report['jax']})",
        "",
        "Per case: median µs per step, in brackets the paired ratio to the bf16 cache (below 1: "
        "faster); cache bytes as a fraction of the bf16 cache; err = max |y - y64| / max |y64| "
        "against float64 attention over the float32 cache.",
        "",
        "| batch × length (kv heads / q heads × head_dim) | variant | µs (× bf16) | bytes × bf16 | err |",
        "|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        head = f"{c['batch']}×{c['length']} ({c['heads']}/{c['q_heads']}×{c['head_dim']})"
        for n in names:
            v = c["variants"][n]
            lines.append(
                f"| {head} | {n} | {v['median_us']:.0f} ({v['x_bf16']:.2f}) | {v['bytes_x_bf16']:.3f} | "
                f"{v['rel_err']:.1e} |"
            )
            head = ""
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cases", default="1x4096,8x1024,8x4096", help="batch x cache length")
    p.add_argument("--heads", type=int, default=8, help="key/value heads")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few rounds")
    args = p.parse_args(argv)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    heads, q_heads, head_dim, repeats, target = args.heads, args.q_heads, args.head_dim, 7, 0.2
    if args.quick:
        cases, heads, q_heads, head_dim, repeats, target = [(2, 64)], 2, 4, 32, 2, 0.01
    report = {**report_header(), "cases": []}
    for batch, length in cases:
        case = run_case(batch, length, heads, q_heads, head_dim, repeats, target)
        print(
            batch,
            length,
            {k: (round(v["median_us"]), round(v["x_bf16"], 2)) for k, v in case["variants"].items()},
        )
        report["cases"].append(case)  # written after each case: a run cut short keeps what it measured
        write("bench_kv_cache" + ("_quick" if args.quick else ""), report, markdown(report), Path(args.out))


if __name__ == "__main__":
    main()
