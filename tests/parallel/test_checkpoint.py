"""Sharded checkpoints (params with QArrays, masks, optimizer state, step, key) saved on a
2×4 mesh restore on 8×1 and 1×1 meshes with identical values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import qjax
from qjax import checkpoint
from qjax import parallel as qp
from qjax.parallel import presets


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], (32, 16))
    return {
        "params": {
            "up": {"kernel": jax.random.normal(k[1], (16, 32)), "bias": jnp.arange(32.0)},
            "down": {
                "kernel": qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(-1,))),
                "bias": jnp.zeros(16),
            },
            "q4": {
                "kernel": qjax.quantize(
                    w, qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)
                )
            },
        },
        "masks": {"up": {"kernel": jax.random.normal(k[2], (16, 32)) > 0}},
    }


MESHES = {"2x4": (1, 2, 4), "8x1": (1, 8, 1), "1x1": (1, 1, 1)}


def _mesh(name):
    shape = MESHES[name]
    return qp.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("target", ["8x1", "1x1"])
def test_qjax_checkpoint_across_mesh_shapes(tmp_path, target):
    tree = _tree()
    saved = jax.device_put(tree, qp.shardings(tree, presets.hybrid(), _mesh("2x4")))
    assert saved["params"]["q4"]["kernel"].scale.sharding.spec == P("fsdp", None)  # (4, 16) group scales
    assert saved["params"]["down"]["kernel"].values.sharding.spec == P("tensor", "fsdp")
    checkpoint.save(tmp_path / "c", saved)
    sh = qp.shardings(tree, presets.fsdp(), _mesh(target))
    got = checkpoint.restore(tmp_path / "c", tree, shardings=sh)
    _same(got, tree)
    for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(sh)):
        assert x.sharding == s


def test_train_checkpointer_across_mesh_shapes(tmp_path):
    params = {"up": {"kernel": jnp.ones((16, 32)), "bias": jnp.ones(32)}}
    tx = qjax.prune.sparsify(optax.adam(1e-2), qjax.prune.Magnitude(sparsity=0.5), qjax.prune.one_shot(0))
    sh = qp.train_state_shardings(params, tx, presets.hybrid(), _mesh("2x4"))
    state = qp.init_train_state(params, tx, sh, key=1)
    grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    state = state._replace(
        params=optax.apply_updates(state.params, updates), opt_state=opt, step=state.step + 1
    )
    with qp.TrainCheckpointer(tmp_path / "run", every=1, async_save=True) as ckpt:
        assert ckpt.save(1, state)
    want = jax.tree.map(np.asarray, state)
    for target in ("8x1", "1x1"):
        tsh = qp.train_state_shardings(params, tx, presets.fsdp(), _mesh(target))
        with qp.TrainCheckpointer(tmp_path / "run", every=1) as ckpt:
            got = ckpt.restore(jax.eval_shape(lambda: state), tsh)
        _same(got, want)
        masks = qjax.prune.get_masks(got.opt_state)["up"]["kernel"]
        assert masks.dtype == jnp.bool_ and masks.sharding == tsh.params["up"]["kernel"]
    with qp.TrainCheckpointer(tmp_path / "run", every=1) as ckpt, pytest.raises(ValueError, match="leaf 0"):
        ckpt.restore({"other": jnp.zeros(3)})
    with qp.TrainCheckpointer(tmp_path / "empty", every=1) as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(state)


def test_train_checkpointer_typed_keys(tmp_path):
    """Typed PRNG keys (any implementation) in a train state save as their key data and
    restore as keys, with a target of arrays or of ``jax.eval_shape``; a key target for a
    saved array (or the other way round) names the leaf."""
    state = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "key": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(4, impl="rbg"), 4),
    }
    with qp.TrainCheckpointer(tmp_path / "run", every=1, async_save=False) as ckpt:
        assert ckpt.save(1, state)
    for target in (state, jax.eval_shape(lambda: state)):
        with qp.TrainCheckpointer(tmp_path / "run", every=1) as ckpt:
            got = ckpt.restore(target)
        for name in ("key", "keys"):
            assert got[name].dtype == state[name].dtype
            np.testing.assert_array_equal(jax.random.key_data(got[name]), jax.random.key_data(state[name]))
        np.testing.assert_array_equal(got["w"], state["w"])
    wrong = {**state, "key": jax.random.key_data(state["key"])}
    with qp.TrainCheckpointer(tmp_path / "run", every=1) as ckpt, pytest.raises(ValueError, match="key"):
        ckpt.restore(wrong)


def test_train_checkpointer_flax_train_state_and_sub_byte_leaves(tmp_path):
    """A fresh Flax TrainState's step is a Python int: saving it and restoring into it
    failed ('int' object has no attribute 'dtype'); uint4 / fp8 leaves round-trip
    bit-exact. The docstring's example runs."""
    import flax.linen as nn
    from flax.training import train_state

    m = nn.Dense(3)
    fresh = train_state.TrainState.create(
        apply_fn=m.apply, params=m.init(jax.random.key(0), jnp.ones((1, 4))), tx=optax.adam(1e-3)
    )
    assert type(fresh.step) is int
    state = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params)))(fresh)
    with qp.TrainCheckpointer(tmp_path / "run", every=1, async_save=False) as ckpt:
        assert ckpt.save(0, fresh) and ckpt.save(1, state)
    with qp.TrainCheckpointer(tmp_path / "run", every=1) as ckpt:
        got = ckpt.restore(fresh)
        assert int(got.step) == 1 and int(ckpt.restore(state, step=0).step) == 0
    _same(got.params, state.params)
    _same(got.opt_state, state.opt_state)
    extra = {
        "u4": jnp.asarray(np.arange(16) % 16, jnp.uint4),
        "f8": jnp.linspace(-2, 2, 5).astype(jnp.float8_e4m3fn),
    }
    with qp.TrainCheckpointer(tmp_path / "sub", every=1, async_save=False) as ckpt:
        ckpt.save(1, extra)
        got = ckpt.restore(extra)
    for k, x in extra.items():
        assert got[k].dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint8), np.asarray(x).view(np.uint8))
    with qp.TrainCheckpointer(tmp_path / "bad", every=1) as ckpt:
        with pytest.raises(TypeError, match="leaf 'name'"):
            ckpt.save(1, {"name": "run1"})
    # the class docstring's example
    state, shardings, num_steps = {"w": jnp.zeros(3), "step": 0}, None, 3
    train = lambda s: {"w": s["w"] + 1, "step": s["step"] + 1}
    for _ in range(2):  # a fresh run, then a resumed one that finds the run finished
        with qp.TrainCheckpointer(tmp_path / "doc", every=1) as ckpt:
            if ckpt.latest_step() is not None:
                state = ckpt.restore(state, shardings)
            for step in range(int(state["step"]), num_steps):
                state = train(state)
                ckpt.save(step + 1, state)
    np.testing.assert_array_equal(state["w"], 3.0)


def test_train_checkpointer_skips_per_leaf_work_on_steps_that_do_not_save(tmp_path, monkeypatch):
    from qjax.parallel import loop

    calls = []
    flat = loop._flat
    monkeypatch.setattr(loop, "_flat", lambda s: calls.append(1) or flat(s))
    state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
    with qp.TrainCheckpointer(tmp_path / "run", every=3, async_save=False) as ckpt:
        saved = [ckpt.save(s, state) for s in (3, 4, 5, 6, 7)]  # Orbax saves the first one it sees
        assert saved == [True, False, False, True, False] and len(calls) == 2  # only saving steps flatten
        assert ckpt.save(7, state, force=True) and len(calls) == 3  # forced: saves off the interval
        assert not ckpt.save(7, state) and len(calls) == 3  # already saved
        assert ckpt.all_steps() == [6, 7]  # keep=2
        # an unstorable leaf is reported at the first step that saves
        assert not ckpt.save(8, {"name": "run1"})
        with pytest.raises(TypeError, match="leaf 'name'"):
            ckpt.save(9, {"name": "run1"})
        np.testing.assert_array_equal(ckpt.restore(state, step=7)["w"], state["w"])
