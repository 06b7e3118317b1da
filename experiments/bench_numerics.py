"""Benchmark of qjax numerics on the local backend (a benchmark, not a test).

a) Throughput of jitted ``qjax.quantize`` / ``qjax.dequantize`` on float32 matrices for
   int8 per-tensor, int8 per-channel, int4 per-channel in groups of 128 (packed) and
   fp8 e4m3, against a jitted ``x * 2`` (a memory-bound reference).
b) Cost of fake quantization inside a jitted training step: a 3-layer MLP (512 wide,
   batch 256, optax adam) in float vs. with its kernels passed through
   ``qjax.fake_quant_params`` (int8 per-channel, int4 grouped) vs. LSQ (int4 per-channel,
   scales from ``qjax.lsq_scales`` trained alongside).

Timing: every variant is compiled and warmed up first; a sample runs a variant ``inner``
times (enough calls to take ``--target-ms``), blocking on each result, and reports the
time per call; the variants are interleaved (rotated order) for ``--repeats`` rounds and
the median sample is reported. Ratios are between variants measured in this one run.

Writes ``bench_numerics.json`` and ``bench_numerics.md`` (``bench_numerics_quick.*`` with
``--quick``) to ``--out`` (default ``experiments/results``).

Usage::

    python experiments/bench_numerics.py           # full run, ~1-3 minutes on 2 CPU cores
    python experiments/bench_numerics.py --quick   # seconds; a smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import optax
from timing import time_interleaved

import qjax

RESULTS = Path(__file__).resolve().parent / "results"


# -- a) quantize / dequantize throughput ---------------------------------------------------


def quant_specs() -> dict[str, qjax.QuantSpec]:
    """The specs benchmarked in part a."""
    return {
        "int8 per-tensor": qjax.QuantSpec(qjax.int8),
        "int8 per-channel": qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
        "int4 per-channel g128 packed": qjax.QuantSpec(
            qjax.int4, channel_axes=(-1,), group_size=128, group_axis=0, pack=True
        ),
        "fp8 e4m3 per-tensor": qjax.QuantSpec(qjax.fp8_e4m3),
    }


def bench_quantize(sizes: list[int], *, repeats: int, target_s: float) -> list[dict[str, Any]]:
    """Part a: one row per (size, spec, op), plus the ``x * 2`` baseline per size."""
    rows = []
    for n in sizes:
        x = jax.random.normal(jax.random.key(n), (n, n), jnp.float32)
        nbytes = x.size * x.dtype.itemsize
        baseline = jax.jit(lambda a: a * 2)
        in_place = jax.jit(lambda a: a * 2, donate_argnums=0)
        held = [jnp.copy(x)]  # the donated buffer, updated in place every call

        def run_in_place(f=in_place, held=held):
            held[0] = f(held[0])  # doubles every call; inf costs the same on CPU
            return held[0]

        variants: dict[str, Callable[[], Any]] = {
            "x * 2 (baseline)": lambda f=baseline, x=x: f(x),
            "x * 2 in place (donated)": run_in_place,
        }
        for name, spec in quant_specs().items():
            quant = jax.jit(lambda a, s=spec: qjax.quantize(a, s))
            q = jax.block_until_ready(quant(x))
            dequant = jax.jit(qjax.dequantize)
            variants[f"quantize {name}"] = lambda f=quant, x=x: f(x)
            variants[f"dequantize {name}"] = lambda f=dequant, q=q: f(q)
        timings = time_interleaved(variants, repeats=repeats, target_s=target_s, reference="x * 2 (baseline)")
        for name, t in timings.items():
            op, _, spec = name.partition(" ")
            if name.startswith("x * 2"):
                op, spec = "x * 2", "baseline" if "baseline" in name else "in place (donated output)"
            rows.append(
                {
                    "shape": [n, n],
                    "op": op,
                    "spec": spec,
                    "ms": 1e3 * t["median_s"],
                    "gb_per_s": nbytes / t["median_s"] / 1e9,
                    "x_baseline_time": t["ratio"],
                    "min_ms": 1e3 * t["min_s"],
                    "inner": t["inner"],
                    "samples_ms": [1e3 * s for s in t["samples_s"]],
                }
            )
    return rows


# -- b) fake-quant overhead in a training step ----------------------------------------------


class MLP(nn.Module):
    """Three ``Dense`` layers of ``width`` with relu between them."""

    width: int = 512

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.width)(x)


def train_policies() -> dict[str, qjax.Policy | None]:
    """The weight treatments compared in part b (``None``: float)."""
    kern = r".*/kernel"
    Q = qjax.QuantSpec
    return {
        "float": None,
        "fake_quant int8 per-channel": qjax.Policy(
            [qjax.Rule(kern, weight=Q(qjax.int8, channel_axes=(-1,)))]
        ),
        "fake_quant int4 per-channel g128": qjax.Policy(
            [qjax.Rule(kern, weight=Q(qjax.int4, channel_axes=(-1,), group_size=128, group_axis=0))]
        ),
        "lsq int4 per-channel (scales trained)": qjax.Policy(
            [qjax.Rule(kern, weight=Q(qjax.int4, channel_axes=(-1,), ste="lsq"))]
        ),
    }


def make_step(model: nn.Module, policy: qjax.Policy | None, tx: optax.GradientTransformation):
    """A jitted ``step(state, x, y) -> (state, loss)``; ``state = (trainable, opt_state)``
    with ``trainable = (variables, lsq_scales)``; the state is donated."""

    def loss_fn(trainable, x, y):
        variables, scales = trainable
        if policy is not None:
            variables = qjax.fake_quant_params(variables, policy, scales=scales)
        logits = model.apply(variables, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(state, x, y):
        trainable, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(trainable, x, y)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def bench_train_step(*, width: int, batch: int, repeats: int, target_s: float) -> list[dict[str, Any]]:
    """Part b: median time of one training step per weight treatment, and its ratio to
    the float step."""
    model = MLP(width)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, width)
    variables = model.init(kp, x[:1])
    tx = optax.adam(1e-3)
    variants, states = {}, {}
    for name, policy in train_policies().items():
        scales = {} if policy is None else qjax.lsq_scales(variables, policy)
        trainable = jax.tree.map(jnp.copy, (variables, scales))  # each variant owns (donated) buffers
        states[name] = (trainable, tx.init(trainable))
        step = make_step(model, policy, tx)

        def run(name=name, step=step):
            states[name], loss = step(states[name], x, y)
            return loss

        variants[name] = run
    timings = time_interleaved(variants, repeats=repeats, target_s=target_s, reference="float")
    flops = 3 * 2 * batch * 3 * width * width  # forward + two backward matmuls per layer
    return [
        {
            "variant": name,
            "ms": 1e3 * t["median_s"],
            "x_float": t["ratio"],
            "gflop_per_s": flops / t["median_s"] / 1e9,
            "min_ms": 1e3 * t["min_s"],
            "inner": t["inner"],
            "samples_ms": [1e3 * s for s in t["samples_s"]],
        }
        for name, t in timings.items()
    ]


# -- reporting --------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Date, machine (``uname -m``), CPU count, versions and devices."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": os.uname().machine,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "qjax": qjax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "loadavg_1m_start": os.getloadavg()[0],
    }


def _table(head: list[str], rows: list[list[str]], markdown: bool, text_columns: int = 1) -> str:
    """A plain-text or markdown table; the first ``text_columns`` are left-aligned."""
    if markdown:
        align = ["---"] * text_columns + ["---:"] * (len(head) - text_columns)
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(
        c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def quantize_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Part a as a table."""
    head = ["shape", "op", "spec", "ms/call", "GB/s", "x baseline time"]
    body = [
        [
            "x".join(map(str, r["shape"])),
            r["op"],
            r["spec"],
            f"{r['ms']:.3f}",
            f"{r['gb_per_s']:.2f}",
            f"{r['x_baseline_time']:.2f}",
        ]
        for r in rows
    ]
    return _table(head, body, markdown, text_columns=3)


def train_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Part b as a table."""
    head = ["variant", "ms/step", "min ms", "x float", "GFLOP/s (matmuls)"]
    body = [
        [
            r["variant"],
            f"{r['ms']:.2f}",
            f"{r['min_ms']:.2f}",
            f"{r['x_float']:.2f}",
            f"{r['gflop_per_s']:.1f}",
        ]
        for r in rows
    ]
    return _table(head, body, markdown)


def report_md(result: dict[str, Any]) -> str:
    """The markdown report."""
    env, cfg = result["environment"], result["config"]
    return "\n".join(
        [
            "# bench_numerics" + (" (--quick)" if cfg["quick"] else ""),
            "",
            f"- date: {env['date']}; machine: {env['machine']}; cpu count: {env['cpu_count']}; "
            f"backend: {env['backend']}; python {env['python']}, jax {env['jax']}, qjax {env['qjax']}",
            f"- load average (1 min) at start / end: {env['loadavg_1m_start']:.2f} / "
            f"{env['loadavg_1m_end']:.2f}; total run time {result['total_seconds']:.0f} s",
            f"- timing: median of {cfg['repeats']} interleaved samples per variant, each sample "
            f">= {1e3 * cfg['target_s']:.0f} ms of back-to-back calls (each blocked on), after "
            "compile and warm-up; ratios are paired: the median over rounds of a variant's sample "
            "divided by the reference's sample from the same round (robust to drifting load from "
            "other processes on the machine)",
            "",
            "## a) jitted quantize / dequantize, float32 matrices",
            "",
            "GB/s is the float32 matrix size (input of quantize, output of dequantize) divided by "
            "the time per call; `x baseline time` is time / time of a jitted `x * 2` on the same "
            "matrix (which reads and writes that many bytes). Every call returns a fresh output "
            "buffer; on CPU, a large fresh buffer (64 MB at 4096x4096) is page-faulted in on every "
            "call, which can cost more than the arithmetic. The `in place (donated output)` row "
            "is `x * 2` with its input donated, so the output reuses that buffer: the difference "
            "between the two `x * 2` rows is that allocation cost. Quantize writes 4x (int8, fp8) "
            "or 8x (int4) fewer output bytes than it reads; dequantize writes a full float32 matrix.",
            "",
            quantize_table(result["quantize"], markdown=True),
            "",
            f"## b) training step, MLP 3x Dense({cfg['width']}), batch {cfg['batch']}, adam",
            "",
            "`x float` is the step time divided by the float step's. LSQ also trains one scale "
            "per output channel per kernel. GFLOP/s counts the matmuls of forward and backward only.",
            "",
            train_table(result["train_step"], markdown=True),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the results files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: small sizes, few repeats")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default %(default)s)")
    parser.add_argument("--repeats", type=int, help="samples per variant (default 31, quick 3)")
    parser.add_argument("--target-ms", type=float, help="minimum length of one sample (default 40, quick 5)")
    args = parser.parse_args(argv)

    quick = args.quick
    repeats = args.repeats or (3 if quick else 31)
    target_s = (args.target_ms or (5 if quick else 40)) / 1e3
    sizes = [256] if quick else [1024, 4096]
    width, batch = (128, 32) if quick else (512, 256)
    t0 = time.perf_counter()
    env = environment()
    print(
        f"bench_numerics{' --quick' if quick else ''}: {env['machine']}, {env['cpu_count']} CPUs, "
        f"jax {env['jax']} ({env['backend']}), load {env['loadavg_1m_start']:.2f}",
        flush=True,
    )

    quant_rows = bench_quantize(sizes, repeats=repeats, target_s=target_s)
    print("\na) jitted quantize / dequantize (GB/s of float32 matrix; time relative to x * 2)")
    print(quantize_table(quant_rows), flush=True)
    train_rows = bench_train_step(width=width, batch=batch, repeats=repeats, target_s=target_s)
    print(f"\nb) training step, MLP 3x Dense({width}), batch {batch}, adam (time relative to float)")
    print(train_table(train_rows))

    env["loadavg_1m_end"] = os.getloadavg()[0]
    result = {
        "environment": env,
        "config": {
            "quick": quick,
            "repeats": repeats,
            "target_s": target_s,
            "sizes": sizes,
            "width": width,
            "batch": batch,
            "specs": {k: s.to_dict() for k, s in quant_specs().items()},
        },
        "quantize": quant_rows,
        "train_step": train_rows,
        "total_seconds": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_numerics_quick" if quick else "bench_numerics"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report_md(result))
    print(f"\n{result['total_seconds']:.0f} s; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
