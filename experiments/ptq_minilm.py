"""Post-training quantization of the real all-MiniLM-L6-v2 sentence encoder.

Float vs W8A8 (dynamic per-token and static calibrated activations, with/without
SmoothQuant), W8A16, W4A16 g128 (RTN with absmax / percentile / MSE clipping, GPTQ, AWQ),
W3A16 g128 GPTQ, and Qwix PTQ on the same model and sentences. Only the 36 linear layers
are quantized (embeddings, LayerNorms, attention score/value products stay float).

Metrics against the float model's embeddings of ``experiments/data/sentences.txt``
(every 3rd sentence is held out for calibration, the rest are evaluated): mean and
minimum cosine similarity, Spearman correlation of the pairwise-similarity matrices
(upper triangles), model bytes (all params), CPU latency vs float for batch 32 x 128
tokens (interleaved paired timing, ``experiments/timing.py``), and the time each
quantization method took.

Run: ``.venv/bin/python experiments/ptq_minilm.py [--fast]``; writes
experiments/results/ptq_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from report import machine, write
from scipy.stats import spearmanr
from timing import time_interleaved

import qjax
from qjax.models import load_minilm, tokenize
from qjax.quant.gptq import gptq

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
KERNELS = r"params/layer_\d+/.*/kernel"
BATCH, SEQ = 32, 128


def w_spec(fmt, group: int | None = None, calibration=None) -> qjax.QuantSpec:
    kw: dict[str, Any] = {"channel_axes": (-1,)}
    if group is not None:
        kw.update(group_size=group, group_axis=0)
    if calibration is not None:
        kw["calibration"] = calibration
    return qjax.QuantSpec(fmt, **kw)


def policy(weight: qjax.QuantSpec, act: qjax.QuantSpec | None = None) -> qjax.Policy:
    return qjax.Policy([qjax.Rule(KERNELS, weight=weight, act=act)])


def asym_spec(fmt, group: int) -> qjax.QuantSpec:
    """Asymmetric min-max groups (GPTQ's reference setting: 16 levels with a zero point)."""
    return qjax.QuantSpec(
        fmt,
        channel_axes=(-1,),
        group_size=group,
        group_axis=0,
        symmetric=False,
        calibration=qjax.calib.minmax(),
    )


SQ_ALPHA = 0.5
GPTQ_DAMP = 0.1  # ~1k calibration tokens: the Hessians of the 1536-wide layers are rank-deficient
DYNAMIC = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
STATIC = qjax.QuantSpec(qjax.int8, calibration=qjax.calib.percentile(99.99))


def batches(tok, sentences: list[str], size: int, padding: str = "longest") -> list[tuple]:
    out = []
    for i in range(0, len(sentences), size):
        b = tokenize(tok, sentences[i : i + size], max_length=SEQ, padding=padding)
        out.append(tuple(jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    return out


def sentence_split(tok, fast: bool) -> tuple[list[str], list[str], list[tuple], list[tuple]]:
    """``(calibration sentences, evaluation sentences, their batches)``: every 3rd sentence
    calibrates (batches of 16), the rest are evaluated (batches of 32)."""
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib_s = sentences[::3]
    eval_s = [s for i, s in enumerate(sentences) if i % 3]
    if fast:
        calib_s, eval_s = calib_s[:8], eval_s[:16]
    return calib_s, eval_s, batches(tok, calib_s, 16), batches(tok, eval_s, 32)


def embed(apply: Callable, params: Any, data: list[tuple]) -> np.ndarray:
    fn = jax.jit(apply)
    return np.concatenate([np.asarray(fn(params, *b)) for b in data])


def metrics(emb: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = np.sum(emb * ref, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
    iu = np.triu_indices(len(ref), 1)
    rho = spearmanr((emb @ emb.T)[iu], (ref @ ref.T)[iu]).statistic
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": float(rho)}


def nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree, is_leaf=qjax.is_qarray)))


def qjax_variants(model, variables, calib: list[tuple], fast: bool) -> dict[str, tuple]:
    """``{name: (apply, params, seconds)}``; apply(params, ids, mask, types)."""
    out: dict[str, tuple] = {"float": (model.apply, variables, 0.0)}

    def add(name, pol, make):
        t = time.perf_counter()
        qp = jax.block_until_ready(make())
        out[name] = (qjax.quantized(model.apply, pol), qp, time.perf_counter() - t)

    p = policy(w_spec(qjax.int8), DYNAMIC)
    add("W8A8 dynamic", p, lambda: qjax.quantize_params(variables, p))
    ps = policy(w_spec(qjax.int8), STATIC)
    add(
        "W8A8 static",
        ps,
        lambda: qjax.quantize_params(
            variables, ps, act_stats=qjax.calibrate(model.apply, ps, variables, calib)
        ),
    )
    for name, pol, foldable in [
        ("W8A8 dynamic + SmoothQuant", p, False),
        ("W8A8 static + SmoothQuant", ps, False),
        ("W8A8 static + SmoothQuant (folded only)", ps, True),
    ]:
        t = time.perf_counter()
        sm, runtime = qjax.smoothquant(
            model.apply, variables, calib, alpha=SQ_ALPHA, patterns=KERNELS, foldable_only=foldable
        )
        fs = qjax.with_input_scales(model.apply, runtime)
        stats = qjax.calibrate(fs, pol, sm, calib) if pol is ps else None
        qp = jax.block_until_ready(qjax.quantize_params(sm, pol, act_stats=stats))
        out[name] = (qjax.quantized(fs, pol), qp, time.perf_counter() - t)
    p8 = policy(w_spec(qjax.int8))
    add("W8A16", p8, lambda: qjax.quantize_params(variables, p8))
    for cal_name, cal in [
        ("absmax", None),
        ("percentile", qjax.calib.percentile(99.9)),
        ("mse", qjax.calib.mse()),
    ]:
        p4 = policy(w_spec(qjax.int4, 128, cal))
        add(f"W4A16 g128 RTN {cal_name}", p4, lambda p4=p4: qjax.quantize_params(variables, p4))
    for bits, sym_fmt, asym_fmt in [(4, qjax.int4, qjax.uint4), (3, qjax.int3, qjax.uint3)]:
        sym = policy(w_spec(sym_fmt, 128))
        asym = policy(asym_spec(asym_fmt, 128))
        add(f"W{bits}A16 g128 RTN asym", asym, lambda asym=asym: qjax.quantize_params(variables, asym))
        add(f"W{bits}A16 g128 GPTQ", sym, lambda sym=sym: gptq(model.apply, variables, calib, sym))
        add(
            f"W{bits}A16 g128 GPTQ asym act-order",
            asym,
            lambda asym=asym: gptq(model.apply, variables, calib, asym, act_order=True, damp=GPTQ_DAMP),
        )
        for label, pol, clip in [("AWQ", sym, False), ("AWQ asym + clip", asym, True)]:
            t = time.perf_counter()
            qp, runtime = qjax.awq(model.apply, variables, calib, pol, clip=clip)
            qp = jax.block_until_ready(qp)
            apply = qjax.quantized(qjax.with_input_scales(model.apply, runtime), pol)
            out[f"W{bits}A16 g128 {label}"] = (apply, qp, time.perf_counter() - t)
    return out


def qwix_variants(model, variables, example: tuple) -> dict[str, tuple]:
    try:
        import qwix
    except ImportError:
        return {}
    out = {}
    for name, quant in [
        ("Qwix W8A8 dynamic", dict(weight_qtype="int8", act_qtype="int8")),
        ("Qwix W8A16", dict(weight_qtype="int8")),
        ("Qwix W4A16 g128 RTN", dict(weight_qtype="int4", tile_size=128)),
    ]:
        t = time.perf_counter()
        rules = [
            qwix.QuantizationRule(module_path=r".*/attention"),  # q·kᵀ and probs·v: activations only
            qwix.QuantizationRule(module_path=r".*layer_\d+/.*", **quant),
        ]
        qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
        abstract = jax.eval_shape(qmodel.init, jax.random.key(0), *example)["params"]
        qparams = qwix.quantize_params(variables["params"], abstract)
        out[name] = (lambda p, *a, qm=qmodel: qm.apply({"params": p}, *a), qparams, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="few sentences, short timing (smoke test)")
    args = ap.parse_args()
    model, variables, tok = load_minilm()
    calib_s, eval_s, calib, data = sentence_split(tok, args.fast)
    ref = embed(model.apply, variables, data)
    variants = qjax_variants(model, variables, calib, args.fast)
    variants.update(qwix_variants(model, variables, data[0]))

    rows: dict[str, dict] = {}
    for name, (apply, params, seconds) in variants.items():
        emb = embed(apply, params, data)
        rows[name] = {**metrics(emb, ref), "bytes": nbytes(params), "quantize_s": round(seconds, 2)}
        print(f"{name:28s} {rows[name]}", flush=True)

    # Latency, batch 32 x 128 tokens, paired interleaved timing against float.
    bench = batches(tok, (eval_s * 4)[:BATCH], BATCH, padding="max_length")[0]
    timed = {}
    for name in [
        "float",
        "W8A8 dynamic",
        "W8A8 static",
        "W8A16",
        "W4A16 g128 GPTQ asym act-order",
        "Qwix W8A8 dynamic",
        "Qwix W8A16",
        "Qwix W4A16 g128 RTN",
    ]:
        if name in variants:
            apply, params, _ = variants[name]
            fn = jax.jit(apply)
            timed[name] = lambda fn=fn, params=params: fn(params, *bench)
    lat = time_interleaved(
        timed, repeats=3 if args.fast else 7, target_s=0.3 if args.fast else 1.0, reference="float"
    )
    for name, r in lat.items():
        rows[name]["latency_ms"] = round(1e3 * r["median_s"], 1)
        rows[name]["latency_vs_float"] = round(r["ratio"], 3)

    md = markdown(rows, machine(), len(eval_s), len(calib_s))
    print(md)
    if not args.fast:
        write(
            "ptq_minilm",
            {
                "machine": machine(),
                "rows": rows,
                "eval_sentences": len(eval_s),
                "calib_sentences": len(calib_s),
            },
            md,
        )


def markdown(rows: dict, mach: dict, n_eval: int, n_calib: int) -> str:
    fb = rows["float"]["bytes"]
    lines = [
        "# PTQ of all-MiniLM-L6-v2 (real weights)",
        "",
        f"{mach['date']}, {mach['processor']}, {mach['cpu_count']} cores, jax {mach['jax']}. "
        f"{n_eval} evaluation sentences, {n_calib} calibration sentences; latency: batch {BATCH} x "
        f"{SEQ} tokens, median of interleaved samples, ratio paired against float in the same run.",
        "",
        "| variant | mean cos | min cos | Spearman (pairwise sims) | bytes (× smaller) "
        "| latency ms (vs float) | quantize s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lat = f"{r['latency_ms']} ({r['latency_vs_float']:.2f}×)" if "latency_ms" in r else ""
        lines.append(
            f"| {name} | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | {r['spearman']:.5f} | "
            f"{r['bytes']:,} ({fb / r['bytes']:.2f}×) | {lat} | {r['quantize_s']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
