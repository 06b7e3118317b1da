"""Automatic mixed precision on the real all-MiniLM-L6-v2: Hessian-aware per-layer formats
for the 36 linear kernels, with the embedding cosine to the float model as the metric.

Setting: ``qjax.models.load_minilm()`` (float32). Quantizable layers: the 36 linear
kernels (``linear_paths``; embeddings, LayerNorms and biases stay float32). Formats:
int2 g128 / int4 g128 (symmetric, one scale per 128 input rows × output channel) and
int8 per output channel, all weight-only with MSE clip search, or float32. Two menus
are searched: {int4, int8, float} and {int2, int4, int8, float} (``--no-int2``: only the
first). Sentences: ``experiments/data/sentences.txt`` split as in ``ptq_minilm.py``
(every 3rd sentence for calibration, the rest for evaluation).

* Loss (distillation against the float model): ``L(θ) = mean_s 1 − cos(e_θ(s), e_float(s))``.
  At ``θ = θ_float`` it is 0 with a zero gradient, so its Hessian there is exactly the
  Gauss-Newton matrix ``Jᵀ H_cos J`` (the residual term vanishes). Its empirical Fisher is
  identically 0 (every per-example gradient is 0), so ``sensitivity="fisher"`` cannot be
  used at the float point.
* Sensitivity: ``autoprec.hutchinson_trace`` of that loss on the first ``--hess-sentences``
  calibration sentences (one batch) with ``--probes`` Rademacher probes; prediction
  ``Σ ½ Tr(H_l)/n_l ‖Q(W_l) − W_l‖²``, in the loss's own units (≈ 1 − mean cos). Also the
  measured single-layer change (``direct_sensitivity``) on the same sentences.
* Search: ``autoprec.search(..., sensitivity=<the traces>)``: its Pareto frontier along
  bytes (``--points`` evenly spaced budgets; those up to twice the int8 size are measured)
  and budgeted choices (``search(budgets=...)`` is ``autoprec.solve`` on its problem) at
  the sizes of uniform int8, ~6 and ~5 bits per weight, uniform int4 and ~3 bits. Every
  configuration is measured by fake quantization on the evaluation sentences (mean/min
  cosine, Spearman of the pairwise-similarity matrices) and on all calibration sentences
  (the loss). Also the accuracy-driven mode (``max_drop`` on the calibration cosine).
* Baselines at equal size: uniform int8 / int4, and ``--pool`` random configurations of
  the same menu with size within ±2 % of the budget; the best of them is picked by
  calibration loss (a random search without evaluation data) or by evaluation cosine (an
  oracle selection that favours random).
* Deployment: selected configurations are quantized (``qjax.quantize_params``) and run
  with integer execution (``qjax.quantized``) on the evaluation sentences padded to 128
  tokens, whole-model bytes are counted, and latency is timed on one batch of 32 × 128
  tokens (interleaved, paired against float).

Writes ``autoprec_minilm.{json,md,png}`` to ``--out`` (default ``experiments/results``;
``--fast`` defaults to a temporary directory).

Usage::

    .venv/bin/python experiments/autoprec_minilm.py          # ~10 minutes on 2 CPU cores
    .venv/bin/python experiments/autoprec_minilm.py --fast   # ~2 minutes; a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ptq_minilm import BATCH, SENTENCES, SEQ, metrics, nbytes
from report import RESULTS, machine, write
from timing import time_interleaved

import qjax
from qjax import autoprec
from qjax.models import linear_paths, load_minilm, tokenize

KEYS = ("input_ids", "attention_mask", "token_type_ids")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", flush=True)


def candidates() -> tuple[autoprec.Candidate, ...]:
    """int2 g128, int4 g128, int8 per channel (MSE clip), float."""
    mse = qjax.calib.mse()

    def g128(bits):
        return qjax.QuantSpec(f"int{bits}", channel_axes=(-1,), group_size=128, group_axis=0, calibration=mse)

    return (
        autoprec.Candidate("int2", weight=g128(2)),
        autoprec.Candidate("int4", weight=g128(4)),
        autoprec.Candidate("int8", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=mse)),
        autoprec.FLOAT,
    )


def fixed_batches(tok, sentences: list[str], size: int, length: int) -> list[tuple]:
    """Batches of exactly ``size`` sentences padded to ``length`` tokens (one compiled
    shape); the last batch is filled up with repeated sentences (trim outputs)."""
    s = list(sentences)
    while len(s) % size:
        s += sentences[: size - len(s) % size]
    out = []
    for i in range(0, len(s), size):
        b = tokenize(tok, s[i : i + size], max_length=length, padding="max_length")
        out.append(tuple(jnp.asarray(b[k]) for k in KEYS))
    return out


def longest(tok, sentences: list[str]) -> int:
    return int(tokenize(tok, sentences, max_length=SEQ)["input_ids"].shape[1])


def embed(fn, params, data: list[tuple], n: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(params, *b)) for b in data])[:n]


def cos_loss(model):
    """``mean 1 − cos(e_params, e_ref)`` over a batch (``ref``: the float embeddings)."""

    def loss(params, ids, mask, types, ref):
        e = model.apply(params, ids, mask, types)
        cos = jnp.sum(e * ref, -1) / (jnp.linalg.norm(e, axis=-1) * jnp.linalg.norm(ref, axis=-1))
        return jnp.mean(1.0 - cos)

    return loss


class Evaluator:
    """Measures configurations (candidate name per layer, in ``paths`` order) by fake
    quantization: the loss on the calibration sentences and the metrics on the evaluation
    sentences. Fake-quantized leaves are computed once per (layer, candidate); results are
    cached per configuration."""

    def __init__(self, model, variables, paths, cands, ev, cal):
        leaves = dict(qjax.rules.leaves_with_paths(variables))
        self.paths, self.variables, self.ev, self.cal = tuple(paths), variables, ev, cal
        self.fq = {
            (p, c.name): jax.block_until_ready(qjax.fake_quant(leaves[p], c.weight))
            for p in paths
            for c in cands
            if c.weight is not None
        }
        self.fn = jax.jit(model.apply)
        self.calib_cache: dict[tuple[str, ...], float] = {}
        self.eval_cache: dict[tuple[str, ...], dict[str, float]] = {}

    def _params(self, choice):
        by_path = dict(zip(self.paths, choice))
        return qjax.rules.map_with_path(lambda p, x: self.fq.get((p, by_path.get(p)), x), self.variables)

    def calib_loss(self, choice) -> float:
        choice = tuple(choice)
        if choice not in self.calib_cache:
            data, n, ref = self.cal
            self.calib_cache[choice] = (
                1.0 - metrics(embed(self.fn, self._params(choice), data, n), ref)["mean_cos"]
            )
        return self.calib_cache[choice]

    def row(self, problem, choice) -> dict[str, Any]:
        """Metrics, calibration loss, predicted Δloss and bytes of a configuration."""
        choice = tuple(choice)
        if choice not in self.eval_cache:
            data, n, ref = self.ev
            self.eval_cache[choice] = metrics(embed(self.fn, self._params(choice), data, n), ref)
        pred, tot = problem.totals(choice)
        return {
            "choice": list(choice),
            **self.eval_cache[choice],
            "calib_loss": self.calib_loss(choice),
            "predicted": pred,
            "bytes": tot["bytes"],
        }


def choice_of(problem, policy: qjax.Policy) -> tuple[str, ...]:
    """The configuration a search policy encodes (its weight spec per layer)."""
    return tuple(
        next(c.name for c in problem.candidates if c.weight == policy.weight_spec(p)) for p in problem.paths
    )


def random_pool(problem, budget: float, n: int, rng, tol: float = 0.02) -> list[tuple[str, ...]]:
    """Up to ``n`` distinct random configurations with bytes within ``±tol`` of ``budget``:
    each draw picks per-layer candidate probabilities from a flat Dirichlet, then every
    layer's candidate independently (rejection sampling on the size)."""
    cost = np.asarray(problem.costs["bytes"])
    n_layers, k = cost.shape
    rows = np.arange(n_layers)
    out: dict[tuple[int, ...], None] = {}
    for _ in range(100):
        p = rng.dirichlet(np.ones(k), size=20000)
        u = rng.random((20000, n_layers))
        idx = (u[:, :, None] > np.cumsum(p, 1)[:, None, :]).sum(-1).clip(max=k - 1)
        tot = cost[rows, idx].sum(1)
        for i in np.flatnonzero(np.abs(tot / budget - 1) <= tol):
            out[tuple(int(j) for j in idx[i])] = None
            if len(out) >= n:
                return [tuple(problem.names[j] for j in c) for c in out]
    return [tuple(problem.names[j] for j in c) for c in out]


def random_summary(pool: list[dict], chosen: dict) -> dict[str, Any]:
    """Best of the pool by calibration loss (fair) and by evaluation cosine (oracle)."""
    keys = ("choice", "mean_cos", "min_cos", "spearman", "bytes", "predicted", "calib_loss")
    by_cal = min(pool, key=lambda r: r["calib_loss"])
    by_eval = max(pool, key=lambda r: r["mean_cos"])
    return {
        "n": len(pool),
        "by_calib_loss": {k: by_cal[k] for k in keys},
        "by_eval_cos": {k: by_eval[k] for k in keys},
        "median_cos": float(np.median([r["mean_cos"] for r in pool])),
        "bytes_range": [min(r["bytes"] for r in pool), max(r["bytes"] for r in pool)],
        "hessian_beats_fraction": float(np.mean([chosen["mean_cos"] >= r["mean_cos"] for r in pool])),
    }


def rank_corr(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def counts(choice) -> str:
    names = [c for c in ("int2", "int4", "int8", "float") if c in choice]
    return " ".join(f"{n}×{list(choice).count(n)}" for n in names)


def study(name, cands, model, variables, example, pats, trace, direct, evaluator, u_bytes, args, rng):
    """Search, frontier, budgeted choices and baselines for one menu of candidates."""
    t = time.perf_counter()
    budget = u_bytes["int4"] if "int2" in [c.name for c in cands] else u_bytes["int8"]
    res = autoprec.search(
        model.apply,
        variables,
        example,
        candidates=cands,
        sensitivity=trace,
        budgets={"bytes": budget},
        points=args.points,
        paths=pats,
    )
    prob = res.problem
    if list(prob.paths) != linear_paths():
        raise AssertionError(f"layers found: {prob.paths}")
    dprob = autoprec.build_problem(model.apply, variables, example, cands, direct, paths=pats)
    search_s = time.perf_counter() - t
    names = prob.names
    uniform = {n: evaluator.row(prob, [n] * len(prob.paths)) for n in names}
    frontier = [evaluator.row(prob, p.choice) for p in res.pareto if p.costs["bytes"] <= 2 * u_bytes["int8"]]
    log(f"[{name}] search {search_s:.0f} s; measured {len(frontier)} of {len(res.pareto)} frontier points")

    b4, b8 = u_bytes["int4"], u_bytes["int8"]
    budgets = {"int8 size": b8, "~6 bits": b4 + 0.5 * (b8 - b4), "~5 bits": b4 + 0.25 * (b8 - b4)}
    if "int2" in names:
        budgets |= {"int4 size": b4, "~3 bits": (u_bytes["int2"] + b4) / 2}
    at_budget = {}
    for label, b in budgets.items():
        h = tuple(names[j] for j in autoprec.solve(prob.objective, prob.costs, {"bytes": b}).choice)
        d = tuple(names[j] for j in autoprec.solve(dprob.objective, dprob.costs, {"bytes": b}).choice)
        if b == budget and h != tuple(res.choice[p] for p in prob.paths):
            raise AssertionError("search(budgets=...) and solve disagree")
        hr, dr = evaluator.row(prob, h), evaluator.row(prob, d)
        dr["predicted_direct"] = dprob.totals(d)[0]
        pool = [evaluator.row(prob, c) for c in random_pool(prob, b, args.pool, rng)]
        rnd = random_summary(pool, hr) if pool else None
        at_budget[label] = {
            "budget_bytes": b,
            "hessian": hr,
            "direct": dr,
            "random": rnd,
            "random_configs": pool,
        }
        msg = f"[{name}] {label} ({b:,.0f} B): Hessian {hr['mean_cos']:.5f} ({counts(h)}), "
        msg += f"direct {dr['mean_cos']:.5f}"
        if rnd:
            msg += (
                f", best of {rnd['n']} random by calib loss {rnd['by_calib_loss']['mean_cos']:.5f} / by eval "
                f"{rnd['by_eval_cos']['mean_cos']:.5f}"
            )
        log(msg)

    t = time.perf_counter()
    acc = autoprec.search(
        model.apply,
        variables,
        example,
        candidates=cands,
        sensitivity=trace,
        points=args.points,
        paths=pats,
        eval_fn=lambda pol: 1.0 - evaluator.calib_loss(choice_of(prob, pol)),
        max_drop=args.max_drop,
    )
    acc_row = {
        **evaluator.row(prob, [acc.choice[p] for p in prob.paths]),
        "met": acc.met,
        "measured_configs": len(acc.evaluations),
        "seconds": time.perf_counter() - t,
    }
    log(
        f"[{name}] max_drop {args.max_drop} on calibration cos: {acc_row['bytes']:,.0f} B, eval mean cos "
        f"{acc_row['mean_cos']:.5f} after {acc_row['measured_configs']} calibration measurements"
    )
    single = [
        (float(prob.objective[i, j]), float(dprob.objective[i, j]))
        for i in range(len(prob.paths))
        for j, n in enumerate(names)
        if n != "float"
    ]
    measured = (
        list(uniform.values()) + frontier + [r for b in at_budget.values() for r in b["random_configs"]]
    )
    measured = list({tuple(r["choice"]): r for r in measured}.values())
    return {
        "candidates": list(names),
        "uniform": uniform,
        "frontier": frontier,
        "frontier_points": len(res.pareto),
        "budgets": at_budget,
        "accuracy_driven": acc_row,
        "objective": prob.objective.tolist(),
        "direct_objective": dprob.objective.tolist(),
        "rank_corr": {
            "configs": len(measured),
            "predicted_vs_calib_loss": rank_corr(
                [r["predicted"] for r in measured], [r["calib_loss"] for r in measured]
            ),
            "predicted_vs_eval_1mcos": rank_corr(
                [r["predicted"] for r in measured], [1 - r["mean_cos"] for r in measured]
            ),
            "single_layer_hessian_vs_direct": rank_corr([a for a, _ in single], [b for _, b in single]),
            "median_predicted_over_calib_loss": float(
                np.median([r["predicted"] / r["calib_loss"] for r in measured if r["calib_loss"] > 0])
            ),
        },
        "search_s": search_s,
        "report": res.report(),
    }, prob


def deploy(model, variables, problem, configs: dict[str, tuple], ev128, n_eval, bench, args):
    """Integer execution (``qjax.quantized``) of each configuration: metrics on the
    evaluation sentences (padded to 128 tokens), whole-model bytes, latency on
    ``bench`` (32 × 128 tokens). The first configuration must be float."""
    rows, fns, ref = {}, {}, None
    for name, choice in configs.items():
        policy = problem.policy(choice)
        qp = jax.block_until_ready(qjax.quantize_params(variables, policy))
        fn = jax.jit(qjax.quantized(model.apply, policy))
        emb = embed(fn, qp, ev128, n_eval)
        ref = emb if ref is None else ref
        rows[name] = {"choice": list(choice), **metrics(emb, ref), "model_bytes": nbytes(qp)}
        fns[name] = lambda fn=fn, qp=qp: fn(qp, *bench)
        log(f"  deployed {name}: mean cos {rows[name]['mean_cos']:.5f}, {rows[name]['model_bytes']:,} B")
    if args.no_latency:
        return rows
    lat = time_interleaved(
        fns, repeats=3 if args.fast else 5, target_s=0.2 if args.fast else 0.5, reference=next(iter(configs))
    )
    for name, r in lat.items():
        rows[name]["latency_ms"] = 1e3 * r["median_s"]
        rows[name]["latency_vs_float"] = r["ratio"]
    return rows


def run(args) -> dict[str, Any]:
    env = machine()
    rng = np.random.default_rng(args.seed)
    model, variables, tok = load_minilm()
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib_s = sentences[::3]
    eval_s = [s for i, s in enumerate(sentences) if i % 3]
    if args.fast:
        calib_s, eval_s = calib_s[:16], eval_s[:48]
    hess_s = calib_s[: args.hess_sentences]
    fn = jax.jit(model.apply)
    ev = fixed_batches(tok, eval_s, BATCH, longest(tok, eval_s))
    cal = fixed_batches(tok, calib_s, BATCH, longest(tok, calib_s))
    ev_ref, cal_ref = embed(fn, variables, ev, len(eval_s)), embed(fn, variables, cal, len(calib_s))
    hb = tokenize(tok, hess_s, max_length=SEQ)
    hess_in = tuple(jnp.asarray(hb[k]) for k in KEYS)
    hess_batch = (*hess_in, fn(variables, *hess_in))
    log(
        f"loaded MiniLM; {len(eval_s)} eval / {len(calib_s)} calibration sentences; Hessian batch "
        f"{hb['input_ids'].shape}"
    )
    loss = cos_loss(model)
    paths = linear_paths()
    pats = [re.escape(p) for p in paths]
    cands = candidates()
    times: dict[str, float] = {}

    t = time.perf_counter()
    trace = autoprec.hutchinson_trace(
        loss, variables, jax.random.key(args.seed), args.probes, batches=[hess_batch], paths=pats, chunk=8
    )
    times["hutchinson"] = time.perf_counter() - t
    log(f"Hutchinson trace: {args.probes} probes in {times['hutchinson']:.0f} s")
    t = time.perf_counter()
    direct = autoprec.direct_sensitivity(loss, variables, cands, batches=[hess_batch], paths=pats)
    times["direct"] = time.perf_counter() - t
    log(f"direct single-layer sensitivity in {times['direct']:.0f} s")

    example = tuple(a[:1] for a in ev[0])
    layers = autoprec.find_layers(model.apply, variables, *example, paths=pats)
    u_bytes = {c.name: float(sum(autoprec.layer_bytes(layer, c) for layer in layers)) for c in cands}
    t = time.perf_counter()
    evaluator = Evaluator(
        model, variables, paths, cands, (ev, len(eval_s), ev_ref), (cal, len(calib_s), cal_ref)
    )
    menus = {"int4/int8/float": cands[1:]}
    if not args.no_int2:
        menus["int2/int4/int8/float"] = cands
    studies, prob = {}, None
    for name, menu in menus.items():
        studies[name], prob = study(
            name, menu, model, variables, example, pats, trace, direct, evaluator, u_bytes, args, rng
        )
    times["search_and_measure"] = time.perf_counter() - t
    n_measured = len(evaluator.eval_cache)
    log(
        f"{n_measured} configurations measured ({len(evaluator.calib_cache)} on calibration) in "
        f"{times['search_and_measure']:.0f} s"
    )

    # deployment (integer execution) and latency; the last menu's problem has every candidate
    t = time.perf_counter()
    labels: dict[tuple[str, ...], list[str]] = {}
    for n in ("float", "int8", "int4"):
        labels.setdefault(tuple([n] * len(paths)), []).append(f"uniform {n}" if n != "float" else "float")
    for name, s in studies.items():
        for label in ("~6 bits", "int4 size", "~3 bits"):
            if label in s["budgets"]:
                labels.setdefault(tuple(s["budgets"][label]["hessian"]["choice"]), []).append(
                    f"Hessian [{name}] @ {label}"
                )
    configs = {" = ".join(v): k for k, v in labels.items()}
    ev128 = fixed_batches(tok, eval_s, BATCH, SEQ)
    bench = fixed_batches(tok, (eval_s * 4)[:BATCH], BATCH, SEQ)[0]
    deployed = deploy(model, variables, prob, configs, ev128, len(eval_s), bench, args)
    times["deploy"] = time.perf_counter() - t
    log(f"deployment and latency in {times['deploy']:.0f} s")

    layers_info = [
        {
            "path": layer.path,
            "shape": list(layer.shape),
            "macs_per_sentence": layer.macs,
            "trace": trace[layer.path].trace,
            "stderr": trace[layer.path].stderr,
            "mean": trace[layer.path].mean,
            "direct": direct[layer.path],
        }
        for layer in layers
    ]
    return {
        "machine": env,
        "fast": args.fast,
        "seed": args.seed,
        "settings": {
            "probes": args.probes,
            "hess_sentences": len(hess_s),
            "hess_tokens": list(hb["input_ids"].shape),
            "eval_sentences": len(eval_s),
            "calib_sentences": len(calib_s),
            "points": args.points,
            "pool": args.pool,
            "max_drop": args.max_drop,
        },
        "float_layer_bytes": u_bytes["float"],
        "float_model_bytes": deployed["float"]["model_bytes"],
        "uniform_bytes": u_bytes,
        "weights": sum(layer.size for layer in layers),
        "menus": studies,
        "deployed": deployed,
        "layers": layers_info,
        "configs_measured": n_measured,
        "seconds": times,
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="few sentences, probes, configurations (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 64; --fast 4)")
    ap.add_argument("--hess-sentences", type=int, default=None, help="default 32; --fast 8")
    ap.add_argument("--points", type=int, default=None, help="frontier budgets (default 40; --fast 8)")
    ap.add_argument("--pool", type=int, default=None, help="random configurations per budget (default 20)")
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--no-int2", action="store_true", help="search only the {int4, int8, float} menu")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md/.png from the .json in --out")
    args = ap.parse_args()
    if args.render:
        out = args.out or RESULTS
        res = json.loads((out / "autoprec_minilm.json").read_text())
        (out / "autoprec_minilm.md").write_text(markdown(res))
        plot(res, out / "autoprec_minilm.png")
        return
    fast = args.fast
    args.probes = args.probes or (4 if fast else 64)
    args.hess_sentences = args.hess_sentences or (8 if fast else 32)
    args.points = args.points or (8 if fast else 40)
    args.pool = args.pool or (5 if fast else 20)
    out = args.out or (Path(tempfile.mkdtemp(prefix="autoprec_minilm_")) if fast else RESULTS)
    res = run(args)
    res["total_s"] = time.perf_counter() - T0
    res["load_avg_end"] = os.getloadavg()[0]
    md = markdown(res)
    write("autoprec_minilm", res, md, out)
    plot(res, out / "autoprec_minilm.png")
    print(md)
    log(f"wrote {out}/autoprec_minilm.{{json,md,png}}")


if __name__ == "__main__":
    main()
