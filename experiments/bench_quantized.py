"""qjax side by side with float32, Google's Qwix and AQT in one run (a benchmark, not a
test): inference latency and output error, training-step time, and trace / compile time.

The workloads, the timing (interleaved rounds, paired ratios to float32) and the checks
(``peers.check``: an integer dot / integer weights as each variant promises, nonzero
error) are ``bench_peers_baseline.py``'s; the qjax variants are registered by
``qjax_variants.py`` (see its docstring for their settings, which match the peers'):

* inference: ``qjax_w8a8``, ``qjax_w8a8_static``, ``qjax_w8``, ``qjax_w4``, ``qjax_w4g128``
  beside ``qwix_w8a8``, ``qwix_w8``, ``qwix_w4g128``, ``aqt_w8a8``; MLP at batch 1, 4, 16,
  256, the encoder block at batch 1 and 8 (seq 128);
* training (Adam step, MSE): ``qjax_qat_w8a8`` and ``qjax_int8_training`` beside
  ``qwix_qat_w8a8``, ``qwix_qt_int8`` and ``aqt_fqt_int8``; MLP batch 256, encoder batch 8;
* trace / lower / compile wall time of ``jax.jit(qjax.quantized(f, policy))`` against
  ``jax.jit(f)`` (and Qwix's PTQ model), measured first, before anything else in the
  process compiled a model (``first``), then as the median of fresh ``jax.jit`` wrappers.

Besides each variant's ratio to float32, inference rows carry ``x peer``: the paired
median ratio (same rounds) to the peer at the same settings (``qjax_variants.PEER_OF``),
and the peer's output error beside qjax's. The goals (``GOALS`` below) are evaluated at
the end and listed as met / missed.

Writes ``bench_quantized.json`` and ``.md`` (``_quick`` with ``--quick``) to ``--out``.

Usage::

    .venv/bin/python experiments/bench_quantized.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python experiments/bench_quantized.py --quick    # a smoke run (~1.5 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers_baseline as harness
import jax
import jax.numpy as jnp
import models
import peers
import qjax_variants

RESULTS = harness.RESULTS

QJAX_INFER = ["qjax_w8a8", "qjax_w8a8_static", "qjax_w8", "qjax_w4", "qjax_w4g128"]
COMPILE_VARIANTS = ["float32", "qjax_w8a8", "qjax_w8", "qjax_w4g128", "qwix_w8a8"]
COMPILE_MODELS = [("mlp", 16), ("encoder", 1)]

TOL = 0.05  # "on par" / "no slower": paired median within 5% (run-to-run noise is ~+-15%)
ERR_TOL = 0.02  # "no worse" output error: within 2% of the peer's
ERR_WORKLOADS = [("mlp", 1), ("mlp", 4)]  # errors also averaged over ERR_INPUTS inputs
ERR_INPUTS = 32
ERR_SEED = 300


# -- compile time -----------------------------------------------------------------------------


def _compile_once(spec: peers.InferSpec, x) -> dict[str, float]:
    """Trace, lower and compile a fresh jit of ``spec.apply`` (a new function object, so
    no jit cache is hit), in seconds."""
    fn = jax.jit(lambda s, x: spec.apply(s, x))
    t0 = time.perf_counter()
    traced = fn.trace(spec.state, x)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def bench_compile(repeats: int) -> list[dict[str, Any]]:
    jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) @ a)(jnp.ones((8, 8))))  # JAX's one-time set-up
    rows = []
    for model_name, batch in COMPILE_MODELS:
        wl = models.make_workload(model_name, batch)
        specs = {n: peers.INFER_VARIANTS[n].build(wl) for n in COMPILE_VARIANTS if n in peers.INFER_VARIANTS}
        first = {n: _compile_once(s, wl.x) for n, s in specs.items()}
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in specs}
        names = list(specs)
        for r in range(repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                samples[n].append(_compile_once(specs[n], wl.x))
        ref = samples["float32"]
        for n in names:
            med = {k: statistics.median(s[k] for s in samples[n]) for k in first[n]}
            ratio = statistics.median(a["total_s"] / b["total_s"] for a, b in zip(samples[n], ref))
            rows.append(
                {
                    "model": model_name,
                    "batch": batch,
                    "workload": wl.label,
                    "variant": n,
                    **{f"{k[:-2]}_ms": v * 1e3 for k, v in med.items()},
                    "first_total_ms": first[n]["total_s"] * 1e3,
                    "first": {k: v * 1e3 for k, v in first[n].items()},
                    "x_float": ratio,
                    "repeats": repeats,
                }
            )
            print(
                f"  [compile {wl.label}] {n}: trace {med['trace_s'] * 1e3:.0f} ms, lower "
                f"{med['lower_s'] * 1e3:.0f} ms, compile {med['compile_s'] * 1e3:.0f} ms "
                f"({ratio:.2f}x float); first {first[n]['total_s'] * 1e3:.0f} ms",
                flush=True,
            )
    return rows


# -- paired comparisons and goals ------------------------------------------------------------


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Median over rounds of a's sample / b's sample (same workload, same rounds)."""
    if not a or not b or "samples_ms" not in a or "samples_ms" not in b:
        return None
    return statistics.median(x / y for x, y in zip(a["samples_ms"], b["samples_ms"]))


def annotate(rows: list[dict[str, Any]]) -> None:
    """Adds ``peers`` = {peer: {x: paired latency ratio, err: the peer's error}} to qjax rows."""
    by = {(r["kind"], r["workload"], r["variant"]): r for r in rows}
    for r in rows:
        for peer in qjax_variants.PEER_OF.get(r["variant"], ()):
            p = by.get((r["kind"], r["workload"], peer))
            if p is None:
                continue
            r.setdefault("peers", {})[peer] = {"x": paired(r, p), "err": _err(p), "err_of": _err_of(p)}


def _err(r: dict[str, Any]) -> float | None:
    """The row's error: the mean over ``ERR_INPUTS`` inputs where measured, else the single
    timed input's (inference), or the gradient's (training)."""
    return r.get("rel_err_mean", r.get("rel_err", r.get("grad_rel_err")))


def _err_of(r: dict[str, Any]) -> str:
    if "rel_err_mean" in r:
        return f"mean of {r['rel_err_inputs']} inputs"
    return "timed input" if r["kind"] == "infer" else "first-step gradients"


def errors_over_inputs(rows: list[dict[str, Any]], n: int) -> None:
    """For the small-batch workloads (``ERR_WORKLOADS``), where one input's error is noisy
    (a single token), the mean relative output error over ``n`` other inputs of qjax's
    variants and their peers: ``rel_err_mean`` in their rows."""
    names = set(qjax_variants.INFER) | {p for ps in qjax_variants.PEER_OF.values() for p in ps}
    for model_name, batch in ERR_WORKLOADS:
        if not any(r["model"] == model_name and r["batch"] == batch for r in rows if r["kind"] == "infer"):
            continue
        wl = models.make_workload(model_name, batch)
        xs = [models.make_inputs(model_name, batch, seed=ERR_SEED + i) for i in range(n)]
        f = jax.jit(wl.model.apply)
        ys = [f(wl.variables, x) for x in xs]
        for r in rows:
            if (
                r["kind"] != "infer"
                or r["workload"] != wl.label
                or r["variant"] not in names
                or not r.get("ok")
            ):
                continue
            spec = peers.INFER_VARIANTS[r["variant"]].build(wl)
            g = jax.jit(spec.apply)
            r["rel_err_mean"] = statistics.mean(peers.rel_err(g(spec.state, x), y) for x, y in zip(xs, ys))
            r["rel_err_inputs"] = n


def _status(value: float | None, limit: float, tol: float = 0.0) -> str:
    if value is None:
        return "n/a"
    if value <= limit:
        return "met"
    if value <= limit * (1 + tol):
        return f"met within {tol:.0%} (noise)"
    return "MISSED"


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["kind"], r["workload"], r["variant"]): r for r in rows}
    out = []

    def add(goal, cell, value, target, status, note=""):
        out.append(
            {"goal": goal, "cell": cell, "value": value, "target": target, "status": status, "note": note}
        )

    infer_wls = list(dict.fromkeys(r["workload"] for r in rows if r["kind"] == "infer"))
    for wl in infer_wls:
        q = by.get(("infer", wl, "qjax_w8a8"))
        x = (q or {}).get("peers", {}).get("qwix_w8a8", {}).get("x")
        add("W8A8 latency on par with Qwix PTQ (qjax / qwix, paired)", wl, x, "<= 1.00", _status(x, 1.0, TOL))
    batch1 = [
        r["workload"] for r in rows if r["kind"] == "infer" and r["batch"] == 1 and r["variant"] == "float32"
    ]
    for wl in batch1:
        x = by.get(("infer", wl, "qjax_w8a8"), {}).get("x_float")
        add("W8A8 at batch 1 no slower than float32 (x float)", wl, x, "<= 1.00", _status(x, 1.0, TOL))
    for wl in batch1:
        for v in ("qjax_w4", "qjax_w4g128"):
            x = by.get(("infer", wl, v), {}).get("x_float")
            add(f"W4 at batch 1 at most 1.5x float32 ({v})", wl, x, "<= 1.50", _status(x, 1.5))
    for r in rows:
        if r["kind"] == "train" and r["variant"] == "qjax_qat_w8a8":
            x = r.get("x_float")
            qw = by.get(("train", r["workload"], "qwix_qat_w8a8"), {}).get("x_float")
            add(
                "QAT step at most 1.1x the float step",
                r["workload"],
                x,
                "<= 1.10",
                _status(x, 1.1),
                f"qwix_qat_w8a8 {qw:.2f}x" if qw else "",
            )
    for r in rows:
        if r["kind"] == "train" and r["variant"] == "qjax_int8_training":
            a = by.get(("train", r["workload"], "aqt_fqt_int8"), {}).get("x_float")
            x = r.get("x_float")
            if x is None or a is None:
                continue
            ov, aov = x - 1.0, a - 1.0
            add(
                "int8 training overhead well under AQT's (overhead <= half AQT's)",
                r["workload"],
                ov,
                f"<= {aov / 2:+.2f} (AQT {aov:+.2f})",
                "met" if ov <= aov / 2 else ("partly: under AQT's" if ov < aov else "MISSED"),
            )
    for r in rows:
        if r.get("library") != "qjax":
            continue
        mine = _err(r)
        for peer, info in r.get("peers", {}).items():
            if info["err"] is None or mine is None:
                continue
            what = "output" if r["kind"] == "infer" else "gradient"
            note = qjax_variants.NOT_SAME_NUMERICS.get((r["variant"], peer))
            add(
                f"{what} error no worse than the peer's ({r['variant']} vs {peer})",
                r["workload"],
                mine,
                f"<= {info['err']:.3e} (+{ERR_TOL:.0%})",
                "not judged (different numerics)" if note else _status(mine / info["err"], 1.0, ERR_TOL),
                note or info["err_of"],
            )
    return out


# -- report ------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.2e}" if spec == "e" else format(x, spec)
    return str(x)


def write_markdown(path: Path, meta: dict[str, Any], rows, compile_rows, goal_rows) -> None:
    desc = {n: v.description for reg in (peers.INFER_VARIANTS, peers.TRAIN_VARIANTS) for n, v in reg.items()}
    lines = [
        "# bench_quantized: qjax vs float32, Qwix and AQT (one run)",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']} ({meta['cpu']}), nproc {meta['nproc']}; "
        f"backend {meta['backend']}; python {meta['python']}",
        "- versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"; qjax at commit {meta['git']['commit']}"
        + (" (qjax/ had uncommitted changes)" if meta["git"]["qjax_dirty"] else ""),
        f"- load average (1 min) at start / end: {meta['loadavg_start']:.2f} / {meta['loadavg_end']:.2f}; "
        f"per workload: {meta['loadavg_min']:.2f}-{meta['loadavg_max']:.2f}; total run time "
        f"{meta['total_s']:.0f} s",
        f"- timing: bench_peers_baseline's: median of {meta['repeats']} interleaved rounds, each sample >= "
        f"{meta['target_ms']:.0f} ms of back-to-back calls after compile + warm-up; `x float` = median over "
        "rounds of variant / float32 sample of the same round; `x peer` = the same paired median against "
        "the peer at the same settings (`qwix_w8a8` for W8A8, `qwix_w8`, `qwix_w4g128`)",
        "- weights are jit arguments (never closed over); only weight matmuls are quantized; `dots` = dots "
        "in the compiled HLO by result type (`s32` = int8 x int8 -> int32); `ok` = peers.check",
    ]
    if max(meta["loadavg_start"], meta["loadavg_end"], meta["loadavg_max"]) > (meta["nproc"] or 1):
        lines.append(
            "- **the machine was shared during this run** (load average above the core count): "
            "absolute ms are inflated and noisy; the paired ratios are the robust numbers"
        )
    lines += [
        "",
        "## Goals",
        "",
        "| goal | cell | value | target | status | note |",
        "|---|---|---:|---|---|---|",
    ]
    for g in goal_rows:
        v = g["value"]
        vs = _f(v, "e") if "error" in g["goal"] else (f"{v:+.2f}" if "overhead" in g["goal"] else _f(v))
        lines.append(f"| {g['goal']} | {g['cell']} | {vs} | {g['target']} | {g['status']} | {g['note']} |")
    lines += [
        "",
        "## Inference: time per forward pass",
        "",
        "| workload | variant | ms/call | x float | x peer | rel err vs float | mean rel err, "
        f"{meta['err_inputs']} inputs | dots | state MB | ok |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r["kind"] != "infer":
            continue
        pk = next(iter(r.get("peers", {}).items()), None)
        xp = f"{pk[1]['x']:.2f} ({pk[0]})" if pk and pk[1]["x"] is not None else ""
        ok = "yes" if r.get("ok") else f"NO: {r.get('problems') or r.get('error')}"
        mb = r.get("state_bytes")
        lines.append(
            f"| {r['workload']} | {r['variant']} | {_f(r.get('ms'), '.3f')} | {_f(r.get('x_float'))} "
            f"| {xp} | "
            f"{_f(r.get('rel_err'), 'e')} | {_f(r.get('rel_err_mean'), 'e')} | "
            f"{harness._dots(r.get('dots'))} | "
            f"{_f(mb / 2**20 if mb else None)} | {ok} |"
        )
    lines += [
        "",
        "## Training: time per optimizer step (Adam, MSE loss)",
        "",
        "| workload | variant | ms/step | x float | loss rel err | grad rel err | dots | ok |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["kind"] != "train":
            continue
        ok = "yes" if r.get("ok") else f"NO: {r.get('problems') or r.get('error')}"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {_f(r.get('ms'), '.3f')} | {_f(r.get('x_float'))} | "
            f"{_f(r.get('loss_rel_err'), 'e')} | {_f(r.get('grad_rel_err'), 'e')} | "
            f"{harness._dots(r.get('dots'))} | {ok} |"
        )
    if compile_rows:
        n = compile_rows[0]["repeats"]
        lines += [
            "",
            "## Trace + compile time of `jax.jit(...)` (`.trace().lower().compile()`, wall)",
            "",
            f"Median of {n} fresh `jax.jit` wrappers per variant (interleaved); `x float` paired on the "
            "total; `first` = the first compile of that variant in this process (before any other model "
            "was compiled; qjax's per-op jitted kernels are then cold).",
            "",
            "| workload | variant | trace ms | lower ms | compile ms | total ms | x float | first total ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in compile_rows:
            lines.append(
                f"| {c['workload']} | {c['variant']} | {c['trace_ms']:.0f} | {c['lower_ms']:.0f} | "
                f"{c['compile_ms']:.0f} | {c['total_ms']:.0f} | {c['x_float']:.2f} "
                f"| {c['first_total_ms']:.0f} |"
            )
    lines += ["", "## Variants", ""]
    for name in dict.fromkeys(r["variant"] for r in rows):
        lines.append(f"- `{name}`: {desc.get(name, '')}")
    lines.append("")
    path.write_text("\n".join(lines))


def git_state() -> dict[str, Any]:
    """The commit the run measured and whether ``qjax/`` had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "qjax_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "qjax")),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few workloads and samples (smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--target-ms", type=float, default=None)
    ap.add_argument("--compile-repeats", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (float32 always runs)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    target_s = (args.target_ms or (20.0 if args.quick else 50.0)) / 1e3
    compile_repeats = args.compile_repeats or (2 if args.quick else 3)
    only = set(args.only) if args.only else None

    t_start = time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    loads = [os.getloadavg()[0]]
    print(f"inference variants: {list(peers.INFER_VARIANTS)}; training: {list(peers.TRAIN_VARIANTS)}")
    compile_rows = [] if args.no_compile else bench_compile(compile_repeats)
    rows: list[dict[str, Any]] = []
    workloads = [("infer", m, b) for m, b in (harness.QUICK_INFER if args.quick else harness.INFER_WORKLOADS)]
    if not args.no_train:
        workloads += [
            ("train", m, b) for m, b in (harness.QUICK_TRAIN if args.quick else harness.TRAIN_WORKLOADS)
        ]
    for kind, model_name, batch in workloads:
        registry = peers.INFER_VARIANTS if kind == "infer" else peers.TRAIN_VARIANTS
        wl_rows = harness.bench_workload(
            kind, model_name, batch, registry, only=only, repeats=repeats, target_s=target_s
        )
        loads.append(os.getloadavg()[0])
        for r in wl_rows:
            r["loadavg"] = loads[-1]
        rows += wl_rows
    errors_over_inputs(rows, 4 if args.quick else ERR_INPUTS)
    annotate(rows)
    goal_rows = goals(rows)
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    meta = {
        "date": started,
        "machine": platform.machine(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "versions": peers.library_versions(),
        "repeats": repeats,
        "target_ms": target_s * 1e3,
        "compile_repeats": compile_repeats,
        "quick": args.quick,
        "loadavg_start": loads[0],
        "loadavg_end": os.getloadavg()[0],
        "loadavg_min": min(loads),
        "loadavg_max": max(loads),
        "loadavg_per_workload": loads[1:],
        "total_s": time.perf_counter() - t_start,
        "git": git_state(),
        "err_inputs": 4 if args.quick else ERR_INPUTS,
        "tolerances": {"latency": TOL, "error": ERR_TOL},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quantized_quick" if args.quick else "bench_quantized"
    payload = {"meta": meta, "goals": goal_rows, "rows": rows, "compile": compile_rows}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    write_markdown(args.out / f"{stem}.md", meta, rows, compile_rows, goal_rows)
    failed = [f"{r['workload']}/{r['variant']}" for r in rows if not r.get("ok")]
    missed = [f"{g['goal']} [{g['cell']}]" for g in goal_rows if g["status"] == "MISSED"]
    print(f"wrote {args.out / stem}.json/.md in {meta['total_s']:.0f} s; failed checks: {failed or 'none'}")
    print("missed goals:\n  " + "\n  ".join(missed) if missed else "all goals met")


if __name__ == "__main__":
    main()
