"""Small models, data and policies shared by the parallel tests (and their subprocess workers)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax

B, D, C = 16, 16, 8


class MLP(nn.Module):
    """Megatron pair: ``up`` (column split) then ``down`` (row split)."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(C, name="down")(nn.relu(nn.Dense(self.hidden, name="up")(x)))


class Block(nn.Module):
    """A transformer block: multi-head attention (query/key/value/out) and an MLP, then a head."""

    heads: int = 8
    head_dim: int = 2
    hidden: int = 32

    @nn.compact
    def __call__(self, x):  # x: [B, S, D]
        e = x.shape[-1]
        # no key bias: its gradient is zero in exact arithmetic (softmax shift invariance), so
        # Adam would amplify rounding noise
        q, k, v = (
            nn.DenseGeneral((self.heads, self.head_dim), use_bias=n != "key", name=n)(x)
            for n in ("query", "key", "value")
        )
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim), axis=-1)
        a = nn.DenseGeneral(e, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        x = nn.LayerNorm(name="ln")(x + a)
        x = x + nn.Dense(e, name="down")(nn.gelu(nn.Dense(self.hidden, name="up")(x)))
        return nn.Dense(C, name="head")(x.mean(axis=1))


def batch(seed: int = 0, seq: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (B, D) if seq is None else (B, seq, D)
    return {"x": rng.normal(size=shape).astype(np.float32), "y": rng.integers(0, C, B).astype(np.int32)}


def init(model: nn.Module, x: np.ndarray):
    return model.init(jax.random.key(0), x)


def sgd():
    """The tests' optimizer: with SGD the sharded/single-device difference stays proportional
    to the gradients' float rounding differences (Adam's first steps are ``lr·sign(g)``, which
    turns a near-zero gradient's rounding noise into a full step)."""
    return optax.sgd(0.1, momentum=0.9)


def xent(out, b):
    return optax.softmax_cross_entropy_with_integer_labels(out, b["y"]).mean()


W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
QAT = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8, act=A8)])
G8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
INT8 = qjax.Policy([qjax.Rule(r".*/kernel", weight=W8, act=A8, grad=G8)])


def preemptible_run(num_devices: int = 8):
    """The run the preemption tests kill and resume: int8 training (stochastic rounding: the
    PRNG key matters) with magnitude pruning (masks in the optimizer state), hybrid-sharded.

    Returns ``(step, state, batch_fn, state_shardings)``; ``batch_fn(step)`` derives the
    batch from the step number."""
    from qjax import parallel as qp

    model = MLP()
    mesh = qp.make_mesh(2, 2, 2) if num_devices == 8 else qp.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = qjax.prune.sparsify(optax.adam(1e-2), qjax.prune.Magnitude(sparsity=0.5), qjax.prune.periodic(3, 1))
    params = init(model, batch(0)["x"])
    sh = qp.train_state_shardings(params, tx, qp.presets.hybrid(), mesh)
    state = qp.init_train_state(params, tx, sh, key=3)

    def loss_fn(p, b, key):
        return xent(qjax.fake_quantized(model.apply, INT8, key=key)(p, b["x"]), b)

    step = qp.train_step(loss_fn, tx, sh, qp.batch_shardings(mesh, batch(0)))
    return step, state, lambda s: batch(100 + s), sh


def two_process_run(global_batch: bool, steps: int = 3):
    """QAT of the MLP on one hybrid 2×2×2 mesh: from per-process rows assembled into global
    batches (``global_batch=True``, one process per half of the devices) or from the whole
    batch in one process. Returns ``(state, losses, state_shardings)``."""
    from qjax import parallel as qp

    model, tx = MLP(), sgd()
    mesh = qp.make_mesh(2, 2, 2)
    params = init(model, batch(0)["x"])
    sh = qp.train_state_shardings(params, tx, qp.presets.hybrid(), mesh)
    state = qp.init_train_state(params, tx, sh, key=5)
    bsh = qp.batch_shardings(mesh, batch(0))
    step = qp.qat_step(model.apply, QAT, xent, tx, sh, bsh)
    losses = []
    for s in range(steps):
        b = batch(200 + s)
        if global_batch:
            rows = qp.multihost.process_rows(B, bsh["x"])
            b = qp.multihost.global_batch({k: v[rows] for k, v in b.items()}, bsh)
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return state, losses, sh
