"""The report of ``autoprec_digits.py``: its Markdown tables and its plot (predicted vs
measured frontiers per budget kind), from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report import rank_corr


def markdown(res: dict[str, Any]) -> str:
    env = res["machine"]
    lines = [
        "# autoprec_digits" + (" (--fast)" if res["fast"] else ""),
        "",
        f"- date: {env['date']}; machine: {env['machine']} ({env['processor']}), {env['cpu_count']} CPUs; "
        f"backend {env['backend']}; jax {env['jax']}; total run time {res['total_s']:.0f} s",
        f"- load average (1 min) at start / end: {env['load_avg_1min_start']:.2f} / "
        f"{res['load_avg_end']:.2f}",
        f"- detected hardware: `{res['models']['cnn']['hardware']['name']}` "
        f"(native: {res['models']['cnn']['hardware']['native']})",
        "- formats per layer: int2 / int4 / int8 weight-only (symmetric, per output channel, MSE clip "
        "search) or float32; accuracy and cross-entropy on the 540 test images; sensitivity on 512 "
        "training images",
        "- every one of the 4^4 = 256 configurations of each model was evaluated (oracle and true frontier)",
        "",
        "## Summary",
        "",
    ]
    for name, m in res["models"].items():
        preds = [c["predicted"] for c in m["all_configs"]]
        losses = [c["loss"] for c in m["all_configs"]]
        train = [c["train_loss"] for c in m["all_configs"]]
        u = m["vs_uniform"]["int4"]
        u3 = m["vs_uniform"]["int3"]
        parts = []
        for label, r in m["vs_random"].items():
            h, tr = r["chosen"]["hessian"], r["random"]["best_of_20_by_train_loss"]
            te = r["random"]["best_of_20_by_test_acc"]
            parts.append(
                f"{label}: {100 * h['acc']:.2f} % vs {100 * tr['acc_median']:.2f} % (by train loss; "
                f"Hessian ≥ in {100 * tr['chosen_at_least_as_good']:.0f} % of draws) / "
                f"{100 * te['acc_median']:.2f} % (oracle-selected; "
                f"≥ in {100 * te['chosen_at_least_as_good']:.0f} %)"
            )
        lines += [
            f"- **{name.upper()}** (float {100 * m['float']['acc']:.2f} %): Hessian choice vs median "
            "best-of-20 random — " + "; ".join(parts) + ".",
            f"  At the size of uniform int4 ({u['budget_bits']:.0f} bits): Hessian "
            f"{100 * u['hessian']['acc']:.2f} % "
            f"/ loss {u['hessian']['loss']:.4f} vs uniform {100 * u['uniform']['acc']:.2f} % / "
            f"{u['uniform']['loss']:.4f}; at the size of uniform int3 ({u3['budget_bits']:.0f} bits): "
            "Hessian "
            f"{100 * u3['hessian']['acc']:.2f} % / {u3['hessian']['loss']:.4f} vs uniform int3 "
            f"{100 * u3['uniform']['acc']:.2f} % / {u3['uniform']['loss']:.4f}. Rank correlation of "
            "predicted Δloss with the measured training / test loss over all 256 configurations: "
            f"{rank_corr(preds, train):.3f} / {rank_corr(preds, losses):.3f}.",
        ]
    lines.append("")
    for name, m in res["models"].items():
        draws = next(iter(m["vs_random"].values()))["random"]["draws"]
        lines += [f"## {name.upper()}", ""]
        lines.append(
            f"float: acc {100 * m['float']['acc']:.2f} %, loss {m['float']['loss']:.4f}; "
            f"trained {m['train_steps']} steps in {m['train_s']:.1f} s. Sensitivity time: "
            f"Hutchinson ({m['sensitivity']['probes']} probes) {m['seconds']['hessian']:.1f} s, "
            f"Fisher {m['seconds']['fisher']:.1f} s, direct {m['seconds']['direct']:.1f} s."
        )
        lines += [
            "",
            "| layer | shape | MACs/example | Hutchinson Tr(H) ± se | Tr(H)/n | Fisher Tr |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for layer in m["layers"]:
            h = m["sensitivity"]["hessian_trace"][layer["path"]]
            f = m["sensitivity"]["fisher_trace"][layer["path"]]
            lines.append(
                f"| `{layer['path']}` | {tuple(layer['shape'])} | {layer['macs_per_example']} | "
                f"{h['trace']:.3g} ± {h['stderr']:.2g} | {h['mean']:.3g} | {f['trace']:.3g} |"
            )
        preds = [c["predicted"] for c in m["all_configs"]]
        losses = [c["loss"] for c in m["all_configs"]]
        train = [c["train_loss"] for c in m["all_configs"]]
        lines += [
            "",
            "Spearman rank correlation over all 256 configurations of the predicted Δloss (Hessian Σ½Ω) "
            f"with the measured training-set loss: {rank_corr(preds, train):.3f}; with the test loss: "
            f"{rank_corr(preds, losses):.3f}.",
            "",
            "### Hessian choice vs uniform precision at the same size",
            "",
            "Size is counted in ideal bits (elements × bits + scales, as HAWQ does): the mixed choice "
            "picks from {int2, int4, int8, float} per layer under the uniform configuration's size. "
            "int3/int5/int6 are uniform baselines only (not on the menu; same spec family). qjax stores "
            "int3 in nibbles and int5/int6 in bytes, so their stored bytes equal int4's / int8's.",
            "",
            "| uniform | bits (budget) | stored bytes | uniform acc % / loss | Hessian acc % / loss "
            "| Hessian bits | Hessian bytes | Hessian choice |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for n, r in m["vs_uniform"].items():
            u, h = r["uniform"], r["hessian"]
            lines.append(
                f"| {n} | {r['budget_bits']:.0f} | {u['bytes']:.0f} | "
                f"{100 * u['acc']:.2f} / {u['loss']:.4f} | "
                f"{100 * h['acc']:.2f} / {h['loss']:.4f} | {h['bits']:.0f} | {h['bytes']:.0f} | "
                f"{' '.join(h['choice'])} |"
            )
        lines += [
            "",
            "### Sensitivity-chosen vs best of 20 random configurations",
            "",
            f"Random configurations have a size in [80 %, 100 %] of the budget; {draws} draws of 20. "
            "'by train loss': the draw's best is the one with the lowest training-set loss (a random "
            "search without test data); 'by test acc': the one with the highest test accuracy (an oracle "
            "selection, an upper bound for random search). '≥' columns: fraction of draws in which the "
            "Hessian choice is at least as good (test accuracy, then test loss).",
            "",
            "| budget | bytes | Hessian acc % / loss | Fisher acc % / loss | direct acc % / loss "
            "| best-of-20 by train loss: acc % / loss (median) | Hessian ≥ | best-of-20 by test acc: acc % "
            "(median) | Hessian ≥ | oracle (all configs) acc % / loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in m["vs_random"].items():
            ch, rnd = r["chosen"], r["random"]
            tr, te = rnd["best_of_20_by_train_loss"], rnd["best_of_20_by_test_acc"]
            cell = lambda k, ch=ch: f"{100 * ch[k]['acc']:.2f} / {ch[k]['loss']:.3f}"
            lines.append(
                f"| {label} | {r['budget_bytes']:.0f} | {cell('hessian')} | {cell('fisher')} | "
                f"{cell('direct')} | {100 * tr['acc_median']:.2f} / {tr['loss_median']:.3f} | "
                f"{100 * tr['chosen_at_least_as_good']:.0f} % | {100 * te['acc_median']:.2f} | "
                f"{100 * te['chosen_at_least_as_good']:.0f} % | "
                f"{100 * rnd['oracle']['acc']:.2f} / {rnd['oracle']['loss']:.3f} |"
            )
        lines += [
            "",
            "### Hessian MILP frontier (accuracy vs size)",
            "",
            "| bytes | BOPs/example | pred. Δloss | test acc % | test loss | choice |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for p in m["frontiers"]["hessian"]:
            lines.append(
                f"| {p['bytes']:.0f} | {p['bops']:.3g} | {p['predicted']:.3g} | {100 * p['acc']:.2f} | "
                f"{p['loss']:.4f} | {' '.join(p['choice'])} |"
            )
        d = m["deploy"]
        lines += [
            "",
            f"Deployed (int4-size Hessian choice `{' '.join(d['choice'])}`): integer execution "
            f"(`qjax.quantized`) {100 * d['integer_acc']:.2f} % vs fake-quant "
            f"{100 * d['fake_quant_acc']:.2f} %; "
            f"quantized layer bytes by `qjax.footprint` {d['footprint_bytes_layers']} "
            f"(predicted {d['predicted_bytes']:.0f}).",
            "",
            "Per-layer report of that choice (`Problem.table`):",
            "",
            m["report"],
            f"### Latency on this CPU (batch {m['latency']['batch']}; `qjax.quantized` integer execution)",
            "",
            f"Per-layer microbenchmarks (µs, less the {m['latency_overhead_us']:.0f} µs dispatch overhead "
            "of a jitted call; predicted = overhead + Σ layers): "
            + "; ".join(
                f"`{p.split('/')[1]}` " + ", ".join(f"{k} {v:.0f}" for k, v in row.items())
                for p, row in m["latency_us_per_layer"].items()
            ),
            "",
            f"Measured: whole model, best of 9 interleaved samples (median in the JSON); × float is the "
            f"paired median ratio. Latency limit of the two-budget row: "
            f"{m['latency']['latency_limit_us']:.0f} µs predicted. Rank correlation of predicted and "
            "measured latency over these configurations: "
            f"{m['latency']['rank_corr_predicted_measured']:.2f}.",
            "",
            "| config | predicted µs | measured µs | × float | acc % | bytes | choice |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for n, r in m["latency"]["rows"].items():
            lines.append(
                f"| {n} | {r['predicted_latency_us']:.0f} | {r['measured_us']:.0f} | "
                f"{r['ratio_vs_float']:.2f} | {100 * r['acc']:.2f} | {r['bytes']:.0f} | "
                f"{' '.join(r['choice'])} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = res["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for row, (name, m) in enumerate(models.items()):
        ax = axes[row][0]
        allc = m["all_configs"]
        ax.scatter(
            [c["bytes"] / 1024 for c in allc],
            [100 * c["acc"] for c in allc],
            s=8,
            c="0.75",
            label="all 256 configs",
        )
        mf = m["measured_frontier"]
        ax.step(
            [b / 1024 for b, _ in mf],
            [100 * a for _, a in mf],
            where="post",
            c="0.4",
            lw=1,
            label="measured frontier (oracle)",
        )
        for kind, style in (("hessian", "o-"), ("direct", "s--"), ("fisher", "^:")):
            f = m["frontiers"][kind]
            ax.plot(
                [p["bytes"] / 1024 for p in f],
                [100 * p["acc"] for p in f],
                style,
                ms=4,
                label=f"{kind} MILP frontier",
            )
        for n, u in m["uniform"].items():
            ax.scatter([u["bytes"] / 1024], [100 * u["acc"]], marker="*", s=120, zorder=5)
            ax.annotate(
                f"uniform {n}",
                (u["bytes"] / 1024, 100 * u["acc"]),
                fontsize=8,
                xytext=(4, -10),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("weight bytes of the 4 layers (KiB, log)")
        ax.set_ylabel("test accuracy (%)")
        shown = [p["acc"] for f in m["frontiers"].values() for p in f] + [
            u["acc"] for u in m["uniform"].values()
        ]
        ax.set_ylim(100 * min(shown) - 1.0, 100 * max(c["acc"] for c in allc) + 0.5)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name.upper()}: accuracy vs size")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[row][1]
        rows = m["latency"]["rows"]
        groups = {
            "size frontier": ("o", "C0"),
            "latency frontier": ("s", "C1"),
            "latency <= limit": ("D", "C2"),
        }
        for key, (marker, color) in groups.items():
            pts = [r for n, r in rows.items() if key in n]
            label = "two budgets (bytes, latency)" if key == "latency <= limit" else key
            ax.scatter(
                [r["measured_us"] for r in pts],
                [100 * r["acc"] for r in pts],
                marker=marker,
                c=color,
                label=label,
            )
        for n, r in rows.items():
            if n.startswith(("uniform", "float")):
                ax.scatter([r["measured_us"]], [100 * r["acc"]], marker="*", s=120, c="C3")
                xy = (r["measured_us"], 100 * r["acc"])
                ax.annotate(n.split(" = ")[0], xy, fontsize=7, xytext=(4, -9), textcoords="offset points")
        ax.legend(fontsize=7)
        ax.set_xlabel(f"measured latency, batch {m['latency']['batch']} (µs)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name.upper()}: accuracy vs measured CPU latency (qjax.quantized)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
