"""Automatic mixed precision on scikit-learn digits: Hessian-aware per-layer bit widths
for a CNN and an MLP, against random and uniform configurations.

Setting: a CNN (2 ``nn.Conv`` + 2 Dense, ~40k weights) and an MLP (4 Dense, ~116k weights)
trained on the 1257 training images; every configuration is evaluated on the 540 test
images (accuracy and cross-entropy). Each of the 4 quantizable layers takes one of
{int2, int4, int8} (weight-only, symmetric, one scale per output channel, MSE clip search)
or float32, so each model has 4^4 = 256 configurations: all of them are measured, which
gives the true (measured) frontier and an oracle for every budget.

* Sensitivity on 512 training images: Hutchinson Hessian trace (``--probes`` probes),
  empirical Fisher trace, and the direct single-layer loss change; the prediction for a
  configuration is ``Σ ½ Ω`` with ``Ω = Tr(H)/n · ‖Q(W) − W‖²`` (direct: the summed
  single-layer changes).
* Pareto frontier of accuracy vs size: every point of the exact MILP frontier along bytes.
* Hessian-chosen vs random: at three size budgets (the sizes of ≈3-bit, uniform int4 and
  ≈6-bit configurations), the MILP choice vs the best of 20 random configurations whose
  size is within [80 %, 100 %] of the budget (200 draws of 20; "best" = highest test
  accuracy, ties broken by loss — an oracle selection that favours the random baseline).
* Hessian-chosen vs uniform precision at the same size (uniform int2/int4/int8 sizes).
* Latency: per-layer microbenchmarks at batch 256 on this CPU (``measure_latency``) for
  {int2, int4, int8, w8a8 (int8 weights and dynamic per-token int8 activations), float};
  the MILP frontier along the summed latency, each point deployed with
  ``qjax.quantize_params`` + ``qjax.quantized`` (integer execution) and timed whole-model
  with interleaved sampling. The w8a8 prediction counts only its weight error.

Writes ``autoprec_digits.{json,md,png}`` to ``--out`` (default ``experiments/results``;
``--fast`` defaults to a temporary directory).

Usage::

    .venv/bin/python experiments/autoprec_digits.py          # ~4 minutes on 2 CPU cores
    .venv/bin/python experiments/autoprec_digits.py --fast   # ~1 minute; a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from autoprec_digits_report import markdown, plot
from digits_models import CNN
from distill_common import load, train_plain
from report import RESULTS, machine, rank_corr, write
from timing import time_interleaved

import qjax
from qjax import autoprec


class MLP(nn.Module):
    """64 -> 256 -> 256 -> 128 -> 10."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, name="fc1")(x))
        x = nn.relu(nn.Dense(256, name="fc2")(x))
        x = nn.relu(nn.Dense(128, name="fc3")(x))
        return nn.Dense(10, name="head")(x)


MODELS = {"cnn": (CNN, 1000), "mlp": (MLP, 2000)}
WEIGHT = autoprec.weight_candidates((2, 4, 8))  # int2, int4, int8 (MSE clip), float
W8A8 = autoprec.Candidate(
    "w8a8",
    weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=qjax.calib.mse()),
    act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
)
LATENCY_BATCH = 256


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def configs_table(model, v, problem, data) -> dict[tuple[str, ...], dict[str, float]]:
    """Test accuracy/loss and training-set loss of every weight-only configuration
    (fake-quantized leaves computed once per (layer, candidate))."""
    fq = {}
    leaves = dict(qjax.rules.leaves_with_paths(v))
    for layer in problem.layers:
        for c in problem.candidates:
            leaf = leaves[layer.path]
            fq[(layer.path, c.name)] = leaf if c.weight is None else qjax.fake_quant(leaf, c.weight)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    xs, ys = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    @jax.jit
    def evaluate(p):
        logits = model.apply(p, xt)
        return jnp.mean(jnp.argmax(logits, -1) == yt), xent(logits, yt), xent(model.apply(p, xs), ys)

    out = {}
    for choice in itertools.product(problem.names, repeat=len(problem.layers)):
        by_path = dict(zip(problem.paths, choice))
        p = qjax.rules.map_with_path(lambda path, leaf, m=by_path: fq.get((path, m.get(path)), leaf), v)
        acc, loss, train_loss = evaluate(p)
        out[choice] = {"acc": float(acc), "loss": float(loss), "train_loss": float(train_loss)}
    return out


def bytes_of(problem, choice) -> float:
    return problem.totals(choice)[1]["bytes"]


def frontier_rows(problem, front, table) -> list[dict[str, Any]]:
    rows = []
    for sol in front:
        choice = tuple(problem.names[j] for j in sol.choice)
        rows.append(
            {
                "choice": list(choice),
                "bytes": sol.costs["bytes"],
                "bops": sol.costs["bops"],
                "predicted": sol.objective,
                "acc": table[choice]["acc"],
                "loss": table[choice]["loss"],
            }
        )
    return rows


def measured_frontier(table, problem) -> list[tuple[float, float]]:
    """(bytes, best accuracy among configurations of at most that size): the oracle."""
    pts = sorted((bytes_of(problem, c), r["acc"]) for c, r in table.items())
    out, best = [], -1.0
    for b, a in pts:
        if a > best:
            out.append((b, a))
            best = a
    return out


def uniform_config(model, v, problem, bits: int, data) -> dict[str, float]:
    """Ideal bits, bytes and test accuracy/loss with every layer at int{bits} (the same spec
    family as the menu)."""
    cand = autoprec.weight_candidates((bits,), include_float=False)[0]
    policy = qjax.Policy([qjax.Rule(re.escape(layer.path), weight=cand.weight) for layer in problem.layers])
    logits = model.apply(qjax.fake_quant_params(v, policy), jnp.asarray(data.x_test))
    y = jnp.asarray(data.y_test)
    return {
        "acc": float(jnp.mean(jnp.argmax(logits, -1) == y)),
        "loss": float(xent(logits, y)),
        "bits": float(sum(autoprec.layer_bits(layer, cand) for layer in problem.layers)),
        "bytes": float(sum(autoprec.layer_bytes(layer, cand) for layer in problem.layers)),
    }


def better(a: dict, b: dict) -> bool:
    """a at least as good as b: higher accuracy, or equal accuracy and loss not worse."""
    return a["acc"] > b["acc"] or (a["acc"] == b["acc"] and a["loss"] <= b["loss"])


def random_baseline(table, problem, budget, chosen, draws, rng) -> dict[str, Any]:
    """Best of 20 random configurations with size in [80 %, 100 %] of ``budget``, over
    ``draws`` draws: selected by training loss (what a random search without test data
    would do) and, as an upper bound, by test accuracy (an oracle selection)."""
    eligible = [c for c in table if 0.8 * budget <= bytes_of(problem, c) <= budget]
    k = min(20, len(eligible))
    by_train, by_test = [], []
    for _ in range(draws):
        pick = [eligible[i] for i in rng.choice(len(eligible), k, replace=False)]
        by_train.append(min(pick, key=lambda c: table[c]["train_loss"]))
        by_test.append(max(pick, key=lambda c: (table[c]["acc"], -table[c]["loss"])))
    within = [c for c in table if bytes_of(problem, c) <= budget]
    oracle = max(within, key=lambda c: (table[c]["acc"], -table[c]["loss"]))

    def summary(best):
        return {
            "acc_median": float(np.median([table[c]["acc"] for c in best])),
            "loss_median": float(np.median([table[c]["loss"] for c in best])),
            "chosen_at_least_as_good": float(np.mean([better(table[chosen], table[c]) for c in best])),
            "chosen_acc_at_least": float(np.mean([table[chosen]["acc"] >= table[c]["acc"] for c in best])),
        }

    return {
        "eligible": len(eligible),
        "sample": k,
        "draws": draws,
        "best_of_20_by_train_loss": summary(by_train),
        "best_of_20_by_test_acc": summary(by_test),
        "random_acc_median": float(np.median([table[c]["acc"] for c in eligible])),
        "oracle": {"choice": list(oracle), **table[oracle], "bytes": bytes_of(problem, oracle)},
    }


def latency_study(model, v, prob, overhead, size_front, x_batch, x_test, y_test, fast) -> dict[str, Any]:
    """Measured whole-model latency (integer execution) of: uniform configurations, points
    of the Hessian size frontier, the MILP frontier along the summed per-layer latency, and
    the choice under two budget rows (size of uniform int4 and a latency limit)."""
    names = prob.names
    uniform = {n: tuple([n] * len(prob.layers)) for n in names}
    labels: dict[tuple[str, ...], list[str]] = {}

    def add(label, choice):
        labels.setdefault(tuple(choice), []).append(label)

    add("float", uniform["float"])
    for n in ("int8", "w8a8", "int4", "int2"):
        add(f"uniform {n}", uniform[n])
    step = max(1, len(size_front) // (3 if fast else 8))
    for i in range(0, len(size_front), step):
        add(f"size frontier {i}", size_front[i]["choice"])
    lat_front = autoprec.pareto(prob.objective, prob.costs, "latency", points=4 if fast else 10)
    for i, sol in enumerate(lat_front):
        add(f"latency frontier {i}", [names[j] for j in sol.choice])
    b4 = prob.totals(uniform["int4"])[1]["bytes"]
    size_only = autoprec.solve(prob.objective, prob.costs, {"bytes": b4})
    fastest = autoprec.solve(prob.costs["latency"], prob.costs, {"bytes": b4})
    limit = 0.5 * (size_only.costs["latency"] + fastest.costs["latency"])
    both = autoprec.solve(prob.objective, prob.costs, {"bytes": b4, "latency": limit})
    add("bytes <= int4 size", [names[j] for j in size_only.choice])
    add("bytes <= int4 size & latency <= limit", [names[j] for j in both.choice])
    xb, xt, yt = jnp.asarray(x_batch), jnp.asarray(x_test), jnp.asarray(y_test)
    fns, rows = {}, {}
    for choice, labs in labels.items():
        name = " = ".join(labs)
        policy = prob.policy(choice)
        q = qjax.quantize_params(v, policy)
        run = jax.jit(qjax.quantized(model.apply, policy))
        logits = run(q, xt)
        fns[name] = lambda run=run, q=q: run(q, xb)
        pred, tot = prob.totals(choice)
        rows[name] = {
            "choice": list(choice),
            "predicted_latency_us": 1e6 * (tot["latency"] + overhead),
            "bytes": tot["bytes"],
            "predicted": pred,
            "acc": float(jnp.mean(jnp.argmax(logits, -1) == yt)),
            "loss": float(xent(logits, yt)),
        }
    ref = next(n for n in rows if n.startswith("float"))
    timing = time_interleaved(fns, repeats=5 if fast else 9, target_s=0.02, reference=ref)
    for name, t in timing.items():
        rows[name]["measured_us"] = 1e6 * t["min_s"]
        rows[name]["measured_median_us"] = 1e6 * t["median_s"]
        rows[name]["ratio_vs_float"] = t["ratio"]
    return {
        "batch": LATENCY_BATCH,
        "rows": rows,
        "latency_limit_us": 1e6 * (limit + overhead),
        "rank_corr_predicted_measured": rank_corr(
            [r["predicted_latency_us"] for r in rows.values()], [r["measured_us"] for r in rows.values()]
        ),
    }


def run_model(name: str, data, args, rng) -> dict[str, Any]:
    cls, steps = MODELS[name]
    model = cls()
    t0 = time.perf_counter()
    steps = steps if not args.fast else steps // 4
    v = train_plain(model, data.x_train, data.y_train, steps=steps, batch=64, lr=2e-3, seed=args.seed)
    t_train = time.perf_counter() - t0
    xs, ys = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n_batch = 2 if args.fast else 4
    batches = [(xs[i * 128 : (i + 1) * 128], ys[i * 128 : (i + 1) * 128]) for i in range(n_batch)]
    loss = lambda p, x, y: xent(model.apply(p, x), y)
    times, sens = {}, {}
    t = time.perf_counter()
    sens["hessian"] = autoprec.hutchinson_trace(
        loss, v, jax.random.key(args.seed), args.probes, batches=batches, paths=r".*/kernel", chunk=16
    )
    times["hessian"] = time.perf_counter() - t
    t = time.perf_counter()
    sens["fisher"] = autoprec.fisher_trace(loss, v, batches, paths=r".*/kernel")
    times["fisher"] = time.perf_counter() - t
    t = time.perf_counter()
    sens["direct"] = autoprec.direct_sensitivity(loss, v, WEIGHT, batches=batches, paths=r".*/kernel")
    times["direct"] = time.perf_counter() - t
    example = (data.x_test[:1],)
    problems = {k: autoprec.build_problem(model.apply, v, example, WEIGHT, s) for k, s in sens.items()}
    hess = problems["hessian"]
    t = time.perf_counter()
    table = configs_table(model, v, hess, data)
    t_table = time.perf_counter() - t
    float_cfg = tuple(["float"] * len(hess.layers))
    uniform = {n: tuple([n] * len(hess.layers)) for n in hess.names}
    size = {n: bytes_of(hess, c) for n, c in uniform.items()}

    fronts = {
        k: autoprec.pareto(p.objective, p.costs, "bytes", points=1000, exact=True)
        for k, p in problems.items()
    }

    def pick(kind, budget, cost="bytes"):
        p = problems[kind]
        return tuple(p.names[j] for j in autoprec.solve(p.objective, p.costs, {cost: budget}).choice)

    budgets = {
        "~3 bits": (size["int2"] + size["int4"]) / 2,
        "int4 size": size["int4"],
        "~6 bits": (size["int4"] + size["int8"]) / 2,
    }
    vs_random = {}
    for label, b in budgets.items():
        chosen = {k: pick(k, b) for k in problems}
        vs_random[label] = {
            "budget_bytes": b,
            "chosen": {
                k: {"choice": list(c), **table[c], "bytes": bytes_of(hess, c)} for k, c in chosen.items()
            },
            "random": random_baseline(table, hess, b, chosen["hessian"], 50 if args.fast else 200, rng),
        }
    vs_uniform = {}
    for n in ("int2", "int3", "int4", "int5", "int6", "int8"):
        # budget: the uniform configuration's ideal size in bits (HAWQ's accounting); int3/5/6
        # are not on the menu: the mixed choice uses {int2, int4, int8, float}
        u = uniform_config(model, v, hess, int(n[3:]), data)
        c = pick("hessian", u["bits"], "bits")
        tot = hess.totals(c)[1]
        vs_uniform[n] = {
            "budget_bits": u["bits"],
            "uniform": u,
            "hessian": {"choice": list(c), **table[c], "bits": tot["bits"], "bytes": tot["bytes"]},
        }
    # deploy check: the int4-size Hessian choice, integer execution vs fake quantization
    c4 = pick("hessian", size["int4"])
    pol = hess.policy(c4)
    q = qjax.quantize_params(v, pol)
    logits = jax.jit(qjax.quantized(model.apply, pol))(q, jnp.asarray(data.x_test))
    deploy = {
        "choice": list(c4),
        "integer_acc": float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data.y_test))),
        "fake_quant_acc": table[c4]["acc"],
        "footprint_bytes_layers": sum(
            f.nbytes for f in qjax.footprint(q).leaves if f.path in set(hess.paths)
        ),
        "predicted_bytes": bytes_of(hess, c4),
    }

    # latency on this CPU
    hw = autoprec.detect_hardware()
    cands = (*WEIGHT[:-1], W8A8, WEIGHT[-1])
    t = time.perf_counter()
    lat_layers = autoprec.find_layers(model.apply, v, data.x_test[:LATENCY_BATCH])
    lat = autoprec.measure_latency(
        lat_layers, cands, cache=args.latency_cache, repeats=3 if args.fast else 9, target_s=0.01
    )
    times["latency_table"] = time.perf_counter() - t
    w8_sens = dict(sens["hessian"])
    problem_w8 = autoprec.build_problem(model.apply, v, example, cands, w8_sens, hardware=hw, latency=lat)
    t = time.perf_counter()
    lat_study = latency_study(
        model,
        v,
        problem_w8,
        lat.overhead_s,
        frontier_rows(hess, fronts["hessian"], table),
        data.x_test[:LATENCY_BATCH],
        data.x_test,
        data.y_test,
        args.fast,
    )
    times["latency_study"] = time.perf_counter() - t
    return {
        "train_steps": steps,
        "train_s": t_train,
        "float": table[float_cfg],
        "layers": [
            {"path": layer.path, "shape": list(layer.shape), "macs_per_example": layer.macs}
            for layer in hess.layers
        ],
        "sensitivity": {
            "hessian_trace": {
                p: {"trace": e.trace, "stderr": e.stderr, "mean": e.mean} for p, e in sens["hessian"].items()
            },
            "fisher_trace": {
                p: {"trace": e.trace, "stderr": e.stderr, "mean": e.mean} for p, e in sens["fisher"].items()
            },
            "direct": sens["direct"],
            "probes": args.probes,
            "examples": n_batch * 128,
        },
        "seconds": {**times, "train": t_train, "all_configs": t_table},
        "sizes_bytes": size,
        "uniform": {
            n: {**table[c], "bytes": size[n], "bits": hess.totals(c)[1]["bits"]} for n, c in uniform.items()
        },
        "frontiers": {k: frontier_rows(problems[k], f, table) for k, f in fronts.items()},
        "measured_frontier": measured_frontier(table, hess),
        "all_configs": [
            {"choice": list(c), "bytes": bytes_of(hess, c), **r, "predicted": hess.totals(c)[0]}
            for c, r in table.items()
        ],
        "vs_random": vs_random,
        "vs_uniform": vs_uniform,
        "deploy": deploy,
        "hardware": {"name": hw.name, "native": dict(hw.native)},
        "latency_us_per_layer": {p: {k: 1e6 * s for k, s in row.items()} for p, row in lat.seconds.items()},
        "latency_overhead_us": 1e6 * lat.overhead_s,
        "latency": lat_study,
        "report": problems["hessian"].table(c4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="short training, few probes and draws (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--probes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--latency-cache", type=Path, default=None, help="JSON cache of per-layer microbenchmarks"
    )
    args = ap.parse_args()
    if args.probes is None:
        args.probes = 16 if args.fast else 128
    out = args.out or (Path(tempfile.mkdtemp(prefix="autoprec_digits_")) if args.fast else RESULTS)
    t0 = time.perf_counter()
    env = machine()
    data = load(args.seed)
    rng = np.random.default_rng(args.seed)
    res = {"machine": env, "fast": args.fast, "seed": args.seed, "models": {}}
    for name in MODELS:
        res["models"][name] = run_model(name, data, args, rng)
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    res["total_s"] = time.perf_counter() - t0
    res["load_avg_end"] = os.getloadavg()[0]
    write("autoprec_digits", res, markdown(res), out)
    plot(res, out / "autoprec_digits.png")
    print(f"wrote {out}/autoprec_digits.{{json,md,png}} in {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
