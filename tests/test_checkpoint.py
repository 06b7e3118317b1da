"""qjax.checkpoint: exact Orbax round trips of QArrays, masks, plain arrays and policies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax import checkpoint


def _w(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def linen_tree():
    q = qjax.quantize
    return {
        "params": {
            "Dense_0": {
                "kernel": q(_w(0, (16, 8)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,))),
                "bias": _w(1, (8,), jnp.bfloat16),
            },
            "Dense_1": {
                "kernel": q(
                    _w(2, (32, 8)), qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)
                ),
                "bias": jnp.arange(8, dtype=jnp.int32),
            },
            "int2": q(_w(3, (8, 12)), qjax.QuantSpec(qjax.int2, channel_axes=(0,))),
            "asym": q(
                _w(4, (8, 6), jnp.bfloat16), qjax.QuantSpec(qjax.uint8, channel_axes=(-1,), symmetric=False)
            ),
            "e4m3": q(_w(5, (4, 8)), qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,))),
            "e5m2": q(_w(6, (4, 8)), qjax.QuantSpec(qjax.fp8_e5m2)),
            "bf16 scales": q(
                _w(7, (16, 8)), qjax.QuantSpec(qjax.int4, channel_axes=(-1,), scale_dtype="bfloat16")
            ),
            "raw_fp8": _w(7, (3, 5)).astype(jnp.float8_e4m3fn),
            "e2m1": q(_w(9, (64, 8)), qjax.mx_spec(qjax.fp4_e2m1)),  # packed fp4, E8M0 scales
            "e2m1_unpacked": q(_w(10, (4, 6)), qjax.QuantSpec(qjax.fp4_e2m1, pack=False)),
            "mxfp8": q(_w(11, (32, 8)), qjax.mx_spec(qjax.fp8_e4m3)),
            "nf4": q(
                _w(12, (128, 8)), qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=64, group_axis=0)
            ),
        },
        "masks": {"Dense_0": {"kernel": _w(8, (16, 8)) > 0}},
        "extra": [None, (jnp.float32(1.5), 7, "note")],
    }


def assert_identical(a, b):
    """Same structure (QArray static metadata included) and bit-identical arrays."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if hasattr(x, "dtype"):
            assert isinstance(y, jax.Array)
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.ravel(x).view(np.uint8), np.ravel(y).view(np.uint8))
        else:
            assert type(x) is type(y) and x == y


def test_round_trip_without_target(tmp_path):
    tree = linen_tree()
    checkpoint.save(tmp_path / "ckpt", tree)
    restored = checkpoint.restore(tmp_path / "ckpt")
    assert_identical(tree, restored)
    k = restored["params"]["Dense_1"]["kernel"]
    assert (k.format, k.group_size, k.packed_axis, k.packed_length) == (qjax.int4, 8, -1, 8)
    assert k.values.dtype == jnp.uint8 and k.values.shape == (32, 4)
    assert restored["params"]["asym"].zero_point is not None
    assert restored["params"]["Dense_0"]["kernel"].zero_point is None
    assert restored["params"]["e4m3"].values.dtype == jnp.float8_e4m3fn
    assert restored["params"]["e2m1_unpacked"].values.dtype == jnp.float4_e2m1fn
    assert restored["params"]["e2m1"].scale.dtype == jnp.float8_e8m0fnu
    assert (restored["params"]["nf4"].format, restored["params"]["e2m1"].format) == (qjax.nf4, qjax.fp4_e2m1)
    np.testing.assert_array_equal(qjax.dequantize(k), qjax.dequantize(tree["params"]["Dense_1"]["kernel"]))
    meta = json.loads((tmp_path / "ckpt" / "qjax_checkpoint.json").read_text())
    assert meta["qjax_checkpoint"] == checkpoint.FORMAT_VERSION
    assert checkpoint.restore_policy(tmp_path / "ckpt") is None


def test_round_trip_into_abstract_target(tmp_path):
    tree = linen_tree()
    checkpoint.save(tmp_path, tree)  # an existing empty directory is fine
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree
    )
    assert_identical(tree, checkpoint.restore(tmp_path, abstract))
    assert_identical(tree, checkpoint.restore(tmp_path, tree))


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def test_nnx_state_round_trip(tmp_path):
    graphdef, state = nnx.split(_MLP(nnx.Rngs(0)))
    policy = qjax.Policy([qjax.Rule(r".*kernel", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)))])
    qstate = qjax.quantize_params(state, policy)
    checkpoint.save(tmp_path / "c", qstate, policy=policy)

    abstract = nnx.eval_shape(lambda: qjax.quantize_params(nnx.split(_MLP(nnx.Rngs(1)))[1], policy))
    restored = checkpoint.restore(tmp_path / "c", abstract)
    assert isinstance(restored, nnx.State)
    assert isinstance(restored["up"]["kernel"], nnx.Param)
    assert_identical(qstate, restored)
    assert checkpoint.restore_policy(tmp_path / "c") == policy
    model = nnx.merge(graphdef, qjax.dequantize_params(restored))
    assert model(jnp.ones((2, 8))).shape == (2, 4)

    with pytest.raises(ValueError, match=r"down/kernel.*kind.*'qarray'.*'array'"):
        checkpoint.restore(tmp_path / "c", state)  # float target: QArray-ness differs
    with pytest.raises(ValueError, match=r"State.*target="):
        checkpoint.restore(tmp_path / "c")


def test_policy_round_trip(tmp_path):
    policy = qjax.Policy(
        [
            qjax.Rule(r"params/.*embed.*", None),
            qjax.Rule(
                r"params/.*/kernel",
                weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,), calibration=qjax.calib.mse(32, 0.3)),
                act=qjax.QuantSpec(
                    qjax.int8, channel_axes=qjax.PER_TOKEN, calibration=qjax.calib.percentile(99.9)
                ),
            ),
            qjax.Rule(
                r"params/head/.*",
                weight=qjax.QuantSpec(
                    qjax.uint4,
                    symmetric=False,
                    group_size=32,
                    group_axis=0,
                    calibration=qjax.calib.fixed(-1, 2),
                ),
                act=qjax.QuantSpec(qjax.fp8_e4m3),
            ),
        ]
    )
    checkpoint.save(tmp_path / "c", {"w": jnp.ones(3)}, policy=policy)
    restored = checkpoint.restore_policy(tmp_path / "c")
    assert restored == policy
    assert restored.rules[1].act.channel_axes is qjax.PER_TOKEN
    with pytest.raises(TypeError, match="Policy"):
        checkpoint.save(tmp_path / "d", {"w": jnp.ones(3)}, policy={"rules": []})


def test_mismatched_target_names_path(tmp_path):
    tree = linen_tree()
    checkpoint.save(tmp_path / "c", tree)

    def expect(edit, msg):
        target = jax.tree.map(lambda x: x, tree)
        edit(target)
        with pytest.raises(ValueError, match=msg):
            checkpoint.restore(tmp_path / "c", target)

    def drop_bias(t):
        del t["params"]["Dense_0"]["bias"]

    def set_leaf(*keys, value):
        def edit(t):
            for k in keys[:-1]:
                t = t[k]
            t[keys[-1]] = value

        return edit

    expect(
        drop_bias,
        r"first differing leaf: checkpoint has 'params/Dense_0/bias' where the target has "
        r"'params/Dense_0/kernel'",
    )
    expect(
        set_leaf("params", "Dense_0", "bias", value=jnp.zeros(9, jnp.bfloat16)),
        r"'params/Dense_0/bias' differs in shape: checkpoint \[8\], target \[9\]",
    )
    expect(
        set_leaf("masks", "Dense_0", "kernel", value=jnp.zeros((16, 8), jnp.int8)),
        r"'masks/Dense_0/kernel' differs in dtype: checkpoint 'bool', target 'int8'",
    )
    int4 = qjax.quantize(_w(3, (8, 12)), qjax.QuantSpec(qjax.int4, channel_axes=(0,)))
    expect(
        set_leaf("params", "int2", value=int4),
        r"'params/int2' differs in format: checkpoint 'int2', target 'int4'",
    )
    expect(set_leaf("zzz", value=jnp.ones(2)), r"checkpoint has no more leaves where the target has 'zzz'")
    with pytest.raises(TypeError, match=r"leaf 'bad'.*object"):
        checkpoint.save(tmp_path / "bad", {"bad": object()})


def test_prng_keys_round_trip(tmp_path):
    """Typed PRNG keys (default and rbg implementations, scalar, split and empty) come back
    as keys of the same implementation that draw the same numbers."""
    tree = {
        "rng": jax.random.key(3),
        "split": jax.random.split(jax.random.key(4), 3),
        "rbg": jax.random.key(5, impl="rbg"),
        "none": jax.random.split(jax.random.key(6), 0),
        "w": _w(0, (2, 3)),
    }
    checkpoint.save(tmp_path / "k", tree)

    def same(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert jax.random.key_impl(a) == jax.random.key_impl(b)
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        if a.size:
            np.testing.assert_array_equal(
                jax.random.uniform(a.reshape(-1)[0], (4,)), jax.random.uniform(b.reshape(-1)[0], (4,))
            )

    abstract = jax.eval_shape(lambda: tree)
    for restored in (
        checkpoint.restore(tmp_path / "k"),
        checkpoint.restore(tmp_path / "k", tree),
        checkpoint.restore(tmp_path / "k", abstract),
    ):
        for name in ("rng", "split", "rbg", "none"):
            same(tree[name], restored[name])
        np.testing.assert_array_equal(restored["w"], tree["w"])
    # a raw uint32 target where a key was saved, and a key of another implementation
    with pytest.raises(ValueError, match=r"'rng' differs in kind: checkpoint 'key', target 'array'"):
        checkpoint.restore(tmp_path / "k", {**tree, "rng": jax.random.key_data(tree["rng"])})
    with pytest.raises(ValueError, match=r"'rng' differs in dtype: checkpoint 'key<fry>', target 'key<rbg>'"):
        checkpoint.restore(tmp_path / "k", {**tree, "rng": jax.random.key(3, impl="rbg")})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        checkpoint.restore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        checkpoint.restore_policy(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a qjax checkpoint"):
        checkpoint.restore(tmp_path)


def test_damaged_checkpoints_name_the_file_or_the_leaf(tmp_path):
    """Truncated metadata names the file; missing array data names the leaf (not the
    storage layer's internal ``leaf_000001`` key)."""
    tree = {"a": jnp.arange(4.0), "b": {"w": jnp.ones((3, 2))}}
    checkpoint.save(tmp_path / "c", tree)
    meta = tmp_path / "c" / "qjax_checkpoint.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"qjax_checkpoint.json is not valid JSON"):
        checkpoint.restore(tmp_path / "c")
    meta.write_text(text)
    for f in (tmp_path / "c" / "arrays").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    with pytest.raises(ValueError, match=r"cannot read the arrays of leaf '(a|b/w)'"):
        checkpoint.restore(tmp_path / "c", tree)


def test_overwrite(tmp_path):
    d = tmp_path / "c"
    checkpoint.save(d, {"a": jnp.ones(3)}, policy=qjax.Policy([qjax.Rule(".*", None)]))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(d, {"b": jnp.zeros(2)})
    assert_identical(checkpoint.restore(d), {"a": jnp.ones(3)})
    checkpoint.save(d, {"b": jnp.zeros(2)}, overwrite=True)
    assert_identical(checkpoint.restore(d), {"b": jnp.zeros(2)})
    assert checkpoint.restore_policy(d) is None

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        checkpoint.save(tmp_path / "other", {"a": jnp.ones(3)}, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_sharded_restore(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    s2d = NamedSharding(mesh, P("data", "model"))
    tree = {
        "kernel": _w(0, (16, 8)),
        "q4": qjax.quantize(_w(1, (16, 8)), qjax.QuantSpec(qjax.int4, channel_axes=(-1,))),
        "fp8": qjax.quantize(_w(2, (16, 8)), qjax.QuantSpec(qjax.fp8_e5m2, channel_axes=(-1,))),
        "bias": jnp.ones(8),
    }
    checkpoint.save(tmp_path / "c", tree)

    shardings = {"kernel": s2d, "q4": s2d, "fp8": s2d, "bias": None}
    restored = checkpoint.restore(tmp_path / "c", shardings=shardings)
    assert_identical(tree, restored)
    assert restored["kernel"].sharding == s2d
    assert restored["q4"].values.sharding == s2d  # packed (16, 4)
    assert restored["q4"].scale.sharding.spec == P(None, "model")  # scale (1, 8)
    assert restored["fp8"].values.sharding == s2d and restored["fp8"].values.dtype == jnp.float8_e5m2
    assert len(restored["bias"].devices()) == 1

    # Without shardings=, the target's own shardings are used.
    last = lambda x: NamedSharding(mesh, P(*[None] * (x.ndim - 1), "model"))
    target = jax.tree.map(lambda x: jax.device_put(x, last(x)), tree)
    restored = checkpoint.restore(tmp_path / "c", target)
    assert_identical(tree, restored)
    assert restored["kernel"].sharding.spec == P(None, "model")
    assert restored["q4"].scale.sharding == target["q4"].scale.sharding
    assert restored["bias"].sharding == target["bias"].sharding


def test_small_trees_and_scalars(tmp_path):
    trees = [
        None,
        {},
        [],
        {"a": None, "b": {3: (1, 2.5, True, "x"), 1: [np.float32(2)]}},
        jnp.ones(3),
        qjax.quantize(_w(0, (4, 4)), qjax.QuantSpec(qjax.int8)),
        np.arange(3, dtype=np.int64),
    ]
    for i, tree in enumerate(trees):
        checkpoint.save(tmp_path / str(i), tree)
        restored = checkpoint.restore(tmp_path / str(i))
        assert jax.tree.structure(restored) == jax.tree.structure(tree)
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
            assert type(x) is type(y) or isinstance(y, jax.Array)
            assert np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype  # int64 stays numpy


@settings(max_examples=examples(15), deadline=None)
@given(st.integers(0, 3), st.integers(0, 37), st.integers(0, 2**31 - 1))
def test_bool_masks_round_trip_bit_packed(tmp_path_factory, rows, cols, seed):
    path = tmp_path_factory.mktemp("masks") / "ck"
    mask = np.random.default_rng(seed).random((rows, cols)) < 0.3
    tree = {"params": {"kernel": jnp.asarray(mask), "bias": None}, "step": 3}
    checkpoint.save(path, tree)
    meta = json.loads((path / "qjax_checkpoint.json").read_text())
    assert meta["leaves"][0]["kind"] == "bits"  # stored 8 per byte
    got = checkpoint.restore(path)
    assert got["params"]["bias"] is None and got["step"] == 3
    assert got["params"]["kernel"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got["params"]["kernel"]), mask)
    again = checkpoint.restore(path, tree)
    np.testing.assert_array_equal(np.asarray(again["params"]["kernel"]), mask)


def test_sharded_mask_restore(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    s2d = NamedSharding(mesh, P("data", "model"))
    mask = jax.device_put(jnp.asarray(np.random.default_rng(0).random((8, 6)) < 0.5), s2d)
    checkpoint.save(tmp_path / "ck", {"m": mask})
    got = checkpoint.restore(tmp_path / "ck", {"m": mask})
    assert got["m"].sharding == s2d
    np.testing.assert_array_equal(np.asarray(got["m"]), np.asarray(mask))


def test_zero_size_leaves_keep_later_shardings_aligned(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    s = NamedSharding(mesh, P("data"))
    tree = {"a": jnp.zeros((0, 3)), "b": jnp.zeros((0,), bool), "c": jax.device_put(jnp.arange(16.0), s)}
    checkpoint.save(tmp_path / "ck", tree)
    got = checkpoint.restore(tmp_path / "ck", tree)
    assert got["a"].shape == (0, 3) and got["b"].dtype == jnp.bool_ and got["c"].sharding == s
    np.testing.assert_array_equal(np.asarray(got["c"]), np.arange(16.0))


def test_sharded_restore_of_prng_keys(tmp_path):
    """Key arrays restore sharded (their key data carries the spec; the implementation's
    trailing data axis stays whole), from shardings= or from the target's own."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    keys = jax.random.split(jax.random.key(4), 8)
    rbg = jax.random.split(jax.random.key(1, impl="rbg"), 4)
    by_data, by_model = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("model"))
    checkpoint.save(tmp_path / "k", {"fry": jax.device_put(keys, by_data), "rbg": rbg})
    target = {"fry": jax.device_put(keys, by_data), "rbg": jax.device_put(rbg, by_model)}
    for restored in (
        checkpoint.restore(tmp_path / "k", shardings={"fry": by_data, "rbg": by_model}),
        checkpoint.restore(tmp_path / "k", target),
    ):
        assert restored["fry"].sharding == by_data and restored["rbg"].sharding == by_model
        assert restored["fry"].dtype == keys.dtype and restored["rbg"].dtype == rbg.dtype
        for name, want in (("fry", keys), ("rbg", rbg)):
            np.testing.assert_array_equal(jax.random.key_data(restored[name]), jax.random.key_data(want))
        # the restored keys draw what the saved ones drew
        np.testing.assert_array_equal(
            jax.vmap(lambda k: jax.random.uniform(k, (3,)))(restored["fry"]),
            jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys),
        )


def test_unsigned_sub_byte_arrays_round_trip_and_unstorable_dtypes_are_refused(tmp_path):
    """Plain uint4 / uint2 arrays (tensorstore has no such type: the save failed without a
    leaf path and left a temporary directory) round-trip bit-exact, beside int4 / int2 and
    fp8; a dtype the storage cannot take (int1) is refused naming the leaf, before writing."""
    codes = np.arange(64) % 16
    tree = {
        "u4": jnp.asarray(codes, jnp.uint4),
        "u2": jnp.asarray(codes % 4, jnp.uint2).reshape(8, 8),
        "i4": jnp.asarray(codes - 8, jnp.int4),
        "f8": jnp.asarray(codes, jnp.float8_e5m2),
    }
    checkpoint.save(tmp_path / "c", tree)
    for target in (None, tree, jax.eval_shape(lambda: tree)):
        got = checkpoint.restore(tmp_path / "c", target)
        for k, x in tree.items():
            assert got[k].dtype == x.dtype and got[k].shape == x.shape, k
            np.testing.assert_array_equal(np.asarray(got[k]).astype(np.int64), np.asarray(x).astype(np.int64))
    with pytest.raises(TypeError, match=r"leaf 'bad/codes'.*int1"):
        checkpoint.save(tmp_path / "d", {"ok": jnp.ones(3), "bad": {"codes": jnp.zeros(8, jnp.int1)}})
    assert not (tmp_path / "d").exists()


def test_relative_directories_are_resolved(tmp_path, monkeypatch):
    """Orbax refuses relative paths (with tracebacks from its writer threads); qjax makes
    them absolute, for save / restore / restore_policy and the train checkpointer."""
    monkeypatch.chdir(tmp_path)
    tree = {"w": qjax.quantize(jnp.arange(8.0).reshape(2, 4), qjax.QuantSpec(qjax.int8))}
    checkpoint.save("relative/ckpt", tree)
    back = checkpoint.restore("relative/ckpt", tree)
    np.testing.assert_array_equal(np.asarray(back["w"].values), np.asarray(tree["w"].values))
    assert checkpoint.restore_policy("relative/ckpt") is None
    with qjax.parallel.TrainCheckpointer("relative/run", every=1, async_save=False) as ckpt:
        ckpt.save(0, {"a": jnp.ones(3)})
        np.testing.assert_array_equal(np.asarray(ckpt.restore({"a": jnp.zeros(3)})["a"]), np.ones(3))
    assert (tmp_path / "relative" / "run").is_dir()
