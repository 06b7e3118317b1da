"""Output of the ``qjax`` command: progress bars, the results table, ``report.md`` and
the PNG plots."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any


def tick(pb, loss: float | None = None) -> None:
    if pb is None:
        return
    if loss is not None:
        pb.set_postfix(loss=f"{loss:.4f}")
    pb.update(1)


def progress_factory(quiet: bool):
    """``bar(total=, desc=)`` context managers: tqdm bars on stderr, or nothing."""
    if not quiet:
        try:
            from tqdm.auto import tqdm

            return lambda **kw: tqdm(leave=False, file=sys.stderr, **kw)
        except ImportError:  # tqdm is optional: no bars then
            pass
    return lambda **kw: contextlib.nullcontext(None)


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The results as one table: method | accuracy | bytes | x smaller | latency x float |
    seconds (the latency column only when the rows carry ``latency_ratio``)."""
    rows = result["rows"]
    with_latency = any("latency_ratio" in r for r in rows)
    head = (
        "method",
        "accuracy",
        "bytes",
        "x smaller",
        *(("latency x float",) if with_latency else ()),
        "seconds",
    )
    body = [
        (
            r["method"],
            f"{100 * r['accuracy']:.2f}%",
            f"{r['bytes']:,}",
            f"{r['ratio']:.2f}",
            *((f"{r['latency_ratio']:.2f}" if "latency_ratio" in r else "-",) if with_latency else ()),
            f"{r['seconds']:.2f}",
        )
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of a demo result in ``out``: accuracy vs size (every row), accuracy vs
    sparsity (one-shot curve and the fine-tuned rows) and the mixed-precision Pareto
    frontier (measured accuracy vs bytes, uniform-precision rows for reference).

    Returns:
      The files written; ``[]`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = {r["key"]: r for r in result["rows"]}
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in result["rows"]:
        ax.scatter(r["bytes"], 100 * r["accuracy"], s=25)
        ax.annotate(
            r["key"], (r["bytes"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 2), textcoords="offset points"
        )
    ax.set(xscale="log", xlabel="bytes (log)", ylabel="test accuracy (%)", title="accuracy vs size")
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_size.png")

    if result.get("sparsity_curve"):
        fig, ax = plt.subplots(figsize=(6, 4))
        curve = result["sparsity_curve"]
        ax.plot(
            [100 * c["sparsity"] for c in curve],
            [100 * c["accuracy"] for c in curve],
            "o-",
            label="one-shot global magnitude, no fine-tune",
        )
        for r in result["rows"]:
            if r.get("sparsity") is not None:
                ax.scatter(100 * r["sparsity"], 100 * r["accuracy"], marker="*", s=120, label=r["method"])
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title="accuracy vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "sparsity_curve.png")

    if result.get("mixed_precision_pareto"):
        fig, ax = plt.subplots(figsize=(6, 4))
        front = sorted(
            (p for p in result["mixed_precision_pareto"] if p["accuracy"] is not None),
            key=lambda p: p["bytes"],
        )
        ax.plot(
            [p["bytes"] for p in front],
            [100 * p["accuracy"] for p in front],
            "o-",
            label="Hessian-guided frontier (measured)",
        )
        for key in ("int2_channel", "int4_channel", "int8_channel", "mixed_precision"):
            if key in rows:
                ax.scatter(
                    rows[key]["bytes"],
                    100 * rows[key]["accuracy"],
                    marker="s",
                    s=40,
                    label=rows[key]["method"],
                )
        ax.set(xlabel="bytes", ylabel="test accuracy (%)", title="mixed precision: Pareto frontier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "mixed_precision_pareto.png")
    return written


def format_report(result: dict[str, Any]) -> str:
    """``report.md``: what was run, on what, and the table."""
    v = result["versions"]
    return "\n".join(
        [
            "# qjax demo: digits CNN, the whole toolbox",
            "",
            f"- date: {result['date']}; machine: {result['machine']}; python {v['python']}, "
            f"jax {v['jax']}, qjax {v['qjax']}",
            f"- data: {result['data']['name']} ({result['data']['train']} train / "
            f"{result['data']['test']} test, seed {result['seed']})",
            f"- model: {result['model']}; epochs: float {result['epochs']['float']}, "
            f"QAT {result['epochs']['qat']}, pruning {result['epochs']['prune']}"
            f"{' (--fast)' if result['fast'] else ''}",
            f"- {result['note']}",
            "- bytes: `qjax.footprint(...).total` of all variables (values, scales, float biases); "
            "seconds: wall time of that row's step (training, or quantize + evaluate, compile included).",
            "",
            format_table(result, markdown=True),
            "",
        ]
    )
