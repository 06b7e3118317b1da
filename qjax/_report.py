"""Output of the ``qjax`` command: progress bars, the results table, ``report.md`` and
the PNG plots."""

from __future__ import annotations

import contextlib
import sys
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
    """The results as one table: method | accuracy | bytes | x smaller | seconds."""
    head = ("method", "accuracy", "bytes", "x smaller", "seconds")
    body = [
        (
            r["method"],
            f"{100 * r['accuracy']:.2f}%",
            f"{r['bytes']:,}",
            f"{r['ratio']:.2f}",
            f"{r['seconds']:.2f}",
        )
        for r in result["rows"]
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 4) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def format_report(result: dict[str, Any]) -> str:
    """``report.md``: what was run, on what, and the table."""
    v = result["versions"]
    return "\n".join(
        [
            "# qjax demo: digits MLP, quantization and pruning",
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


