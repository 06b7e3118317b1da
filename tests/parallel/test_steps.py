"""Sharded train/eval steps on 8 CPU devices equal the single-device step, per preset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import qjax
from qjax import parallel as qp
from qjax.parallel import hlo, presets

from .common import A8, INT8, MLP, QAT, Block, batch, init, sgd, xent

PRESETS = {
    "data": ((8, 1, 1), presets.data_parallel()),
    "fsdp": ((1, 8, 1), presets.fsdp()),
    "tensor": ((1, 1, 8), presets.tensor_parallel()),
    "hybrid": ((2, 2, 2), presets.hybrid()),
}
STEPS = 3


def run(model, b, policy, shape, rules, *, axis_types="auto", steps=STEPS, tx=None, local=False):
    """Train ``steps`` QAT/int8 steps on a mesh of ``shape``; return (state, losses, HLO text)."""
    tx = tx or sgd()
    mesh = qp.make_mesh(*shape, axis_types=axis_types, devices=jax.devices()[: int(np.prod(shape))])
    params = init(model, b["x"])
    sh = qp.train_state_shardings(params, tx, rules, mesh)
    state = qp.init_train_state(params, tx, sh, key=7)
    make = qp.int8_step if policy is INT8 else qp.qat_step
    kw = {"local_scales": local} if policy is INT8 else {}
    step = make(model.apply, policy, xent, tx, sh, qp.batch_shardings(mesh, b), **kw)
    step = step.compile(state, b)  # one compilation, also read for its collectives
    losses = []
    for _ in range(steps):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return state, losses, step.as_text()


def assert_close(got, want, rtol=1e-5):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        scale = np.abs(w).max() or 1.0
        assert np.abs(g - w).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(g - w).max(), scale)


@pytest.fixture(scope="module")
def mlp_reference():
    b = batch(0)
    state, losses, _ = run(MLP(), b, QAT, (1, 1, 1), presets.data_parallel())
    return b, jax.tree.map(np.asarray, state), losses


@pytest.mark.parametrize("name", list(PRESETS))
def test_qat_preset_matches_single_device(name, mlp_reference):
    b, want, want_losses = mlp_reference
    shape, rules = PRESETS[name]
    state, losses, text = run(MLP(), b, QAT, shape, rules)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_close(state.params, want.params)
    assert_close(state.opt_state, want.opt_state)
    assert int(state.step) == STEPS
    # params and momentum keep the preset's layout (pinned, not drifted)
    specs = jax.tree.map(lambda a: a.sharding.spec, state.params)["params"]
    trace = jax.tree.map(lambda a: a.sharding.spec, state.opt_state[0].trace)["params"]
    assert specs == trace
    expected = {
        "data": {"up": P(None, None), "down": P(None, None)},
        "fsdp": {"up": P(None, "fsdp"), "down": P("fsdp", None)},
        "tensor": {"up": P(None, "tensor"), "down": P("tensor", None)},
        "hybrid": {"up": P("fsdp", "tensor"), "down": P("tensor", "fsdp")},
    }[name]
    for layer, spec in expected.items():
        assert specs[layer]["kernel"] == spec, (layer, specs[layer])
    shard = state.params["params"]["up"]["kernel"].sharding.shard_shape((16, 32))
    assert shard == {"data": (16, 32), "fsdp": (16, 4), "tensor": (16, 4), "hybrid": (8, 16)}[name]
    kinds = {op.kind for op in hlo.collectives(text)}
    # data/fsdp reduce gradients; fsdp gathers weights; tensor needs its row-split all-reduce
    assert "all-reduce" in kinds
    if name in ("fsdp", "hybrid"):
        assert "all-gather" in kinds


def test_transformer_block_hybrid():
    b = batch(1, seq=4)
    want, want_losses, _ = run(Block(), b, QAT, (1, 1, 1), presets.data_parallel(), steps=2)
    for name in ("hybrid",):  # the other presets are checked on the MLP
        shape, rules = PRESETS[name]
        state, losses, _ = run(Block(), b, QAT, shape, rules, steps=2)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
        assert_close(state.params, want.params)
        p = state.params["params"]
        # Megatron: heads split for query/key/value, rows (heads) for the output projection
        assert p["query"]["kernel"].sharding.spec[1] == "tensor"
        assert p["out"]["kernel"].sharding.spec[0] == "tensor"
        assert p["query"]["kernel"].sharding.shard_shape((16, 8, 2))[1] == 8 // shape[2]


def test_explicit_axes_match(mlp_reference):
    b, want, want_losses = mlp_reference
    state, losses, _ = run(MLP(), b, QAT, (2, 2, 2), presets.hybrid(), axis_types="explicit")
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_close(state.params, want.params)
    assert state.params["params"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_explicit_axes_eval_is_exact():
    b = batch(8)
    model = MLP()
    qparams = qjax.quantize_params(init(model, b["x"]), QAT)
    want = jax.jit(qjax.quantized(model.apply, QAT))(qparams, b["x"])
    mesh = qp.make_mesh(2, 2, 2, axis_types="explicit")
    psh = qp.shardings(qparams, presets.hybrid(), mesh)
    got = qp.eval_step(model.apply, QAT, psh, qp.batch_sharding(mesh, 2))(
        jax.device_put(qparams, psh), b["x"]
    )
    np.testing.assert_array_equal(got, want)
    assert got.sharding.spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("preset", ["hybrid"])
def test_explicit_axes_local_scales_with_tensor_parallel_params(preset):
    """``int8_step(local_scales=True)`` (a ``shard_map`` over the batch axes) on an
    Explicit mesh whose tensor axis splits the params: the body runs with that axis Auto
    and matches the Auto mesh (it raised ShardingTypeError: contracting dims sharded)."""
    b = batch(3)
    shape = (2, 1, 4) if preset == "tensor" else (2, 2, 2)
    rules = PRESETS[preset][1]
    auto, auto_losses, _ = run(MLP(), b, INT8, shape, rules, local=True, steps=2)
    got, losses, _ = run(MLP(), b, INT8, shape, rules, local=True, steps=2, axis_types="explicit")
    np.testing.assert_allclose(losses, auto_losses, rtol=1e-6)
    assert_close(got.params, jax.tree.map(np.asarray, auto.params), rtol=1e-6)


def test_int8_step_takes_qat_steps_local_batch_axes_name():
    # int8_step(local_batch_axes=...) is int8_step(local_scales=True, batch_axes=...)
    b = batch(4)
    mesh = qp.make_mesh(2, 2, 2)
    params, tx = init(MLP(), b["x"]), sgd()
    sh = qp.train_state_shardings(params, tx, presets.hybrid(), mesh)
    bsh = qp.batch_shardings(mesh, b)
    losses = []
    for kw in ({"local_scales": True}, {"local_batch_axes": ("data", "fsdp")}):
        step = qp.int8_step(MLP().apply, INT8, xent, tx, sh, bsh, donate=False, **kw)
        losses.append(float(step(qp.init_train_state(params, tx, sh, key=7), b)[1]["loss"]))
    assert losses[0] == losses[1]
    with pytest.raises(ValueError, match="not both"):
        qp.int8_step(MLP().apply, INT8, xent, tx, sh, bsh, local_scales=True, local_batch_axes=("data",))


def test_explicit_axes_eval_with_a_scalar_output():
    """Default output shardings on an Explicit mesh: leaves with a leading axis the batch
    axes divide are split like the batch, others (a scalar aux) replicated (it raised a bare
    AssertionError)."""
    import flax.linen as nn

    class TwoOutputs(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, name="up")(x)
            return nn.Dense(4, name="down")(h), jnp.mean(h), jnp.zeros(3)

    b = batch(9)
    model = TwoOutputs()
    params = model.init(jax.random.key(0), b["x"])
    want = model.apply(params, b["x"])
    mesh = qp.make_mesh(2, 2, 2, axis_types="explicit")
    psh = qp.shardings(params, presets.hybrid(), mesh)
    step = qp.eval_step(model.apply, None, psh, qp.batch_sharding(mesh, 2))
    got = step(jax.device_put(params, psh), b["x"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert got[0].sharding.spec == P(("data", "fsdp"), None)
    assert got[1].sharding.is_fully_replicated and got[2].sharding.is_fully_replicated


LSQ = qjax.Policy(
    [qjax.Rule(r".*/kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq"), act=A8)]
)


def _lsq_reference_grads(params, b):
    """First-step gradients of a hand-written LSQ loss (params and scales separately)."""
    scales = qjax.lsq_scales(params, LSQ)

    def loss(p, s):
        return xent(qjax.fake_quantized(MLP().apply, LSQ, scales=s)(p, b["x"]), b)

    return jax.grad(loss, argnums=(0, 1))(params, scales)


@pytest.mark.parametrize("kind", ["qat", "prune", "distill"])
def test_lsq_trains_in_every_step(kind):
    """LSQ through the ready-made steps: the trained LSQParams (params + learned scales,
    scales sharded like their weights) gets the hand-written loss's gradients, learns, and
    exports to a quantized model equal to its fake-quantized forward."""
    b = batch(0)
    mesh = qp.make_mesh(2, 2, 2, devices=jax.devices()[:8])
    params = init(MLP(), b["x"])
    trained = qjax.lsq_params(params, LSQ)
    tx = optax.sgd(1.0)  # first update == -gradient
    if kind == "prune":
        tx = qjax.prune.sparsify(tx, qjax.prune.Magnitude(0.5), qjax.prune.one_shot(100))
    tree = {"student": trained, "adapters": {}} if kind == "distill" else trained
    sh = qp.train_state_shardings(tree, tx, presets.hybrid(), mesh)
    student_sh = sh.params["student"] if kind == "distill" else sh.params
    for name in ("up", "down"):  # a scale follows its weight's mesh axes, None on its size-1 axis
        w_spec = student_sh.params["params"][name]["kernel"].spec
        assert tuple(student_sh.scales[f"params/{name}/kernel"].spec) == (None, w_spec[1]), (name, w_spec)
    assert "tensor" in tuple(student_sh.params["params"]["down"]["kernel"].spec)[:1]  # row-split weight
    state = qp.init_train_state(tree, tx, sh)
    bs = qp.batch_shardings(mesh, b)
    if kind == "qat":
        step = qp.qat_step(MLP().apply, LSQ, xent, tx, sh, bs, donate=False)
    elif kind == "prune":
        step = qp.prune_step(MLP().apply, xent, tx, sh, bs, policy=LSQ, donate=False)
    else:
        objective = lambda s, t, batch, a: xent(s.logits, batch)
        no_teacher = qp.replicated(mesh, {})
        step = qp.distill_train_step(
            MLP().apply, None, objective, tx, sh, no_teacher, bs, student_policy=LSQ, donate=False
        )
    extra = ({},) if kind == "distill" else ()
    new, m0 = step(state, b, *extra)
    before = state.params["student"] if kind == "distill" else state.params
    after = new.params["student"] if kind == "distill" else new.params
    gp, gs = _lsq_reference_grads(params, b)
    assert_close(jax.tree.map(lambda o, n: o - n, before.params, after.params), gp, rtol=1e-4)
    assert_close(jax.tree.map(lambda o, n: o - n, before.scales, after.scales), gs, rtol=1e-4)
    for _ in range(3):
        new, m = step(new, b, *extra)
    assert float(m["loss"]) < float(m0["loss"])
    final = new.params["student"] if kind == "distill" else new.params
    served = qjax.quantized(MLP().apply, LSQ)(qjax.quantize_params(final, LSQ), b["x"])
    fake = qjax.fake_quantized(MLP().apply, LSQ)(final, b["x"])
    np.testing.assert_allclose(np.asarray(served), np.asarray(fake), atol=1e-4 * float(np.abs(fake).max()))
