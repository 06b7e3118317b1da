"""Partition rules through the shared rule engine: path patterns, logical names (Linen
logical partitioning, NNX out_sharding), QArray scales, masks and optimizer state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax import parallel as qp
from qjax.parallel import presets

MESH = qp.make_mesh(data=2, fsdp=2, tensor=2)


def specs(tree):
    return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def test_path_rules_first_match_and_errors_name_leaf_and_rule():
    tree = {
        "params": {
            "up": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)},
            "emb": {"embedding": jnp.zeros((10, 16))},
        }
    }
    rules = [(r".*/emb/.*", None), (r".*/kernel", P(None, "tensor")), (r".*", P(("data", "fsdp")))]
    got = specs(qp.shardings(tree, rules, MESH))
    assert got == {
        "params": {
            "up": {"kernel": P(None, "tensor"), "bias": P(("data", "fsdp"))},
            "emb": {"embedding": P(None, None)},
        }
    }
    with pytest.raises(
        ValueError,
        match=r"leaf 'params/emb/embedding' \(rule 0 '\.\*'\).*size 10, not "
        r"divisible by the 4 devices",
    ):
        qp.shardings(tree, [(r".*", P(("data", "fsdp")))], MESH)
    with pytest.raises(
        ValueError, match=r"leaf 'params/emb/embedding' \(rule 0 .*\): spec .* names mesh axis 'model'"
    ):
        qp.shardings(tree, [(r".*", P("model"))], MESH)
    with pytest.raises(ValueError, match=r"uses mesh axis 'tensor' twice"):
        qp.shardings(tree, [(r".*/kernel", P("tensor", "tensor")), (r".*", None)], MESH)


def test_logical_names_linen_and_rules():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            h = nn.Dense(32, kernel_init=init, name="up")(x)
            return nn.Dense(
                16,
                kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("tensor", None)),
                name="down",
            )(h)

    boxed = jax.eval_shape(M().init, jax.random.key(0), jnp.zeros((2, 16)))
    got = specs(qp.shardings(boxed, [], MESH, logical_axis_rules=presets.logical_axis_rules("hybrid")))
    params = jax.tree.map(lambda b: b, got["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert params["up"]["kernel"].unbox() == P("fsdp", "tensor")  # logical: embed->fsdp, mlp->tensor
    assert params["down"]["kernel"].unbox() == P("tensor", None)  # mesh-axis metadata
    assert params["up"]["bias"] == P(None)  # no metadata: replicated
    # a tuple rule value is logical too, and a path rule beats the metadata
    got = specs(
        qp.shardings(
            boxed,
            [(r".*/up/kernel", ("mlp", "embed"))],
            MESH,
            logical_axis_rules=presets.logical_axis_rules("tensor"),
        )
    )
    assert got["params"]["up"]["kernel"].unbox() == P("tensor", None)


def test_nnx_out_sharding():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(
                16,
                32,
                rngs=rngs,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            )
            self.down = nnx.Linear(
                32,
                16,
                rngs=rngs,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("tensor", "fsdp")),
            )

    with nnx.use_eager_sharding(False):  # the metadata only; placement is ours
        _, state = nnx.split(M(nnx.Rngs(0)))
    got = qp.partition_specs(
        state,
        [(r"down/kernel", P("tensor", "fsdp"))],
        MESH,
        logical_axis_rules=presets.logical_axis_rules("hybrid"),
    )
    flat = dict(qjax.rules.leaves_with_paths(got))
    assert flat["up/kernel"] == P("fsdp", "tensor") and flat["down/kernel"] == P("tensor", "fsdp")
    assert flat["up/bias"] == P(None)
    # without logical rules, out_sharding names are mesh axes
    with nnx.use_eager_sharding(False):
        _, state2 = nnx.split(
            nnx.Linear(
                16,
                8,
                rngs=nnx.Rngs(0),
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "tensor")),
            )
        )
    assert dict(qjax.rules.leaves_with_paths(qp.partition_specs(state2, [], MESH)))["kernel"] == P(
        None, "tensor"
    )


def test_qarray_scales_follow_values():
    w = jax.random.normal(jax.random.key(0), (32, 16))
    tree = {
        "per_channel": qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(-1,))),
        "grouped": qjax.quantize(
            w, qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)
        ),
        "tensor": qjax.quantize(w, qjax.QuantSpec(qjax.int8)),
        "asym": qjax.quantize(w, qjax.QuantSpec(qjax.uint8, channel_axes=(0,), symmetric=False)),
    }
    sh = qp.shardings(tree, [(r".*", P("fsdp", "tensor"))], MESH)
    q = sh["per_channel"]
    assert (
        isinstance(q, qjax.QArray)
        and q.values.spec == P("fsdp", "tensor")
        and q.scale.spec == P(None, "tensor")
    )
    g = sh["grouped"]  # scale (4, 16): groups split with their rows
    assert g.scale.spec == P("fsdp", "tensor") and sh["tensor"].scale.spec == P(None, None)
    assert sh["asym"].scale.spec == P("fsdp", None) and sh["asym"].zero_point.spec == P("fsdp", None)
    placed = jax.device_put(tree, sh)
    assert placed["grouped"].scale.sharding.shard_shape((4, 16)) == (2, 8)
    np.testing.assert_array_equal(qjax.dequantize(placed["grouped"]), qjax.dequantize(tree["grouped"]))
    # 4 devices on the grouped axis: 8 rows per shard = one group each; 8 devices would split a group
    mesh8 = qp.make_mesh(fsdp=8)
    bad = qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(-1,), group_size=8, group_axis=0))
    with pytest.raises(ValueError, match=r"leaf 'g'.*not a whole number of groups"):
        qp.shardings({"g": bad}, [(r".*", P("fsdp"))], mesh8)
    # the FSDP preset picks the other axis instead
    assert qp.shardings({"g": bad}, presets.fsdp(), mesh8)["g"].values.spec == P(None, "fsdp")


def test_opt_state_and_sparsify_state_follow_params():
    params = {"up": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}}
    tx = qjax.prune.sparsify(
        optax.chain(optax.clip(1.0), optax.adam(1e-3)),
        qjax.prune.Magnitude(sparsity=0.5),
        qjax.prune.one_shot(0),
    )
    sh = qp.train_state_shardings(params, tx, presets.fsdp(), qp.make_mesh(fsdp=8))
    kernel = sh.params["up"]["kernel"]
    assert kernel.spec == P(None, "fsdp")
    st = qjax.prune.get_sparsify_state(sh.opt_state)
    assert st.masks["up"]["kernel"] == kernel and st.masks["up"]["bias"] is None
    adam = st.inner_state[1][0]
    assert adam.mu["up"]["kernel"] == kernel and adam.nu["up"]["bias"] == sh.params["up"]["bias"]
    assert adam.count.spec == P() and st.step.spec == P() and st.key.spec == P()
    state = qp.init_train_state(params, tx, sh)
    placed = qjax.prune.get_sparsify_state(state.opt_state)
    assert placed.masks["up"]["kernel"].sharding.shard_shape((16, 32)) == (16, 4)
    assert placed.inner_state[1][0].mu["up"]["kernel"].sharding == kernel


def test_presets_tensor_parallel_layouts():
    tree = {
        "attn": {
            "query": {"kernel": jnp.zeros((16, 8, 4)), "bias": jnp.zeros((8, 4))},
            "out": {"kernel": jnp.zeros((8, 4, 16)), "bias": jnp.zeros(16)},
        },
        "mlp": {"up": {"kernel": jnp.zeros((16, 64))}, "down": {"kernel": jnp.zeros((64, 16))}},
        "ln": {"scale": jnp.zeros(16)},
    }
    tp = specs(qp.shardings(tree, presets.tensor_parallel(), qp.make_mesh(tensor=8)))
    assert tp["attn"]["query"] == {"kernel": P(None, "tensor", None), "bias": P("tensor", None)}
    assert tp["attn"]["out"] == {"kernel": P("tensor", None, None), "bias": P(None)}
    assert tp["mlp"] == {"up": {"kernel": P(None, "tensor")}, "down": {"kernel": P("tensor", None)}}
    assert tp["ln"]["scale"] == P(None)
    hy = specs(qp.shardings(tree, presets.hybrid(), MESH))
    assert hy["mlp"] == {"up": {"kernel": P("fsdp", "tensor")}, "down": {"kernel": P("tensor", "fsdp")}}
    assert hy["attn"]["query"]["kernel"] == P("fsdp", "tensor", None) and hy["ln"]["scale"] == P("fsdp")
    stacked = {"layers": {"up": {"kernel": jnp.zeros((3, 16, 64))}}}
    assert specs(qp.shardings(stacked, presets.tensor_parallel(stacked=1), qp.make_mesh(tensor=8))) == {
        "layers": {"up": {"kernel": P(None, None, "tensor")}}
    }
    with pytest.raises(ValueError, match="kind must be one of"):
        presets.logical_axis_rules("pipeline")
