"""``qjax demo``: the whole toolbox on scikit-learn's digits, one row per method."""

from __future__ import annotations

import datetime
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import qjax
from qjax import _demo, prune
from qjax._report import progress_factory, tick

NOTE = (
    "PTQ/QAT rows: weights are quantized with qjax.quantize_params and dequantized for evaluation; "
    "the W8A8 row runs the model with qjax.quantized (int8 x int8 -> int32 matmuls, calibrated "
    "static activation scales); only conv and dense kernels are quantized, biases stay float32. Pruning rows "
    "fine-tune with qjax.prune.sparsify (bytes: kept values + a 1-bit mask per pruned kernel); the "
    "channel row removes half of the conv channels and hidden neurons with qjax.prune.shrink and "
    "fine-tunes the smaller model. "
    "Fixed-point rows run integer matmuls with per-layer calibrated ap_fixed formats (bytes: kernels at "
    "that width); the KD row is a separate, 4x narrower student trained against the float model. "
    "The mixed-precision row picks int2/int4/int8/float per kernel (Hutchinson Hessian traces, MILP) "
    "within about 3 bits per weight (halfway between uniform int2 and int4; its int candidates use MSE "
    "clip search). "
    "Latency: median of the row's deployable forward pass (qjax.quantized integer execution for quantized "
    "rows; dense matmuls for unstructured/2:4 pruning, which has no sparse kernel on CPU) on 256 test "
    "images, relative to the float model."
)


def _methods() -> list[tuple[str, str, Any]]:
    """``(key, label, weight spec)`` of every post-training method, in table order."""
    Q = qjax.QuantSpec
    return [
        ("int8_tensor", "PTQ int8 per-tensor", Q(qjax.int8)),
        ("int8_channel", "PTQ int8 per-channel", Q(qjax.int8, channel_axes=(-1,))),
        ("int4_tensor", "PTQ int4 per-tensor", Q(qjax.int4)),
        ("int4_channel", "PTQ int4 per-channel", Q(qjax.int4, channel_axes=(-1,))),
        (
            "int4_group16",
            "PTQ int4 per-channel, groups of 16 (input channels)",
            Q(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=-2, pad_groups=True),
        ),
        ("int2_channel", "PTQ int2 per-channel", Q(qjax.int2, channel_axes=(-1,))),
        (
            "int8_channel_mse",
            "PTQ int8 per-channel, MSE clip search",
            Q(qjax.int8, channel_axes=(-1,), calibration=qjax.calib.mse()),
        ),
        ("fp8_e4m3", "PTQ fp8 e4m3 per-tensor scale", Q(qjax.fp8_e4m3)),
    ]


def _qat_methods() -> list[tuple[str, str, Any]]:
    """``(key, label, weight spec)`` of the QAT fine-tunes."""
    Q = qjax.QuantSpec
    return [
        (
            "qat_int4_channel",
            "QAT int4 per-channel (clipped STE)",
            Q(qjax.int4, channel_axes=(-1,), ste="clipped"),
        ),
        (
            "qat_int2_channel",
            "QAT int2 per-channel (clipped STE)",
            Q(qjax.int2, channel_axes=(-1,), ste="clipped"),
        ),
        (
            "qat_int2_channel_lsq",
            "QAT int2 per-channel (LSQ, learned scales)",
            Q(qjax.int2, channel_axes=(-1,), ste="lsq"),
        ),
    ]


def _prune_methods(steps: int) -> list[tuple[str, str, Any, Any]]:
    """Pruning rows: (key, label, pruner, schedule); ``steps``: fine-tune steps."""
    every = max(1, steps // 20)
    return [
        (
            "magnitude90_gradual",
            "magnitude pruning 90% (gradual, global)",
            prune.Magnitude(0.9, scope="global"),
            prune.polynomial(0.9, 0, max(1, int(0.6 * steps)), every),
        ),
        (
            "nm_2_4",
            "2:4 sparsity (magnitude, one-shot)",
            # along the input channels; the first conv has a single input channel
            prune.Magnitude(0.5, sparsity_type=prune.NM(2, 4, axis=-2), rules=[(r".*conv1/kernel", None)]),
            prune.one_shot(0),
        ),
    ]


def _sparse_bytes(tree: Any, masks: Any) -> int:
    """Bytes of ``tree`` stored sparse: kept values plus a 1-bit mask for pruned leaves,
    dense for the others."""

    def leaf_bytes(m, x):
        item = np.dtype(x.dtype).itemsize
        return x.size * item if m is None else int(np.sum(np.asarray(m))) * item + (x.size + 7) // 8

    return int(sum(jax.tree.leaves(jax.tree.map(leaf_bytes, masks, tree, is_leaf=lambda v: v is None))))


def _fixed_bytes(variables: Any, width: int) -> int:
    """Bytes with kernels stored at ``width`` bits (biases kept float32)."""
    leaves = jax.tree.leaves(variables)
    return int(sum(x.size * width // 8 if x.ndim >= 2 else x.nbytes for x in leaves))


LATENCY_BATCH = 256
SPARSITY_CURVE = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def latency_ms(fn: Callable, params: Any, x, repeats: int = 60) -> float:
    """Median wall time (ms) of the jitted ``fn(params, x)`` on this machine, after warm-up."""
    f = jax.jit(fn)
    jax.block_until_ready(f(params, x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(params, x))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _mixed_precision(model, variables, data, accuracy, seed: int, fast: bool):
    """``autoprec.search`` over int2/int4/int8/float per kernel with a budget halfway
    between the bytes of uniform int2 and uniform int4 (about 3 bits per weight); every
    frontier point evaluated. Returns ``(SearchResult, budget bytes)``."""
    from qjax import autoprec

    cands = autoprec.weight_candidates((2, 4, 8))
    layers = autoprec.find_layers(model.apply, variables, data.x_test[:1], paths=r".*/kernel")
    by_name = {c.name: c for c in cands}
    budget = float(
        sum(autoprec.layer_bytes(layer, by_name[b]) for layer in layers for b in ("int2", "int4")) / 2
    )

    def loss(v, xb, yb):
        logits = model.apply(v, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    batches = [(data.x_train[i : i + 256], data.y_train[i : i + 256]) for i in range(0, 1024, 256)]
    result = autoprec.search(
        model.apply,
        variables,
        (data.x_test[:1],),
        loss_fn=loss,
        batches=batches,
        candidates=cands,
        budgets={"bytes": budget},
        key=jax.random.key(seed),
        num_probes=8 if fast else 32,
        points=6 if fast else 10,
        paths=r".*/kernel",
        evaluate_pareto=True,
        eval_fn=lambda pol: accuracy(qjax.dequantize_params(qjax.quantize_params(variables, pol))),
    )
    return result, budget


def run_demo(
    *, fast: bool = False, seed: int = 0, quiet: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the digits demo and return its results (the content of ``results.json``).

    Args:
      fast: fewer training epochs and latency repeats (for tests and smoke runs).
      seed: seeds the data split, the initialisation and the batch order.
      quiet: no progress bars.
      log: where progress lines go (default: stderr unless ``quiet``).

    Raises:
      MissingDependency: scikit-learn is not installed.
    """
    if log is None:
        log = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    bar = progress_factory(quiet)
    epochs, qat_epochs = (10, 3) if fast else (30, 10)
    kernels = r".*/kernel"

    t_start = time.perf_counter()
    data = _demo.load_digits(seed)
    model = _demo.CNN()
    accuracy = _demo.make_accuracy(model, data.x_test, data.y_test)
    rows: list[dict[str, Any]] = []

    x_lat = data.x_test[:LATENCY_BATCH]

    def add(key, label, kind, acc, tree, seconds, nbytes=None, serve=None, **extra):
        """One table row; ``serve=(fn, params)``: the row's deployable forward pass, timed
        on ``x_lat`` against the float model's."""
        fp = qjax.footprint(tree)
        nbytes = fp.total if nbytes is None else nbytes
        if serve is not None:
            ms = latency_ms(serve[0], serve[1], x_lat, repeats=10 if fast else 60)
            extra["latency_ms"] = ms
            extra["latency_ratio"] = ms / rows[0]["latency_ms"] if rows else 1.0
        rows.append(
            dict(
                key=key,
                method=label,
                kind=kind,
                accuracy=acc,
                bytes=nbytes,
                ratio=float_bytes / nbytes if rows else 1.0,
                seconds=seconds,
                **extra,
            )
        )

    # 1. the float model
    t = time.perf_counter()
    with bar(total=epochs, desc="float training") as pb:
        variables, _ = _demo.train(
            model,
            _demo.init_variables(model, seed),
            data,
            epochs=epochs,
            lr=1e-3,
            seed=seed,
            on_epoch=lambda loss: tick(pb, loss),
        )
    float_bytes = qjax.footprint(variables).float_total
    add(
        "float",
        "float32 (trained)",
        "float",
        accuracy(variables),
        variables,
        time.perf_counter() - t,
        serve=(model.apply, variables),
    )

    # 2. post-training quantization of the kernels
    ptq = _methods()
    with bar(total=len(ptq), desc="post-training quantization") as pb:
        for key, label, spec in ptq:
            t = time.perf_counter()
            policy = qjax.Policy([qjax.Rule(kernels, weight=spec)])
            qvars = jax.jit(lambda v, p=policy: qjax.quantize_params(v, p))(variables)
            acc = accuracy(jax.jit(qjax.dequantize_params)(qvars))
            add(
                key,
                label,
                "ptq",
                acc,
                qvars,
                time.perf_counter() - t,
                serve=(qjax.quantized(model.apply, policy), qvars),
            )
            tick(pb)

    # 2b. integer execution: W8A8 with static activation scales from calibration
    t = time.perf_counter()
    policy = qjax.Policy(
        [
            qjax.Rule(
                kernels, weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=qjax.QuantSpec(qjax.int8)
            )
        ]
    )
    calib_batches = [data.x_train[i : i + 256] for i in range(0, min(len(data.x_train), 1024), 256)]
    stats = qjax.calibrate(model.apply, policy, variables, calib_batches)
    qvars = qjax.quantize_params(variables, policy, act_stats=stats)
    serve = jax.jit(qjax.quantized(model.apply, policy))
    logits = serve(qvars, data.x_test)
    acc = float((jax.numpy.argmax(logits, -1) == data.y_test).mean())
    add(
        "w8a8_int",
        "W8A8 integer execution (static act scales)",
        "ptq",
        acc,
        qvars,
        time.perf_counter() - t,
        serve=(qjax.quantized(model.apply, policy), qvars),
    )

    # 3. QAT: fine-tune the float model through fake_quant_params, then quantize
    for key, label, spec in _qat_methods():
        t = time.perf_counter()
        policy = qjax.Policy([qjax.Rule(kernels, weight=spec)])
        lsq = spec.ste == "lsq"
        scales = qjax.lsq_scales(variables, policy) if lsq else None
        with bar(total=qat_epochs, desc=label) as pb:
            qv, qs = _demo.train(
                model,
                variables,
                data,
                epochs=qat_epochs,
                lr=3e-4,
                seed=seed + 1,
                transform=lambda v, s, p=policy: qjax.fake_quant_params(v, p, scales=s),
                scales=scales,
                on_epoch=lambda loss, pb=pb: tick(pb, loss),
            )
        qvars = jax.jit(lambda v, s, p=policy: qjax.quantize_params(v, p, scales=s))(qv, qs)
        acc = accuracy(jax.jit(qjax.dequantize_params)(qvars))
        fq_acc = accuracy(jax.jit(lambda v, s, p=policy: qjax.fake_quant_params(v, p, scales=s))(qv, qs))
        add(
            key,
            label,
            "qat",
            acc,
            qvars,
            time.perf_counter() - t,
            fake_quant_accuracy=fq_acc,
            serve=(qjax.quantized(model.apply, policy), qvars),
        )

    # 4. pruning: fine-tune with qjax.prune.sparsify (masks in the optimizer state), and
    #    structured channel pruning physically shrunk with qjax.prune.shrink
    prune_epochs = 3 * qat_epochs  # 90% sparsity needs a longer fine-tune than QAT
    steps = prune_epochs * (len(data.x_train) // 128)
    for key, label, pruner, schedule in _prune_methods(steps):
        t = time.perf_counter()
        tx = prune.sparsify(optax.adam(3e-4), pruner, schedule, key=seed)
        with bar(total=prune_epochs, desc=label) as pb:
            (pv, _), opt_state = _demo.train(
                model,
                variables,
                data,
                epochs=prune_epochs,
                lr=3e-4,
                seed=seed + 2,
                tx=tx,
                on_epoch=lambda loss, pb=pb: tick(pb, loss),
            )
        masks = prune.get_masks(opt_state)[0]
        summary = prune.summary(masks)
        add(
            key,
            label,
            "prune",
            accuracy(pv),
            pv,
            time.perf_counter() - t,
            nbytes=_sparse_bytes(pv, masks),
            sparsity=summary.sparsity,
            serve=(model.apply, pv),
        )  # dense matmuls on zeros: no sparse kernel
    t = time.perf_counter()
    channel = prune.Magnitude(0.5, sparsity_type=prune.Channel(-1), rules=[(r"params/head/kernel", None)])
    small, plan = prune.shrink(model.apply, variables, channel.masks(variables), data.x_test[:2], vote="any")
    small_apply = prune.linen_apply(model, plan=plan)
    with bar(total=prune_epochs, desc="channel pruning 50% + shrink") as pb:
        small, _ = _demo.train(
            model,
            small,
            data,
            epochs=prune_epochs,
            lr=3e-4,
            seed=seed + 3,
            apply=small_apply,
            on_epoch=lambda loss, pb=pb: tick(pb, loss),
        )
    acc = float((np.argmax(jax.jit(small_apply)(small, data.x_test), -1) == data.y_test).mean())
    add(
        "channel50_shrink",
        "channel pruning 50% + shrink (smaller model)",
        "prune",
        acc,
        small,
        time.perf_counter() - t,
        serve=(small_apply, small),
    )

    # 5. fixed-point inference (ap_fixed formats calibrated per layer; integer matmuls)
    ranges = qjax.fixed.collect_ranges(model.apply, variables, [data.x_train])
    for width in (16, 8):
        t = time.perf_counter()
        rules = qjax.fixed.calibrate_formats(ranges, width)
        # 16-bit operands need int64 accumulators (16 + 16 + log2 K > 31 bits).
        with jax.enable_x64(width > 8):
            fixed_fn = qjax.fixed.fixed_point(model.apply, rules)
            acc = float((np.argmax(jax.jit(fixed_fn)(variables, data.x_test), -1) == data.y_test).mean())
            add(
                f"fixed{width}",
                f"fixed point {width}-bit (ap_fixed, RND_CONV/SAT)",
                "fixed",
                acc,
                variables,
                time.perf_counter() - t,
                nbytes=_fixed_bytes(variables, width),
                serve=(fixed_fn, variables),
            )

    # 6. knowledge distillation: a 4x narrower student taught by the float model
    t = time.perf_counter()
    student = _demo.MLP(hidden=(64, 64))
    ds = qjax.distill.distill_step(
        student.apply, model.apply, qjax.distill.kd_objective(4.0, 0.7), optax.adam(1e-3)
    )
    state = ds.init(_demo.init_variables(student, seed + 4))
    rng = np.random.default_rng(seed + 4)
    n = len(data.x_train) // 128 * 128
    with bar(total=epochs, desc="KD student") as pb:
        for _ in range(epochs):
            for idx in rng.permutation(len(data.x_train))[:n].reshape(-1, 128):
                state, _m = ds.step(state, variables, {"x": data.x_train[idx], "y": data.y_train[idx]})
            tick(pb)
    student_vars = state.params["student"]
    acc = float((np.argmax(jax.jit(student.apply)(student_vars, data.x_test), -1) == data.y_test).mean())
    add(
        "kd_student",
        "KD student MLP 64-64 (T=4, alpha=0.7)",
        "distill",
        acc,
        student_vars,
        time.perf_counter() - t,
        serve=(student.apply, student_vars),
    )

    # 7. mixed precision: Hessian-guided search (int2/int4/int8/float per layer) within the
    #    size of uniform int4, frontier points measured
    t = time.perf_counter()
    mp, budget = _mixed_precision(model, variables, data, accuracy, seed, fast)
    qvars = qjax.quantize_params(variables, mp.policy)
    acc = accuracy(jax.jit(qjax.dequantize_params)(qvars))
    choice = " ".join(mp.choice[p] for p in mp.problem.paths)
    add(
        "mixed_precision",
        "mixed precision (Hessian search, <= 3 bits/weight)",
        "autoprec",
        acc,
        qvars,
        time.perf_counter() - t,
        serve=(qjax.quantized(model.apply, mp.policy), qvars),
        budget_bytes=budget,
        choice=choice,
    )
    pareto = [  # bytes as the table counts them (footprint of all variables)
        {
            "bytes": qjax.footprint(qjax.quantize_params(variables, mp.problem.policy(p.choice))).total,
            "kernel_bytes": p.costs["bytes"],
            "predicted": p.predicted,
            "accuracy": p.measured,
            "choice": list(p.choice),
        }
        for p in mp.pareto
    ]

    # 8. accuracy vs sparsity without fine-tuning (one-shot global magnitude), for the curve
    sparsity_curve = []
    for sp in SPARSITY_CURVE:
        pruned = prune.apply_masks(variables, prune.Magnitude(sp, scope="global").masks(variables))
        sparsity_curve.append({"sparsity": sp, "accuracy": accuracy(pruned)})

    total = time.perf_counter() - t_start
    log(f"demo finished in {total:.1f} s")
    return {
        "qjax_demo": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seed": seed,
        "fast": fast,
        "epochs": {"float": epochs, "qat": qat_epochs, "prune": prune_epochs},
        "data": {"name": "sklearn digits 8x8", "train": len(data.y_train), "test": len(data.y_test)},
        "model": "CNN conv3x3(16)-avgpool-conv3x3(32)-dense(64)-dense(10) (Flax linen), optax adam",
        "note": NOTE,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "qjax": qjax.__version__},
        "machine": platform.machine(),
        "total_seconds": total,
        "float_accuracy": rows[0]["accuracy"],
        "latency": {"batch": len(x_lat), "float_ms": rows[0]["latency_ms"]},
        "rows": rows,
        "mixed_precision_pareto": pareto,
        "sparsity_curve": sparsity_curve,
    }
