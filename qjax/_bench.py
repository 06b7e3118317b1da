"""``qjax bench``: run the benchmark scripts of ``experiments/`` that apply on this
machine, each in its own process, and collect what they report.

Each benchmark writes its own tables to ``experiments/results/``, or to ``--out DIR`` when
given (passed on to every script, so a run outside the checkout's results leaves them
untouched); ``qjax bench`` records, per benchmark, whether it ran (or why it was skipped),
its exit status, its duration, the result files it wrote and the tail of its output, in
``bench_summary.md`` and ``bench_summary.json`` beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qjax._cli_common import CLIError, prepare_out, seconds_arg


def _has(*modules: str) -> Callable[[], str | None]:
    def check():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)} (pip install qjax[peers])" if missing else None

    return check


def _always() -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One script of ``experiments/``: its arguments (full and ``--quick``), a check that
    returns why it does not apply here (``None``: it applies), and ``out_file``: the file
    name its ``--out`` takes, for a script whose ``--out`` is a file, not a directory."""

    name: str
    script: str
    what: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    skip_reason: Callable[[], str | None] = _always
    out_file: str | None = None

    def out_args(self, out_dir: Path) -> list[str]:
        """``--out`` for this script, writing into ``out_dir``."""
        return ["--out", str(out_dir / self.out_file if self.out_file else out_dir)]


BENCHMARKS = (
    Benchmark(
        "numerics",
        "bench_numerics.py",
        "quantize/dequantize throughput, fake_quant overhead",
        quick_args=("--quick",),
    ),
    Benchmark(
        "ops",
        "bench_ops.py",
        "W8A8 / W4A8 / weight-only matmul formulations vs float32",
        quick_args=("--quick",),
    ),
    Benchmark(
        "peers",
        "bench_quantized.py",
        "qjax vs Qwix vs AQT (PTQ, QAT, int8 training)",
        quick_args=("--quick",),
        skip_reason=_has("qwix", "aqt"),
    ),
    Benchmark(
        "transposed",
        "bench_transposed_weights.py",
        "x @ w.T on quantized (N, K) weights: transposes folded into the dot vs replayed",
        quick_args=("--quick",),
    ),
    Benchmark(
        "stored-transposed",
        "bench_stored_transposed.py",
        "Flax (K, N) quantized weights stored (N, K) by qjax.store_transposed vs as quantized",
        quick_args=("--quick",),
    ),
    Benchmark(
        "pointwise",
        "bench_pointwise_conv.py",
        "quantized 1x1 convs run as a dot vs as an integer conv",
        quick_args=("--quick",),
    ),
    Benchmark("shrink", "bench_shrink.py", "dense vs structurally shrunk models", quick_args=("--quick",)),
    Benchmark("sparsify", "bench_sparsify.py", "sparsify() optimizer overhead", quick_args=("--fast",)),
    Benchmark("parallel", "parallel_report.py", "sharding presets on 8 simulated devices"),
    Benchmark(
        "kernels",
        "bench_kernels.py",
        "Pallas low-bit matmul kernels (GPU/TPU: tuned timings; CPU: interpret-mode checks only)",
        quick_args=("--budget-s", "60", "--batches", "1,16,256"),
        out_file="bench_kernels.json",
    ),
)


def default_experiments_dir() -> Path:
    """``experiments/`` beside the package (a source checkout)."""
    return Path(__file__).resolve().parent.parent / "experiments"


def select(names: str | None) -> list[Benchmark]:
    """The benchmarks named in a comma-separated list (all when ``None``).

    Raises:
      CLIError: an unknown name (the message lists the known ones).
    """
    if not names:
        return list(BENCHMARKS)
    known = {b.name: b for b in BENCHMARKS}
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in known:
            raise CLIError(f"--only {name}: unknown benchmark; known: {', '.join(known)}")
        chosen.append(known[name])
    return chosen


def _shown(p: Path, experiments: Path) -> str:
    """A result file's path: relative to the checkout when inside it."""
    try:
        return str(p.relative_to(experiments.parent))
    except ValueError:
        return str(p)


def run_benchmark(
    b: Benchmark, experiments: Path, *, quick: bool, timeout: float | None, out_dir: Path | None = None
) -> dict:
    """Run one benchmark in a subprocess; a dict with its status, time, files and output tail.
    With ``out_dir`` the script writes its results there (its ``--out``), else to
    ``experiments/results``."""
    reason = b.skip_reason()
    record = {"name": b.name, "script": b.script, "what": b.what}
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    results = out_dir or experiments / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*")} if results.exists() else {}
    cmd = [sys.executable, str(experiments / b.script), *(b.quick_args if quick else b.args)]
    if out_dir is not None:
        cmd += b.out_args(out_dir.resolve())
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=experiments.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        status, code, output = (
            ("ok" if proc.returncode == 0 else "failed"),
            proc.returncode,
            proc.stdout + proc.stderr,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status, code, output = "timeout", None, out
    written = (
        sorted(
            _shown(p, experiments)
            for p in results.glob("*")
            if p.is_file() and before.get(p) != p.stat().st_mtime
        )
        if results.exists()
        else []
    )
    tail = "\n".join(output.strip().splitlines()[-15:])
    return {
        **record,
        "status": status,
        "exit_code": code,
        "seconds": round(time.perf_counter() - t, 1),
        "command": " ".join([f"experiments/{b.script}", *cmd[2:]]),
        "files": written,
        "output_tail": tail,
    }


def format_summary(summary: dict) -> str:
    """``bench_summary.md``: one row per benchmark, then each one's output tail."""
    lines = [
        "# qjax bench",
        "",
        f"- date: {summary['date']}; machine: {summary['machine']}; python {summary['python']}"
        f"{'; --quick' if summary['quick'] else ''}",
        "",
        "| benchmark | status | seconds | result files | what |",
        "|---|---|---:|---|---|",
    ]
    for r in summary["benchmarks"]:
        status = r["status"] if r["status"] != "skipped" else f"skipped: {r['reason']}"
        files = ", ".join(f"`{f}`" for f in r.get("files", [])) or "-"
        lines.append(f"| {r['name']} | {status} | {r.get('seconds', '-')} | {files} | {r['what']} |")
    for r in summary["benchmarks"]:
        if r.get("output_tail"):
            lines += ["", f"## {r['name']} (`{r['command']}`)", "", "```", r["output_tail"], "```"]
    return "\n".join(lines) + "\n"


def cmd_bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand."""
    chosen = select(args.only)
    name_w = max(len(b.name) for b in chosen)
    if args.list:
        script_w = max(len(b.script) for b in chosen)
        for b in chosen:
            reason = b.skip_reason()
            skipped = f"  [skipped here: {reason}]" if reason else ""
            print(f"{b.name:{name_w}s} {b.script:{script_w}s} {b.what}{skipped}")
        return 0
    experiments = Path(args.experiments) if args.experiments else default_experiments_dir()
    missing = [b.script for b in chosen if not (experiments / b.script).is_file()]
    if missing:
        raise CLIError(
            f"{experiments}: no {', '.join(missing)} (run from a source checkout of qjax, "
            "or pass --experiments DIR)"
        )
    given = prepare_out(args.out)
    out = given or experiments / "results"
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "quick": args.quick,
        "benchmarks": [],
    }
    for b in chosen:
        if not args.quiet:
            print(f"[qjax bench] {b.name} ...", file=sys.stderr, flush=True)
        record = run_benchmark(b, experiments, quick=args.quick, timeout=args.timeout, out_dir=given)
        summary["benchmarks"].append(record)
        if not args.quiet:
            print(f"[qjax bench] {b.name}: {record['status']} {record.get('seconds', '')}", file=sys.stderr)
    (out / "bench_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "bench_summary.md").write_text(format_summary(summary))
    for r in summary["benchmarks"]:
        files = ", ".join(r.get("files", []))
        print(f"{r['name']:{name_w}s} {r['status']:8s} {r.get('seconds', ''):>7} {files}")
    print(f"wrote {out / 'bench_summary.md'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary["benchmarks"]) else 1


def add_bench_parser(sub) -> None:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts of experiments/ that apply on this machine",
        description="Run the benchmarks of experiments/ that apply here (each in its own process) and "
        "collect their status, duration, result files and output in bench_summary.md/json.",
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--only", metavar="NAMES", help="comma-separated benchmark names (default: all)")
    p.add_argument("--quick", action="store_true", help="each benchmark's smoke-test mode")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where the benchmarks write their results and the summary (default experiments/results)",
    )
    p.add_argument("--experiments", metavar="DIR", help="the experiments folder (default: the checkout's)")
    p.add_argument("--timeout", type=seconds_arg, default=None, metavar="S", help="per-benchmark time limit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(handler=cmd_bench)
