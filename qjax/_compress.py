"""``qjax compress --config FILE``: compress the user's own model, one row per step.

The config names an entry function (``model.py:build``) returning the model as a dict
(``apply_fn``, ``params``, ``batches``, ``eval_fn``, optionally ``loss_fn`` and a Linen
``module``) and lists steps (``ptq``, ``qat``, ``prune``, ``distill``); see
:mod:`qjax._compress_config` for the schema. Every step starts from the given params; the
first row is the model as given. Mistakes in the config or the entry are one-line
:class:`~qjax._cli_common.CLIError` s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import optax

import qjax
from qjax import prune
from qjax._cli_common import CLIError, first_line, prepare_out, seed_arg
from qjax._compress_config import (
    ENTRY_REQUIRED,
    STUDENT_REQUIRED,
    ConfigError,
    Step,
    read_config,
    validate_config,
)
from qjax._compress_entry import call_entry, load_function
from qjax._demo_run import _sparse_bytes, latency_ms
from qjax._report import format_table, progress_factory, tick

__all__ = ["add_compress_parser", "cmd_compress", "run_compress"]

NOTE = (
    "Every step starts from the given params. accuracy: the entry's eval_fn (higher is better). "
    "bytes: qjax.footprint(...).total of the params after the step (quantized values, scales, float "
    "leaves); pruned rows count kept values plus a 1-bit mask per pruned leaf; a channel-pruned row is "
    "the physically smaller model. ptq rows are evaluated dequantized unless execute is 'integer' "
    "(qjax.quantized). latency x float: median time of the row's deployable forward pass (qjax.quantized "
    "integer execution for quantized rows, dense matmuls for pruned ones) on the first batch, relative to "
    "the float model. seconds: wall time of the step, compilation included."
)


# -- command line -------------------------------------------------------------------------------


def add_compress_parser(sub: Any) -> None:
    """Add the ``compress`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "compress",
        help="quantize, prune or distill your own model as a config file says",
        description=(
            "Compress your own JAX/Flax model: the config (JSON, TOML, or YAML with PyYAML) names an "
            "entry function returning apply_fn, params, batches, eval_fn (and loss_fn for training "
            "steps) and lists ptq / qat / prune / distill steps; prints one row per step. " + NOTE
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the config file (.json, .toml, .yaml)")
    p.add_argument("--out", metavar="DIR", help="write report.md and results.json to DIR")
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output; print only the results")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(handler=cmd_compress)


def format_compress_report(result: dict[str, Any]) -> str:
    """``report.md`` of a compress run."""
    v = result["versions"]
    args = json.dumps(result["entry_args"]) if result["entry_args"] else "no arguments"
    return "\n".join(
        [
            f"# qjax compress: {result['entry']}",
            "",
            f"- date: {result['date']}; machine: {result['machine']}; python {v['python']}, "
            f"jax {v['jax']}, qjax {v['qjax']}",
            f"- config: `{result.get('config_file') or '(given as a dict)'}`; entry `{result['entry']}` "
            f"({args}); seed {result['seed']}; {len(result['rows']) - 1} steps in "
            f"{result['total_seconds']:.1f} s",
            f"- {result['note']}",
            "",
            format_table(result, markdown=True),
            "",
        ]
    )


def cmd_compress(args: argparse.Namespace) -> int:
    """``qjax compress``: run the config's steps, print the table, write ``--out``."""
    out = prepare_out(getattr(args, "out", None))  # check before the long run
    quiet = bool(getattr(args, "quiet", False))
    path = Path(args.config)
    config = read_config(path)
    try:
        result = run_compress(config, base_dir=path.parent, seed=getattr(args, "seed", 0), quiet=quiet)
    except ConfigError as e:
        raise CLIError(f"{args.config}: {e}") from None
    result["config_file"] = str(path)
    print(NOTE)
    print(format_table(result))
    if out is not None:
        try:
            (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            (out / "report.md").write_text(format_compress_report(result))
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write results ({e.strerror or e})") from None
        if not quiet:
            print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return 0


# -- helpers ------------------------------------------------------------------------------------


def _paths_hint(params: Any) -> str:
    paths = [p for p, _ in qjax.rules.leaves_with_paths(params)]
    more = f", ... ({len(paths)} in all)" if len(paths) > 8 else ""
    return "parameter paths: " + ", ".join(paths[:8]) + more


def _batches(m: dict, n: int, *, cycle: bool = True) -> Iterator[tuple[Any, Any]]:
    """``n`` ``(x, y)`` batches from the entry's ``batches`` (a new pass when one ends,
    unless ``cycle`` is off)."""
    got = 0
    while got < n:
        src = m["batches"]() if callable(m["batches"]) else m["batches"]
        try:
            it = iter(src)
        except TypeError:
            raise CLIError(
                f"entry {m['spec']!r}: batches() must return an iterable of (x, y), got {type(src).__name__}"
            ) from None
        empty = True
        for item in it:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise CLIError(
                    f"entry {m['spec']!r}: 'batches' must yield (x, y) pairs, got {type(item).__name__}"
                )
            empty = False
            yield item[0], item[1]
            got += 1
            if got == n:
                return
        if empty:
            raise CLIError(f"entry {m['spec']!r}: 'batches' yielded no batches")
        if not cycle:
            return


def _evaluate(m: dict, apply: Callable, params: Any) -> float:
    value = m["eval_fn"](apply, params)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CLIError(f"entry {m['spec']!r}: eval_fn returned {value!r}; it must return a number") from None


def _supervised(m: dict, apply: Callable) -> Callable:
    loss_fn = m["loss_fn"]
    return lambda p, x, y: loss_fn(apply(p, x), y)


def _train(ctx: dict, step: Step, loss_of: Callable, trainable: Any, tx: Any) -> tuple[Any, Any]:
    """``step.opts["steps"]`` optimizer steps of ``loss_of(trainable, x, y)`` with ``tx``."""
    opt_state = tx.init(trainable)

    @jax.jit
    def one(tr, st, x, y):
        loss, grads = jax.value_and_grad(loss_of)(tr, x, y)
        updates, st = tx.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    n = step.opts["steps"]
    with ctx["bar"](total=n, desc=step.name) as pb:
        for i, (x, y) in enumerate(_batches(ctx["model"], n)):
            trainable, opt_state, loss = one(trainable, opt_state, x, y)
            tick(pb, float(loss) if pb is not None and i % 20 == 0 else None)
    return trainable, opt_state


# -- the steps ----------------------------------------------------------------------------------


def _ptq(ctx: dict, step: Step) -> dict:
    m, policy = ctx["model"], step.policy
    stats = None
    if any(r.act is not None for r in policy.rules):
        calib = [(x,) for x, _ in _batches(m, step.opts["calibration_batches"], cycle=False)]
        stats = qjax.calibrate(
            m["apply_fn"], policy, m["params"], calib, histogram_bins=step.opts["histogram_bins"]
        )
    q = jax.jit(lambda p: qjax.quantize_params(p, policy, act_stats=stats))(m["params"])
    if step.opts["execute"] == "integer":
        acc = _evaluate(m, jax.jit(qjax.quantized(m["apply_fn"], policy)), q)
    else:
        acc = _evaluate(m, jax.jit(m["apply_fn"]), jax.jit(qjax.dequantize_params)(q))
    return {"accuracy": acc, "tree": q, "serve": (qjax.quantized(m["apply_fn"], policy), q)}


def _qat(ctx: dict, step: Step) -> dict:
    m, policy = ctx["model"], step.policy
    lsq = any(r.weight is not None and r.weight.ste == "lsq" for r in policy.rules)
    scales = qjax.lsq_scales(m["params"], policy) if lsq else {}
    loss = _supervised(m, m["apply_fn"])

    def loss_of(tr, x, y):
        return loss(qjax.fake_quant_params(tr[0], policy, scales=tr[1]), x, y)

    (p, s), _ = _train(ctx, step, loss_of, (m["params"], scales), optax.adam(step.opts["lr"]))
    q = jax.jit(lambda p, s: qjax.quantize_params(p, policy, scales=s))(p, s)
    return {
        "accuracy": _evaluate(m, jax.jit(m["apply_fn"]), jax.jit(qjax.dequantize_params)(q)),
        "tree": q,
        "serve": (qjax.quantized(m["apply_fn"], policy), q),
    }


def _sparsity_type(kind: str):
    if kind == "unstructured":
        return prune.Unstructured()
    if kind == "channel":
        return prune.Channel(-1)
    n, mm = map(int, kind.split(":"))
    return prune.NM(n, mm, axis=-2)  # along the input axis of (in, out) and (h, w, in, out) kernels


def _prune(ctx: dict, step: Step) -> dict:
    m, o = ctx["model"], step.opts
    pruner = prune.Magnitude(
        o["sparsity"], sparsity_type=_sparsity_type(o["type"]), scope=o["scope"], rules=step.prune_rules
    )
    if o["type"] == "channel":
        return _channel(ctx, step, pruner)
    n = o["steps"]
    if o["schedule"] == "one_shot":
        schedule = prune.one_shot(0)
    else:
        schedule = prune.polynomial(o["sparsity"], 0, max(1, int(0.6 * n)), max(1, n // 20))
    tx = prune.sparsify(optax.adam(o["lr"]), pruner, schedule, key=ctx["seed"])
    params, opt_state = _train(ctx, step, _supervised(m, m["apply_fn"]), m["params"], tx)
    masks = prune.get_masks(opt_state)
    return {
        "accuracy": _evaluate(m, jax.jit(m["apply_fn"]), params),
        "tree": params,
        "bytes": _sparse_bytes(params, masks),
        "sparsity": float(prune.summary(masks).sparsity),
        "serve": (m["apply_fn"], params),  # dense matmuls on zeros: no sparse kernel
    }


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _channel(ctx: dict, step: Step, pruner: Any) -> dict:
    m = ctx["model"]
    x0 = next(_batches(m, 1))[0]
    masks = pruner.masks(m["params"])
    small, plan = prune.shrink(
        m["apply_fn"], m["params"], masks, x0, vote="any", inexact_norms=step.opts["inexact_norms"]
    )
    small_apply = prune.linen_apply(m["module"], plan=plan)
    before = _shapes(jax.eval_shape(m["apply_fn"], m["params"], x0))
    after = _shapes(jax.eval_shape(small_apply, small, x0))
    if before != after:
        last = list(pruner.targets(m["params"]))[-1:]
        hint = f', e.g. {{"pattern": "{last[0]}", "sparsity": null}}' if last else ""
        raise CLIError(
            f"{step.where}: channel pruning changed the model's output shape from {before} to {after}; "
            f"skip the output layer with a rule{hint}"
        )
    small, _ = _train(ctx, step, _supervised(m, small_apply), small, optax.adam(step.opts["lr"]))
    return {
        "accuracy": _evaluate(m, jax.jit(small_apply), small),
        "tree": small,
        "serve": (small_apply, small),
    }


def _distill(ctx: dict, step: Step) -> dict:
    m, o = ctx["model"], step.opts
    student = ctx["students"][step.index]
    loss_fn, temperature, alpha = m["loss_fn"], o["temperature"], o["alpha"]

    def objective(s, t, batch, adapters):  # kd_objective with the entry's loss as the hard term
        del adapters
        soft = qjax.distill.kd_loss(s.logits, t.logits, None, temperature, 1.0)
        return alpha * soft + (1.0 - alpha) * loss_fn(s.logits, batch["y"])

    ds = qjax.distill.distill_step(student["apply_fn"], m["apply_fn"], objective, optax.adam(o["lr"]))
    state = ds.init(student["params"])
    with ctx["bar"](total=o["steps"], desc=step.name) as pb:
        for i, (x, y) in enumerate(_batches(m, o["steps"])):
            state, metrics = ds.step(state, m["params"], {"x": (x,), "y": y})
            tick(pb, float(metrics["loss"]) if pb is not None and i % 20 == 0 else None)
    params = state.params["student"]
    return {
        "accuracy": _evaluate(m, jax.jit(student["apply_fn"]), params),
        "tree": params,
        "serve": (student["apply_fn"], params),
    }


_RUN = {"ptq": _ptq, "qat": _qat, "prune": _prune, "distill": _distill}


def _prepare(step: Step, m: dict, base_dir: Path, seed: int, modules: dict, students: dict) -> None:
    """Checks that need the model (before any step runs): rules match, loss_fn and module
    are there, the student loads."""
    params = m["params"]
    if step.policy is not None:
        for j, r in enumerate(step.policy.rules):
            if r.pattern in step.policy.unused(params):
                raise ConfigError(
                    f"{step.where} rules[{j}]: pattern {r.pattern!r} matches no parameter (not already "
                    f"matched by an earlier rule); {_paths_hint(params)}"
                )
    if step.prune_rules:
        unused = qjax.rules.RuleSet(step.prune_rules).unused(params)
        if unused:
            raise ConfigError(
                f"{step.where}: pruning rule pattern {unused[0]!r} matches no parameter; "
                f"{_paths_hint(params)}"
            )
    if step.kind != "ptq" and m.get("loss_fn") is None:
        raise CLIError(
            f"{step.where}: a {step.kind} step trains, so entry {m['spec']!r} must also return "
            "'loss_fn' (loss_fn(outputs, y) -> scalar)"
        )
    if step.kind == "prune" and step.opts["type"] == "channel" and m.get("module") is None:
        raise CLIError(
            f"{step.where}: channel pruning rebuilds a smaller Flax Linen model, so entry {m['spec']!r} "
            "must also return 'module' (the flax.linen Module that apply_fn applies)"
        )
    if step.kind == "distill":
        what = f"{step.where} student"
        fn = load_function(step.opts["student"], base_dir, what, modules)
        s = call_entry(fn, step.opts["student"], what, step.opts["student_args"], seed, STUDENT_REQUIRED)
        students[step.index] = s


def _step_record(s: Step) -> dict[str, Any]:
    """A step as run (defaults filled in), for ``results.json``."""
    rules = (
        [r.to_dict() for r in s.policy.rules]
        if s.policy is not None
        else [{"pattern": p, "sparsity": v} for p, v in s.prune_rules]
    )
    return {"key": s.key, "name": s.name, "kind": s.kind, **s.opts, "rules": rules}


@contextlib.contextmanager
def _restore_sys_path():
    before = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = [p for p in sys.path if p in before]


def run_compress(
    config: dict[str, Any],
    *,
    base_dir: str | Path,
    seed: int = 0,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validate ``config``, build the model with its entry, run every step.

    Args:
      config: the parsed config (see :mod:`qjax._compress_config`).
      base_dir: the folder ``file.py:function`` entries are relative to (the config's).
      seed: passed to entry functions with a ``seed`` parameter (unless ``entry_args``
        sets it) and to the pruning optimizer.
      quiet: no progress output.
      log: where progress lines go (default: stderr unless ``quiet``).

    Returns:
      The results (the content of ``results.json``): ``rows`` of ``key, method, kind,
      accuracy, bytes, ratio, seconds, latency_ms, latency_ratio`` (pruning rows also
      ``sparsity``), float row first. Latency: the row's deployable forward pass
      (``qjax.quantized`` for quantized rows) on the first batch, median, vs the float model.

    Raises:
      ConfigError: a mistake in the config (a :class:`CLIError`).
      CLIError: the entry cannot be loaded or returns the wrong thing, a rule matches
        nothing, a training step lacks ``loss_fn``, or a step fails.
    """
    if log is None:
        log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = validate_config(config)
    base_dir = Path(base_dir)
    t_start = time.perf_counter()
    modules: dict = {}
    with _restore_sys_path():
        log(f"building the model: {cfg.entry}")
        fn = load_function(cfg.entry, base_dir, "entry", modules)
        m = call_entry(fn, cfg.entry, "entry", cfg.entry_args, seed, ENTRY_REQUIRED)
        m["spec"] = cfg.entry
        students: dict[int, dict] = {}
        for step in cfg.steps:
            _prepare(step, m, base_dir, seed, modules, students)
        ctx = {"model": m, "seed": seed, "bar": progress_factory(quiet), "students": students}

        t = time.perf_counter()
        try:
            acc = _evaluate(m, jax.jit(m["apply_fn"]), m["params"])
        except CLIError:
            raise
        except Exception as e:
            raise CLIError(
                f"evaluating the model from entry {cfg.entry!r} raised {type(e).__name__}: {first_line(e)} "
                "(rerun with --debug for the traceback)"
            ) from e
        fp = qjax.footprint(m["params"])
        float_bytes = fp.float_total
        x_lat = next(_batches(m, 1))[0]
        float_ms = latency_ms(m["apply_fn"], m["params"], x_lat)
        rows = [
            dict(
                key="float",
                method="float (as given)",
                kind="float",
                accuracy=acc,
                bytes=fp.total,
                ratio=float_bytes / fp.total,
                seconds=time.perf_counter() - t,
                latency_ms=float_ms,
                latency_ratio=1.0,
            )
        ]
        log(f"float model: accuracy {acc:.4f}, {fp.total:,} bytes")
        for step in cfg.steps:
            t = time.perf_counter()
            try:
                out = _RUN[step.kind](ctx, step)
            except CLIError:
                raise
            except Exception as e:
                raise CLIError(
                    f"{step.where} failed: {type(e).__name__}: {first_line(e)} "
                    "(rerun with --debug for the traceback)"
                ) from e
            tree = out.pop("tree")
            serve_fn, serve_params = out.pop("serve")
            out["latency_ms"] = latency_ms(serve_fn, serve_params, x_lat)
            out["latency_ratio"] = out["latency_ms"] / float_ms
            nbytes = out.pop("bytes", None)
            nbytes = qjax.footprint(tree).total if nbytes is None else nbytes
            acc = out.pop("accuracy")
            rows.append(
                dict(
                    key=step.key,
                    method=step.name,
                    kind=step.kind,
                    accuracy=acc,
                    bytes=int(nbytes),
                    ratio=float_bytes / nbytes,
                    seconds=time.perf_counter() - t,
                    **out,
                )
            )
            log(f"{step.name}: accuracy {acc:.4f}, {nbytes:,} bytes")
    total = time.perf_counter() - t_start
    log(f"compress finished in {total:.1f} s")
    return {
        "qjax_compress": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seed": seed,
        "entry": cfg.entry,
        "entry_args": cfg.entry_args,
        "steps": [_step_record(s) for s in cfg.steps],
        "note": NOTE,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "qjax": qjax.__version__},
        "machine": platform.machine(),
        "total_seconds": total,
        "float_accuracy": rows[0]["accuracy"],
        "rows": rows,
    }
