"""Side-by-side baseline: float32 vs. Google's Qwix and AQT quantized execution (a
benchmark, not a test).

Inference (``peers.INFER_VARIANTS``): the 1024-wide 3-layer MLP at batch 1, 4, 16, 256 and
the MiniLM-shaped encoder block (d_model 384, 6 heads, MLP 1536) at batch 1 and 8, seq 128.
Training (``peers.TRAIN_VARIANTS``): one optax Adam step (MSE loss) of the MLP at batch
256 and of the encoder block at batch 8, for the float step and each quantized-training
variant. See ``peers.py`` for what each variant is and ``models.py`` for the models.

For every (workload, variant) the run records:

* ``ms`` per call and ``x float``: median over rounds of (variant sample / float32 sample
  of the same round), a paired ratio robust to drifting machine load;
* inference: ``rel_err`` = ||y_q - y|| / ||y|| against float32 on the same input;
  training: the relative error of the first step's loss and of its gradients (global
  norm over the param tree) against the float32 step;
* the dots in the compiled HLO by accumulator type (``s32`` = int8 x int8 integer dot) and
  the bytes of the state (quantized weights) each call reads;
* ``ok``: the checks of ``peers.check`` (not silently float: nonzero error, an integer dot
  or integer weights as the variant promises, AQT reading its frozen int8 weights).

Timing: each variant is compiled and warmed up; a sample runs it ``inner`` times back to
back (enough calls for ``--target-ms``), blocking on every result; the variants of one
workload are interleaved in rotating order for ``--repeats`` rounds; medians are reported.
Each call passes the weights as arguments (nothing closed over, so no constant folding).

More variants (qjax's) join by registering with ``peers.register_variant`` in a module
that ``--extra-module`` imports (a dotted name or a path to a ``.py`` file); they are then
timed and checked like the peers, in the same interleaved rounds.

Writes ``bench_peers_baseline.json`` and ``.md`` (``_quick`` with ``--quick``) to ``--out``
(default ``experiments/results``).

Usage::

    .venv/bin/python experiments/bench_peers_baseline.py           # ~3-5 minutes, 2 CPU cores
    .venv/bin/python experiments/bench_peers_baseline.py --quick   # a smoke test
    .venv/bin/python experiments/bench_peers_baseline.py --extra-module experiments/qjax_variants.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import models
import peers
from timing import time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"

INFER_WORKLOADS = [("mlp", 1), ("mlp", 4), ("mlp", 16), ("mlp", 256), ("encoder", 1), ("encoder", 8)]
TRAIN_WORKLOADS = [("mlp", 256), ("encoder", 8)]
QUICK_INFER = [("mlp", 1), ("mlp", 256), ("encoder", 1)]
QUICK_TRAIN = [("mlp", 256)]

# What the issue reports for Qwix / AQT on this kind of 2-core CPU (x float32 time).
ISSUE_REFERENCE = {
    ("infer", "mlp", 256, "qwix_w8a8"): 0.19,
    ("infer", "mlp", 16, "qwix_w8a8"): 0.33,
    ("infer", "mlp", 1, "qwix_w8a8"): 2.1,
    ("infer", "mlp", 1, "qwix_w8"): 1.9,
    ("infer", "mlp", 1, "qwix_w4g128"): 4.1,
    ("train", "mlp", 256, "qwix_qat_w8a8"): 1.02,
    ("train", "mlp", 256, "aqt_fqt_int8"): 4.2,
}


# -- one workload ---------------------------------------------------------------------------


def bench_workload(
    kind: str,
    model_name: str,
    batch: int,
    registry: dict[str, peers.Variant],
    *,
    only: set[str] | None,
    repeats: int,
    target_s: float,
) -> list[dict[str, Any]]:
    wl = models.make_workload(model_name, batch)
    ref = peers.prepare(registry["float32"], wl)
    prepared: dict[str, peers.Prepared] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, v in registry.items():
        if model_name not in v.model_names or (only and name not in only and name != "float32"):
            continue
        row: dict[str, Any] = {"kind": kind, "model": model_name, "batch": batch, "workload": wl.label}
        t0 = time.perf_counter()
        try:
            p = ref if name == "float32" else peers.prepare(v, wl)
            row.update(peers.check(p, wl, ref))
            prepared[name] = p
        except Exception as e:  # a broken variant is recorded, the run goes on
            row.update(
                variant=name,
                library=v.library,
                ok=False,
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc(limit=4),
            )
        row["build_and_check_s"] = round(time.perf_counter() - t0, 2)
        rows[name] = row
        status = "ok" if row.get("ok") else f"FAILED {row.get('problems') or row.get('error')}"
        err = row.get("rel_err", row.get("grad_rel_err"))
        print(f"  [{wl.label}] {name}: {status}; err {err}", flush=True)
    fns = {name: (lambda p=p: p.fn(*p.args)) for name, p in prepared.items()}
    timings = time_interleaved(fns, repeats=repeats, target_s=target_s, reference="float32")
    for name, t in timings.items():
        rows[name].update(
            ms=t["median_s"] * 1e3,
            ms_min=t["min_s"] * 1e3,
            x_float=t["ratio"],
            inner=t["inner"],
            samples_ms=[s * 1e3 for s in t["samples_s"]],
        )
        ref_x = ISSUE_REFERENCE.get((kind, model_name, batch, name))
        if ref_x is not None:
            rows[name]["issue_x_float"] = ref_x
    line = ", ".join(f"{n} {r['x_float']:.2f}x" for n, r in rows.items() if "x_float" in r)
    print(f"  [{wl.label}] {line}", flush=True)
    return list(rows.values())


# -- report ---------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if spec == "e":
            return f"{x:.2e}"
        return format(x, spec)
    return str(x)


def _dots(d: dict[str, int] | None) -> str:
    if not d:
        return ""
    return " ".join(f"{k}:{v}" for k, v in sorted(d.items()) if v and k != "onednn_matmul")


def write_markdown(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    registries = (peers.INFER_VARIANTS, peers.TRAIN_VARIANTS)
    desc = {name: v.description for reg in registries for name, v in reg.items()}
    lines = [
        "# bench_peers_baseline",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; cpu count (nproc): {meta['nproc']}; "
        f"backend: {meta['backend']}; python {meta['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- load average (1 min) at start / end: {meta['loadavg_start']:.2f} / {meta['loadavg_end']:.2f}; "
        f"total run time {meta['total_s']:.0f} s",
        f"- timing: median of {meta['repeats']} interleaved samples per variant, each sample >= "
        f"{meta['target_ms']:.0f} ms of back-to-back calls (each blocked on), after compile and warm-up; "
        "`x float` is paired: the median over rounds of the variant's sample / the float32 sample of the "
        "same round",
        "- weights are jit arguments (never closed over); only weight matmuls are quantized (the "
        "attention-score / attention-value einsums stay float in every variant)",
        "- `dots`: dots in the compiled HLO by result type (`s32` = integer int8 x int8 dot); `state MB`: "
        "bytes of the arrays each inference call reads as weights (AQT's also carries the unused float "
        "kernels, which XLA drops: `ok` includes a check that zeroing them changes nothing)",
        "- `issue`: the ratio the issue reports for the same cell",
    ]
    if max(meta["loadavg_start"], meta["loadavg_end"]) > (meta["nproc"] or 1):
        lines.append(
            "- **the machine was shared during this run** (load average above the core count): absolute "
            "ms are inflated and noisy; the paired `x float` ratios are the robust numbers"
        )
    lines += [
        "",
        "## Inference: time per forward pass",
        "",
        "| workload | variant | ms/call | x float | issue | rel err vs float | dots | state MB | ok |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r["kind"] != "infer":
            continue
        ok = "yes" if r.get("ok") else f"NO: {r.get('problems') or r.get('error')}"
        mb = r.get("state_bytes")
        lines.append(
            f"| {r['workload']} | {r['variant']} | {_fmt(r.get('ms'))} | {_fmt(r.get('x_float'), '.2f')} | "
            f"{_fmt(r.get('issue_x_float'), '.2f')} | {_fmt(r.get('rel_err'), 'e')} | "
            f"{_dots(r.get('dots'))} | {_fmt(mb / 2**20 if mb else None, '.2f')} | {ok} |"
        )
    lines += [
        "",
        "## Training: time per optimizer step (Adam, MSE loss)",
        "",
        "| workload | variant | ms/step | x float | issue | loss rel err | grad rel err | dots | ok |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["kind"] != "train":
            continue
        ok = "yes" if r.get("ok") else f"NO: {r.get('problems') or r.get('error')}"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {_fmt(r.get('ms'))} | {_fmt(r.get('x_float'), '.2f')} | "
            f"{_fmt(r.get('issue_x_float'), '.2f')} | {_fmt(r.get('loss_rel_err'), 'e')} | "
            f"{_fmt(r.get('grad_rel_err'), 'e')} | {_dots(r.get('dots'))} | {ok} |"
        )
    lines += ["", "## Variants", ""]
    for name in dict.fromkeys(r["variant"] for r in rows):
        lines.append(f"- `{name}`: {desc.get(name, '')}")
    lines.append("")
    path.write_text("\n".join(lines))


def import_extra(spec: str) -> None:
    """Imports a module that registers more variants: a dotted name or a ``.py`` path."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few workloads and samples (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--target-ms", type=float, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (float32 always runs)")
    ap.add_argument(
        "--extra-module",
        action="append",
        default=[],
        help="module (dotted name or .py path) registering more variants; repeatable",
    )
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for spec in args.extra_module:
        import_extra(spec)
    repeats = args.repeats or (5 if args.quick else 15)
    target_s = (args.target_ms or (20.0 if args.quick else 50.0)) / 1e3
    only = set(args.only) if args.only else None

    t_start = time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    print(f"inference variants: {list(peers.INFER_VARIANTS)}; training: {list(peers.TRAIN_VARIANTS)}")
    for model_name, batch in QUICK_INFER if args.quick else INFER_WORKLOADS:
        rows += bench_workload(
            "infer", model_name, batch, peers.INFER_VARIANTS, only=only, repeats=repeats, target_s=target_s
        )
    if not args.no_train:
        for model_name, batch in QUICK_TRAIN if args.quick else TRAIN_WORKLOADS:
            rows += bench_workload(
                "train",
                model_name,
                batch,
                peers.TRAIN_VARIANTS,
                only=only,
                repeats=repeats,
                target_s=target_s,
            )
    meta = {
        "date": started,
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "versions": peers.library_versions(),
        "repeats": repeats,
        "target_ms": target_s * 1e3,
        "quick": args.quick,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "total_s": time.perf_counter() - t_start,
        "issue_reference": {"/".join(map(str, k)): v for k, v in ISSUE_REFERENCE.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_peers_baseline_quick" if args.quick else "bench_peers_baseline"
    payload = json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)
    (args.out / f"{stem}.json").write_text(payload)
    write_markdown(args.out / f"{stem}.md", meta, rows)
    failed = [f"{r['workload']}/{r['variant']}" for r in rows if not r.get("ok")]
    print(f"wrote {args.out / stem}.json/.md in {meta['total_s']:.0f} s; failed checks: {failed or 'none'}")


if __name__ == "__main__":
    main()
