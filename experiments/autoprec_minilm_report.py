"""The report of ``autoprec_minilm.py``: its Markdown (tables, the diagnosis of where the
sensitivity proxy and the measured quality disagree) and its plot, from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ptq_minilm import BATCH, SEQ


def counts(choice) -> str:
    names = [c for c in ("int2", "int4", "int8", "float") if c in choice]
    return " ".join(f"{n}×{list(choice).count(n)}" for n in names)


def diagnosis(res: dict[str, Any]) -> list[str]:
    """Generated conclusion: wins against random and uniform, and where the second-order
    prediction is furthest from the measured single-layer change."""
    wins, total, eq = 0, 0, []
    for mname, m in res["menus"].items():
        for label, r in m["budgets"].items():
            if r["random"]:
                total += 1
                wins += r["hessian"]["mean_cos"] >= r["random"]["by_calib_loss"]["mean_cos"]
            for n, lab in (("int8", "int8 size"), ("int4", "int4 size")):
                if label == lab:
                    h, u = r["hessian"], m["uniform"][n]
                    same = h["choice"] == u["choice"]
                    verdict = (
                        "the same configuration"
                        if same
                        else ("better" if h["mean_cos"] > u["mean_cos"] else "worse")
                    )
                    eq.append(
                        f"[{mname}] at the {lab}: Hessian {h['mean_cos']:.5f} vs uniform {n} "
                        f"{u['mean_cos']:.5f} ({verdict}; direct {r['direct']['mean_cos']:.5f})"
                    )
    last = list(res["menus"].values())[-1]
    obj = np.asarray(last["objective"])
    names = last["candidates"]
    errs = []
    for i, li in enumerate(res["layers"]):
        for j, n in enumerate(names):
            d = li["direct"].get(n)
            if n != "float" and d and d > 0 and obj[i, j] > 0:
                errs.append((d / obj[i, j], li["path"].removeprefix("params/").removesuffix("/kernel"), n))
    errs.sort()
    top = errs[::-1][:6]
    under = ", ".join(f"`{p}` {n} ×{r:.1f}" for r, p, n in top)
    over = ", ".join(f"`{p}` {n} ×{1 / r:.1f}" for r, p, n in errs[:4])
    qk = sum(p.endswith(("/query", "/key")) for _, p, _ in top)
    n2 = sum(n == "int2" for _, _, n in top)
    worse = [e for e in eq if "(worse" in e]
    return [
        "## Conclusion",
        "",
        f"- Against random configurations of the same menu and size (±2 %), the Hessian choice is at least "
        f"as good as the best of {res['settings']['pool']} (picked by calibration loss) at {wins} of {total} "
        "budgets.",
        "- Against uniform precision at the same size: " + "; ".join(eq) + ".",
        "- Second-order prediction vs the measured single-layer change (direct / predicted, same sentences): "
        f"most under-predicted {under} ({n2} of {len(top)} are int2, {qk} of {len(top)} attention query/key "
        f"projections, whose error passes through the softmax); most over-predicted {over}. The quadratic "
        "model with one curvature per layer (Tr(H)/n) ranks configurations well overall (rank correlations "
        "above), but its errors are largest for the big int2 perturbations"
        + (
            ", and that is where the Hessian choice loses to uniform precision: it puts int2 on layers whose "
            "damage it under-predicts, while the measured single-layer sensitivity (direct) does not."
            if worse
            else "."
        ),
    ]


def markdown(res: dict[str, Any]) -> str:
    env, s = res["machine"], res["settings"]
    fl, fm = res["float_layer_bytes"], res["float_model_bytes"]
    other, nw = fm - fl, res["weights"]
    sec = res["seconds"]
    lines = [
        "# autoprec_minilm" + (" (--fast)" if res["fast"] else ""),
        "",
        f"- date: {env['date']}; machine: {env['machine']} ({env['processor']}), {env['cpu_count']} CPUs "
        f"(shared with other jobs); backend {env['backend']}; jax {env['jax']}; qjax {env['qjax']}",
        f"- run time {res['total_s']:.0f} s: Hutchinson {sec['hutchinson']:.0f} s, direct "
        f"{sec['direct']:.0f} s, "
        f"searches + measuring {res['configs_measured']} configurations {sec['search_and_measure']:.0f} s, "
        f"deployment + latency {sec['deploy']:.0f} s; load average (1 min) at start / end "
        f"{env['load_avg_1min_start']:.2f} / {res['load_avg_end']:.2f}",
        "- model: all-MiniLM-L6-v2 (real weights, float32); searched layers: the 36 linear kernels "
        f"({nw:,} weights, {fl:,.0f} B in float32); embeddings, LayerNorms and biases stay float32 "
        f"({other:,.0f} B)",
        "- formats: int2 / int4 symmetric with groups of 128 input rows per output channel, int8 per output "
        "channel, all weight-only with MSE clip search; float = float32. Menus: {int4, int8, float} and "
        "{int2, int4, int8, float}",
        f"- sentences: `experiments/data/sentences.txt` as in ptq_minilm.py: {s['eval_sentences']} "
        f"evaluation, {s['calib_sentences']} calibration (every 3rd). Metrics on the evaluation sentences "
        "against the float model: mean / min cosine of the sentence embeddings, Spearman correlation of "
        "the pairwise similarity matrices (upper triangles)",
        f"- sensitivity loss: mean 1 − cos(e_q, e_float) over the first {s['hess_sentences']} calibration "
        f"sentences (one batch, tokens {s['hess_tokens']}); `hutchinson_trace` with {s['probes']} "
        "Rademacher probes. At the float point this loss is 0 with a zero gradient, so its Hessian is "
        "exactly the Gauss-Newton matrix JᵀH_cos J (the library's Hessian-vector products compute it "
        "directly); the empirical Fisher of the same loss is identically 0, so `sensitivity='fisher'` does "
        "not apply. Prediction per configuration: Σ ½ Tr(H_l)/n_l ‖Q(W_l) − W_l‖² (HAWQ-V2/V3), in the "
        "units of the loss (≈ 1 − mean cos). `direct`: the measured single-layer loss change, summed",
        "- `calib loss`: 1 − mean cos on all calibration sentences (what the fair random selection and the "
        "accuracy-driven search use)",
        f"- random baselines: {s['pool']} distinct random configurations of the same menu per budget, size "
        "within ±2 % of the budget (flat-Dirichlet per-layer probabilities, rejection on size); 'best by "
        "calib' picks the lowest calibration loss (fair), 'oracle' the highest evaluation cosine",
        "",
        "## Summary",
        "",
    ]
    for mname, m in res["menus"].items():
        rc = m["rank_corr"]
        parts = []
        for label, r in m["budgets"].items():
            h, rnd = r["hessian"], r["random"]
            txt = f"{label}: Hessian {h['mean_cos']:.5f}"
            if label == "int8 size":
                txt += f" vs uniform int8 {m['uniform']['int8']['mean_cos']:.5f}"
            if label == "int4 size":
                txt += f" vs uniform int4 {m['uniform']['int4']['mean_cos']:.5f}"
            if rnd:
                txt += (
                    f" vs best of {rnd['n']} random {rnd['by_calib_loss']['mean_cos']:.5f} (by calib) / "
                    f"{rnd['by_eval_cos']['mean_cos']:.5f} (oracle)"
                )
            parts.append(txt)
        lines.append(f"- **menu {mname}** (mean cos on evaluation sentences): " + "; ".join(parts) + ".")
        lines.append(
            f"  Predicted Δloss vs measured over {rc['configs']} configurations: rank correlation "
            f"{rc['predicted_vs_calib_loss']:.3f} (calibration loss) / {rc['predicted_vs_eval_1mcos']:.3f} "
            f"(1 − eval mean cos); median predicted / measured {rc['median_predicted_over_calib_loss']:.2f}; "
            f"single-layer Hessian prediction vs direct measurement: rank correlation "
            f"{rc['single_layer_hessian_vs_direct']:.3f}."
        )
    lines += [
        "",
        "## Key table",
        "",
        "kernel bytes: the 36 linear kernels as stored (values + scales; `Problem.costs['bytes']`, the same "
        "count as `qjax.footprint`); bits/w: kernel bits per weight; × smaller: vs the float32 kernels "
        f"({fl:,.0f} B) and, in brackets, whole model vs {fm:,.0f} B. pred. Δloss: the Hessian prediction "
        "Σ ½Ω (for every row, whatever chose it).",
        "",
        "| menu | row | kernel bytes | bits/w | × smaller (model) | mean cos | min cos | Spearman "
        "| pred. Δloss "
        "| calib loss | formats |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(menu, name, r):
        return (
            f"| {menu} | {name} | {r['bytes']:,.0f} | {8 * r['bytes'] / nw:.2f} | {fl / r['bytes']:.2f} "
            f"({fm / (other + r['bytes']):.2f}) | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | "
            f"{r['spearman']:.5f} | {r['predicted']:.3g} | {r['calib_loss']:.3g} | {counts(r['choice'])} |"
        )

    first = next(iter(res["menus"].values()))
    last = list(res["menus"].values())[-1]
    for n in ("int8", "int4", "int2"):
        if n in last["uniform"]:
            lines.append(row("", f"uniform {n}", last["uniform"][n]))
    for mname, m in res["menus"].items():
        for label, r in m["budgets"].items():
            lines.append(row(mname, f"**Hessian @ {label}**", r["hessian"]))
            lines.append(row(mname, f"direct @ {label}", r["direct"]))
            rnd = r["random"]
            if rnd:
                lines.append(
                    row(mname, f"best of {rnd['n']} random @ {label}, by calib", rnd["by_calib_loss"])
                )
                lines.append(row(mname, f"best of {rnd['n']} random @ {label}, oracle", rnd["by_eval_cos"]))
        a = m["accuracy_driven"]
        lines.append(row(mname, f"Hessian + measured, max_drop {s['max_drop']}", a))
    lines += [
        "",
        f"Accuracy-driven rows: `search(max_drop={s['max_drop']}, eval_fn=calibration mean cos)` "
        "(bisection on "
        "the frontier, then greedy refinement from the failing neighbour): "
        + "; ".join(
            f"{mname}: {m['accuracy_driven']['measured_configs']} configurations measured, met "
            f"{m['accuracy_driven']['met']}"
            for mname, m in res["menus"].items()
        )
        + ".",
        "",
        "### Hessian choice vs the random pool",
        "",
        "'uniform in pool': the pool drew the uniform configuration itself (at int8 / int4 size it is one of "
        "few configurations that fit ±2 %); 'best non-uniform': the best of the other pool members by "
        "calibration loss.",
        "",
        "| menu | budget | bytes | Hessian mean cos | random: best by calib | oracle best | best non-uniform "
        "| median | bytes range | uniform in pool | pool share Hessian ≥ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for mname, m in res["menus"].items():
        for label, r in m["budgets"].items():
            rnd = r["random"]
            if not rnd:
                lines.append(
                    f"| {mname} | {label} | {r['budget_bytes']:,.0f} | {r['hessian']['mean_cos']:.5f} | "
                    "none found | | | | | | |"
                )
                continue
            lo, hi = rnd["bytes_range"]
            mixed = [c for c in r["random_configs"] if len(set(c["choice"])) > 1]
            best_mixed = f"{min(mixed, key=lambda c: c['calib_loss'])['mean_cos']:.5f}" if mixed else "-"
            lines.append(
                f"| {mname} | {label} | {r['budget_bytes']:,.0f} | {r['hessian']['mean_cos']:.5f} | "
                f"{rnd['by_calib_loss']['mean_cos']:.5f} | {rnd['by_eval_cos']['mean_cos']:.5f} | "
                f"{best_mixed} | {rnd['median_cos']:.5f} | {lo:,.0f}–{hi:,.0f} | "
                f"{'yes' if len(mixed) < len(r['random_configs']) else 'no'} | "
                f"{100 * rnd['hessian_beats_fraction']:.0f} % |"
            )
    lines += ["", *diagnosis(res)]
    dep = res["deployed"]
    has_lat = any("latency_ms" in r for r in dep.values())
    lines += [
        "",
        "### Deployed (integer execution: `qjax.quantize_params` + `qjax.quantized`)",
        "",
        "Metrics on the evaluation sentences padded to 128 tokens, against the float model run the same way; "
        "whole-model bytes of the quantized params"
        + (
            f"; latency: batch {BATCH} × {SEQ} tokens, median of interleaved samples, ratio paired against "
            "float in the same run (shared 2-core machine: noisy)."
            if has_lat
            else "; latency skipped (--no-latency)."
        ),
        "",
        "| config | model bytes (× smaller) | mean cos | min cos | Spearman | latency ms (× float) "
        "| formats |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n, r in dep.items():
        lat = f"{r['latency_ms']:.0f} ({r['latency_vs_float']:.2f}×)" if "latency_ms" in r else ""
        lines.append(
            f"| {n} | {r['model_bytes']:,} ({fm / r['model_bytes']:.2f}×) | {r['mean_cos']:.5f} | "
            f"{r['min_cos']:.5f} | {r['spearman']:.5f} | {lat} | {counts(r['choice'])} |"
        )
    for mname, m in res["menus"].items():
        lines += [
            "",
            f"### Hessian frontier, menu {mname} (`search(...).pareto`, {m['frontier_points']} budgets "
            "evenly "
            "spaced in bytes; points up to twice the int8 size measured)",
            "",
            "| # | kernel bytes | bits/w | pred. Δloss | calib loss | mean cos | Spearman | formats |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for i, p in enumerate(m["frontier"]):
            lines.append(
                f"| {i} | {p['bytes']:,.0f} | {8 * p['bytes'] / nw:.2f} | {p['predicted']:.3g} | "
                f"{p['calib_loss']:.3g} | {p['mean_cos']:.5f} | {p['spearman']:.5f} | {counts(p['choice'])} |"
            )
    names = [n for n in last["candidates"] if n != "float"]
    obj = np.asarray(last["objective"])
    lines += [
        "",
        "### Per-layer sensitivity and choices",
        "",
        "Tr(H) ± standard error (Hutchinson), predicted single-layer Δloss ½Ω / measured single-layer Δloss "
        "(direct) per format, and the Hessian choice at each budget (first menu, then second).",
        "",
        "| layer | Tr(H) ± se | Tr/n | "
        + " | ".join(f"{n} pred / direct" for n in names)
        + " | "
        + " | ".join(f"{lb} ({i + 1})" for i, m in enumerate((first, last)) for lb in m["budgets"])
        + " |",
        "|---|---:|---:|" + "---:|" * len(names) + "---|" * sum(len(m["budgets"]) for m in (first, last)),
    ]
    for i, li in enumerate(res["layers"]):
        short = li["path"].removeprefix("params/").removesuffix("/kernel")
        cells = [f"{obj[i, j]:.2g} / {li['direct'][n]:.2g}" for j, n in enumerate(names)]
        ch = [r["hessian"]["choice"][i] for m in (first, last) for r in m["budgets"].values()]
        lines.append(
            f"| `{short}` | {li['trace']:.3g} ± {li['stderr']:.2g} | {li['mean']:.3g} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ch)
            + " |"
        )
    for mname, m in res["menus"].items():
        lines += ["", f"### `search(...).report()`, menu {mname}", "", m["report"]]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    mb = 1e-6
    styles = [("C0", "o-"), ("C4", "^-")]
    for k, (mname, m) in enumerate(res["menus"].items()):
        color, style = styles[k % 2]
        pool = [p for r in m["budgets"].values() for p in r["random_configs"]]
        ax.scatter(
            [p["bytes"] * mb for p in pool],
            [1 - p["mean_cos"] for p in pool],
            s=9,
            c=color,
            alpha=0.25,
            label=f"random [{mname}]",
        )
        f = [p for p in m["frontier"] if p["mean_cos"] < 1]
        ax.plot(
            [p["bytes"] * mb for p in f],
            [1 - p["mean_cos"] for p in f],
            style,
            ms=4,
            c=color,
            label=f"Hessian frontier [{mname}]",
        )
        h = [r["hessian"] for r in m["budgets"].values()]
        ax.scatter(
            [p["bytes"] * mb for p in h],
            [1 - p["mean_cos"] for p in h],
            marker="D",
            c=color,
            edgecolors="k",
            s=45,
            zorder=5,
            label=f"Hessian @ budgets [{mname}]",
        )
        d = [r["direct"] for r in m["budgets"].values()]
        ax.scatter(
            [p["bytes"] * mb for p in d],
            [1 - p["mean_cos"] for p in d],
            marker="x",
            c=color,
            s=40,
            zorder=5,
            label=f"direct @ budgets [{mname}]",
        )
    last = list(res["menus"].values())[-1]
    for n, u in last["uniform"].items():
        if n == "float":
            continue
        ax.scatter([u["bytes"] * mb], [1 - u["mean_cos"]], marker="*", s=160, c="C3", zorder=6)
        ax.annotate(
            f"uniform {n}",
            (u["bytes"] * mb, 1 - u["mean_cos"]),
            fontsize=8,
            xytext=(5, 3),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    ax.set_xlabel("bytes of the 36 linear kernels (MB)")
    ax.set_ylabel("1 − mean cosine to float (evaluation sentences, log)")
    ax.set_xlim(0, 2.1 * res["uniform_bytes"]["int8"] * mb)
    ax.set_title("all-MiniLM-L6-v2: embedding error vs size")
    ax.legend(fontsize=7)
    for k, (mname, m) in enumerate(res["menus"].items()):
        meas = m["frontier"] + [p for r in m["budgets"].values() for p in r["random_configs"]]
        meas = [r for r in meas if r["calib_loss"] > 0 and r["predicted"] > 0]
        ax2.scatter(
            [r["predicted"] for r in meas],
            [r["calib_loss"] for r in meas],
            s=10,
            c=styles[k % 2][0],
            alpha=0.6,
            label=mname,
        )
    lo, hi = ax2.get_xlim()
    ax2.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("predicted Δloss Σ ½ Tr(H)/n ‖Q(W) − W‖²")
    ax2.set_ylabel("measured calibration loss 1 − mean cos")
    ax2.set_title("second-order prediction vs measurement (frontier + random)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
