"""Sharded train/eval steps on 8 CPU devices equal the single-device step, per preset."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qjax
from qjax import parallel as qp
from qjax.parallel import hlo, presets

from .common import INT8, MLP, QAT, Block, batch, init, sgd, xent

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
