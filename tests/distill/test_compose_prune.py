"""Distillation composed with pruning (``sparsify``) and fake quantization in one jitted step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
from qjax import distill, prune


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="body")(x))
        return nn.Dense(5, name="head")(x)


X = jax.random.normal(jax.random.key(0), (64, 12))
Y = jax.random.randint(jax.random.key(1), (64,), 0, 5)
TEACHER, STUDENT = MLP(64), MLP(16)
T_VARS = TEACHER.init(jax.random.key(2), X)
S_VARS = STUDENT.init(jax.random.key(3), X)
FEAT = "params/body/kernel"


def kd_hint(student, teacher, batch, adapters):
    kd = distill.kd_loss(student.logits, teacher.logits, batch["y"], 4.0, 0.9)
    s_feat, t_feat = student.features[FEAT]["output"], teacher.features[FEAT]["output"]
    hint = distill.hint_loss(s_feat, t_feat, adapters["body"])
    return kd + 0.5 * hint


def _kernels(params):
    return {p: np.asarray(x) for p, x in qjax.rules.leaves_with_paths(params) if p.endswith("kernel")}


def test_distill_while_pruning_and_fake_quantizing_in_one_jit():
    pruner = prune.Magnitude(0.75, rules=[(r"adapters/.*", None)])  # prune the student only
    schedule = prune.polynomial(0.75, begin=0, end=20, every=5)
    int4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=int4)])
    ds = distill.distill_step(
        STUDENT.apply,
        TEACHER.apply,
        kd_hint,
        prune.sparsify(optax.adam(1e-2), pruner, schedule),
        student_patterns=[FEAT],
        teacher_patterns=[FEAT],
        student_policy=policy,
    )
    state = ds.init(S_VARS, {"body": distill.init_adapter(jax.random.key(4), 16, 64)})
    batch = {"x": X, "y": Y}
    losses = []
    for _ in range(30):
        state, metrics = ds.step(state, T_VARS, batch)  # one jitted step: KD + hint + QAT + pruning
        losses.append(float(metrics["loss"]))
    masks = prune.get_masks(state.opt_state)
    kernels = _kernels(state.params["student"])
    for path, mask in qjax.rules.leaves_with_paths(masks["student"]):
        if mask is None:
            continue
        w = kernels[path]
        assert np.all(w[~np.asarray(mask)] == 0.0), path  # pruned weights are exactly zero
        assert np.mean(w == 0) >= 0.75 - 1e-6, path
    assert jax.tree.leaves(masks["adapters"]) == []  # adapters skipped by the rule
    assert np.mean(losses[-5:]) < losses[0]
    # The exported student: pruned and int4, runnable with integer execution.
    q = qjax.quantize_params(state.params["student"], policy)
    y = qjax.quantized(STUDENT.apply, policy)(q, X)
    assert y.shape == (64, 5) and bool(jnp.all(jnp.isfinite(y)))
    # Its int4 codes keep the zeros of the pruned weights.
    codes = np.asarray(q["params"]["body"]["kernel"].dequantize())
    assert np.all(codes[kernels["params/body/kernel"] == 0] == 0)
