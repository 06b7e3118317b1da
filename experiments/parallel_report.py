"""Sharded execution on 8 simulated CPU devices: correctness, memory and communication of
each partitioning preset, for an MLP and a transformer block, float vs int8 weights.

For every model and preset (data parallel 8×1×1, FSDP 1×8×1, tensor parallel 1×1×8,
hybrid 2×2×2 as data×fsdp×tensor):

* correctness: two float and two QAT (int8 weights and per-token activations,
  fake-quantized) SGD-momentum steps against the same steps on one device (max relative
  param difference, loss difference), and the int8 serving output (``qjax.quantized`` of
  ``QArray`` params) against one device;
* memory: bytes of params + Adam state held by one device (float training), and of the
  params alone for serving with float vs int8 ``QArray`` weights;
* communication per step, read from the compiled (partitioned) HLO: payload bytes of the
  collectives and an estimate of the bytes each device sends (ring algorithms, see
  ``qjax.parallel.hlo``), for the float and QAT train steps and for serving with float vs
  int8 weights; and int8 training on 8 data shards with global vs per-shard local scales.

Run: ``.venv/bin/python experiments/parallel_report.py``; writes
experiments/results/parallel_report.{json,md}. CPU only: the numbers are counts of bytes,
not timings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from report import RESULTS, machine, write

import qjax
from qjax import parallel as qp
from qjax.parallel import hlo, presets

BATCH, SEQ, DIM, HIDDEN, CLASSES, HEADS = 32, 16, 128, 512, 128, 8

PRESETS = {
    "single (1 device)": ((1, 1, 1), presets.data_parallel()),
    "data 8×1×1": ((8, 1, 1), presets.data_parallel()),
    "fsdp 1×8×1": ((1, 8, 1), presets.fsdp()),
    "tensor 1×1×8": ((1, 1, 8), presets.tensor_parallel()),
    "hybrid 2×2×2": ((2, 2, 2), presets.hybrid()),
}

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
G8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
POLICY = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8, act=A8)])
INT8 = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8, act=A8, grad=G8)])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES, name="down")(nn.relu(nn.Dense(HIDDEN, name="up")(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        hd = DIM // HEADS
        q, k, v = (
            nn.DenseGeneral((HEADS, hd), use_bias=n != "key", name=n)(x) for n in ("query", "key", "value")
        )
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
        a = nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        x = nn.LayerNorm(name="ln")(x + a)
        x = x + nn.Dense(DIM, name="down")(nn.gelu(nn.Dense(HIDDEN, name="up")(x)))
        return nn.Dense(CLASSES, name="head")(x.mean(axis=1))


MODELS = {"mlp": (MLP(), (BATCH, DIM)), "transformer block": (Block(), (BATCH, SEQ, DIM))}


def xent(out, b):
    return optax.softmax_cross_entropy_with_integer_labels(out, b["y"]).mean()


def device0_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays stored on the first device."""
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            if shard.device == dev:
                total += shard.data.nbytes
    return total


def comm(text: str) -> dict:
    ops = hlo.collectives(text)
    return {
        "collectives": len(ops),
        "payload_bytes": int(sum(o.nbytes for o in ops)),
        "traffic_bytes_per_device": float(sum(o.traffic for o in ops)),
        "by_kind": hlo.summary(ops),
    }


def _diff(got, want) -> dict:
    """Max relative difference per leaf (to the leaf's max |value|) and the number of
    elements off by more than 1e-5 of it."""
    rel, off = 0.0, 0
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = np.abs(w).max() or 1.0
        d = np.abs(a - w) / scale
        rel, off = max(rel, float(d.max())), off + int((d > 1e-5).sum())
    return {"max_rel_param_diff": rel, "elements_over_1e-5": off}


def _train(model, params, policy, tx, sh, mesh, b):
    """Two steps (QAT with ``policy``, float without); returns (params, losses, HLO text, state)."""
    state = qp.init_train_state(params, tx, sh, key=0)
    if policy is None:
        step = qp.train_step(
            lambda p, bb, k: xent(model.apply(p, bb["x"]), bb), tx, sh, qp.batch_shardings(mesh, b)
        )
    else:
        step = qp.qat_step(model.apply, policy, xent, tx, sh, qp.batch_shardings(mesh, b))
    compiled = step.compile(state, b)
    text = compiled.as_text()
    losses = []
    for _ in range(2):
        state, metrics = compiled(state, b)
        losses.append(float(metrics["loss"]))
    return jax.tree.map(np.asarray, state.params), losses, text


def run_model(name: str) -> dict:
    model, shape = MODELS[name]
    rng = np.random.default_rng(0)
    b = {
        "x": rng.normal(size=shape).astype(np.float32),
        "y": rng.integers(0, CLASSES, BATCH).astype(np.int32),
    }
    params = model.init(jax.random.key(0), b["x"])
    qparams = qjax.quantize_params(params, POLICY)
    adam, tx = optax.adam(1e-3), optax.sgd(0.05, momentum=0.9)
    rows, ref = {}, {}
    for preset, (mesh_shape, rules) in PRESETS.items():
        mesh = qp.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
        adam_state = qp.init_train_state(params, adam, qp.train_state_shardings(params, adam, rules, mesh))
        train_mem = device0_bytes((adam_state.params, adam_state.opt_state))
        del adam_state
        sh = qp.train_state_shardings(params, tx, rules, mesh)
        row = {"mesh": dict(mesh.shape), "params_plus_adam_bytes_device0": train_mem}
        for kind, policy in (("train_float", None), ("train_qat", POLICY)):
            trained, losses, text = _train(model, params, policy, tx, sh, mesh, b)
            ref.setdefault(kind, (trained, losses))
            row[kind] = {
                **_diff(trained, ref[kind][0]),
                "max_abs_loss_diff": float(np.abs(np.subtract(losses, ref[kind][1])).max()),
                **comm(text),
            }
        for kind, p in (("serve_float", params), ("serve_int8", qparams)):
            psh = qp.shardings(p, rules, mesh)
            placed = jax.device_put(p, psh)
            ev = qp.eval_step(
                model.apply,
                None if kind == "serve_float" else POLICY,
                psh,
                qp.batch_sharding(mesh, len(shape)),
            )
            c = ev.compile(placed, b["x"])
            out = np.asarray(c(placed, b["x"]))
            ref.setdefault(kind, out)
            row[kind] = {
                "params_bytes_device0": device0_bytes(placed),
                "max_abs_out_diff": float(np.abs(out - ref[kind]).max()),
                "bit_identical": bool(np.array_equal(out, ref[kind])),
                **comm(c.as_text()),
            }
        rows[preset] = row
        print(name, preset, "done", flush=True)
    # int8 training on 8 data shards: global vs per-shard local scales of the weight-gradient matmul
    mesh = qp.make_mesh(data=8)
    sh = qp.train_state_shardings(params, tx, presets.data_parallel(), mesh)
    state = qp.init_train_state(params, tx, sh, key=0)
    int8 = {}
    for local in (False, True):
        step = qp.int8_step(
            model.apply, INT8, xent, tx, sh, qp.batch_shardings(mesh, b), local_scales=local, donate=False
        )
        ops = hlo.collectives(step.hlo(state, b))
        int8["local" if local else "global"] = {
            "max_min_all_reduces": sum(o.reduction in ("maximum", "minimum") for o in ops),
            "collectives": len(ops),
            "traffic_bytes_per_device": float(sum(o.traffic for o in ops)),
        }
    return {"presets": rows, "int8_training_data8": int8}


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Sharded execution: presets on 8 simulated CPU devices",
        "",
        f"{m['date']}, {m['processor']}, {m['cpu_count']} CPUs, jax {m['jax']}, {m['devices']} host devices. "
        "Generated by `experiments/parallel_report.py`. Byte counts from the compiled HLO and the "
        "placed arrays; no timings.",
        "",
        f"MLP {DIM}→{HIDDEN}→{CLASSES}; transformer block: {HEADS}-head attention, d={DIM}, MLP {HIDDEN}, "
        f"sequence {SEQ}, head to {CLASSES}; batch {BATCH}. Training: 2 SGD-momentum steps, float or QAT "
        "(int8 weights per channel, int8 activations per token, fake-quantized). Serving: the float model vs "
        "`qjax.quantized` with int8 `QArray` weights. Differences are against the same computation on one "
        "device, relative to each leaf's largest |value| (SGD: Adam's first steps, ≈ lr·sign(g), turn a "
        "near-zero gradient's rounding noise into a full step). Memory: params + Adam state.",
        "",
    ]
    for model, res in result["models"].items():
        rows = res["presets"]
        mem0 = rows["single (1 device)"]["params_plus_adam_bytes_device0"]
        lines += [
            f"## {model}",
            "",
            "Correctness vs one device:",
            "",
            "| preset | float train: max rel. diff (elements > 1e-5) "
            "| QAT train: max rel. diff (elements > 1e-5) | QAT loss diff | int8 serving output |",
            "|---|---|---|---|---|",
        ]
        for preset, r in rows.items():
            f, q, s = r["train_float"], r["train_qat"], r["serve_int8"]
            exact = "bit-identical" if s["bit_identical"] else f"max abs diff {s['max_abs_out_diff']:.1e}"
            lines.append(
                f"| {preset} | {f['max_rel_param_diff']:.1e} ({f['elements_over_1e-5']}) "
                f"| {q['max_rel_param_diff']:.1e} ({q['elements_over_1e-5']}) | {q['max_abs_loss_diff']:.1e} "
                f"| {exact} |"
            )
        lines += [
            "",
            "Memory per device and communication per step (KiB; comm = estimated bytes each device sends):",
            "",
            "| preset | params+Adam / device (ratio) | float train comm | QAT train comm "
            "| serve params / device float / int8 | serve comm float | serve comm int8 |",
            "|---|---|---|---|---|---|---|",
        ]
        for preset, r in rows.items():
            mem = r["params_plus_adam_bytes_device0"]
            sf, si = r["serve_float"], r["serve_int8"]
            tf, tq = r["train_float"]["traffic_bytes_per_device"], r["train_qat"]["traffic_bytes_per_device"]
            lines.append(
                f"| {preset} | {_kib(mem)} ({mem / mem0:.3f}) | {_kib(tf)} | {_kib(tq)} "
                f"| {_kib(sf['params_bytes_device0'])} / {_kib(si['params_bytes_device0'])} "
                f"| {_kib(sf['traffic_bytes_per_device'])} | {_kib(si['traffic_bytes_per_device'])} |"
            )
        g, loc = res["int8_training_data8"]["global"], res["int8_training_data8"]["local"]
        lines += [
            "",
            f"int8 training (forward and both backward matmuls int8), data parallel over 8: global scales: "
            f"{g['collectives']} collectives, {g['max_min_all_reduces']} max/min all-reduces (scales), "
            f"{_kib(g['traffic_bytes_per_device'])} KiB/device; per-shard local scales: "
            f"{loc['collectives']} collective(s), {loc['max_min_all_reduces']} max/min all-reduces, "
            f"{_kib(loc['traffic_bytes_per_device'])} KiB/device.",
            "",
        ]
    lines += [
        "Notes. Comm is estimated from the collectives XLA inserted (ring all-reduce 2(n-1)/n·S, all-gather "
        "(n-1)/n·S, ...). FSDP divides params + Adam state by 8; XLA's partitioner decides per matmul "
        "whether to gather the sharded weight or to move activations instead (with 32 rows it often "
        "moves activations). With int8 `QArray` weights, weight all-gathers move the int8 codes (1 byte "
        "per weight) instead of float32. Tensor parallelism keeps weights local and all-reduces "
        "activations (Megatron: one all-reduce per MLP / attention block forward). QAT differences above "
        "1e-5, where they occur, are isolated elements where a float summation-order difference flipped "
        "one rounding decision of the fake quantizer.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default %(default)s)")
    args = ap.parse_args()
    result = {"machine": machine(), "models": {name: run_model(name) for name in MODELS}}
    write("parallel_report", result, markdown(result), args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
