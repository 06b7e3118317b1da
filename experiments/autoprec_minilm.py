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
from autoprec_minilm_report import counts, markdown, plot
from ptq_minilm import BATCH, SENTENCES, SEQ, metrics, nbytes
from report import RESULTS, machine, rank_corr, write
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
