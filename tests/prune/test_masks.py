"""Mask trees: targets and rules, masks from scores, apply, summary, bit packing."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax
from qjax.prune.masks import (
    PackedMask,
    apply_masks,
    masks_from_scores,
    pack_masks,
    resolve_targets,
    summary,
    unpack_masks,
)
from qjax.prune.sparsity import NM, Block, Channel, LeafConfig, Unstructured, select_prune, top_units
from qjax.rules import leaves_with_paths


def tree():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "params": {
            "Dense_0": {"kernel": normal(6, 8), "bias": jnp.zeros(8)},
            "Conv_0": {"kernel": normal(3, 3, 2, 4), "bias": jnp.zeros(4)},
            "embed": {"embedding": normal(10, 4)},
        }
    }


def scores_of(t):
    return jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), t)


def np_order(x):
    x = np.asarray(x, np.float64)
    return np.lexsort((np.arange(x.size), np.where(np.isnan(x), -np.inf, x), ~np.isnan(x)))


def round_half_up(s, n):
    return math.floor(s * n + 0.5)


# -- targets and rules ---------------------------------------------------------------------------


def test_default_filter_and_rules():
    t = tree()
    targets = resolve_targets(t)
    assert list(targets) == ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/embed/embedding"]
    rules = [
        (r".*/embed/.*", None),
        (r".*/Conv_0/kernel", LeafConfig(0.25, Channel(-1))),
        (r".*/Dense_0/bias", True),
        (r".*/Dense_0/kernel", 0.75),
    ]
    targets = resolve_targets(t, rules)
    assert set(targets) == {"params/Conv_0/kernel", "params/Dense_0/bias", "params/Dense_0/kernel"}
    assert targets["params/Conv_0/kernel"].sparsity == 0.25
    assert targets["params/Conv_0/kernel"].sparsity_type == Channel(-1)
    assert targets["params/Dense_0/kernel"].sparsity == 0.75
    nm = resolve_targets(t, [(r".*kernel", NM(2, 4, axis=-1))])["params/Dense_0/kernel"]
    assert nm.sparsity_type == NM(2, 4, axis=-1)


def test_rule_errors_name_pattern_and_path():
    t = tree()
    with pytest.raises(ValueError, match=r"params/nope/kernel"):
        resolve_targets(t, [(r"params/nope/kernel", 0.5)])
    with pytest.raises(ValueError, match=r"rule '.\*/Dense_0/kernel' for 'params/Dense_0/kernel'"):
        resolve_targets(t, [(r".*/Dense_0/kernel", 1.5)])
    with pytest.raises(ValueError, match="expected None"):
        resolve_targets(t, [(r".*/Dense_0/kernel", "dense")])
    with pytest.raises(ValueError, match="'params/Conv_0/kernel'"):
        resolve_targets(t, [(r".*/Conv_0/kernel", NM(2, 4))])  # axis 0 has length 3
    with pytest.raises(TypeError):
        resolve_targets(t, sparsity_type="nm")


def test_qarray_leaf_rejected_with_path():
    t = tree()
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    t["params"]["Dense_0"]["kernel"] = qjax.quantize(t["params"]["Dense_0"]["kernel"], spec)
    with pytest.raises(TypeError, match=r"'params/Dense_0/kernel' is quantized: prune before quantizing"):
        resolve_targets(t)
    assert "params/Dense_0/kernel" not in resolve_targets(t, [(r".*/Dense_0/kernel", None)])
    masks = {"params": {"Dense_0": {"kernel": jnp.ones((6, 8), bool)}}}
    with pytest.raises(TypeError, match="'params/Dense_0/kernel'"):
        apply_masks(t, masks)


# -- masks_from_scores -------------------------------------------------------------------------


@given(st.floats(0, 1), st.integers(0, 2**31 - 1))
@settings(max_examples=examples(12))
def test_layer_and_global_exact_counts_match_numpy(s, seed):
    rng = np.random.default_rng(seed)
    t = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree())
    sc = scores_of(t)
    layer = masks_from_scores(sc, s)
    for path, m in leaves_with_paths(layer):
        score = np.asarray(dict(leaves_with_paths(sc))[path]).ravel()
        k = round_half_up(s, score.size)
        expect = np.ones(score.size, bool)
        expect[np_order(score)[:k]] = False
        np.testing.assert_array_equal(np.asarray(m).ravel(), expect)
    glob = masks_from_scores(sc, s, scope="global")
    paths = [p for p, _ in leaves_with_paths(glob)]
    allscores = np.concatenate([np.asarray(dict(leaves_with_paths(sc))[p]).ravel() for p in paths])
    k = round_half_up(s, allscores.size)
    expect = np.ones(allscores.size, bool)
    expect[np_order(allscores)[:k]] = False
    got = np.concatenate([np.asarray(m).ravel() for _, m in leaves_with_paths(glob)])
    np.testing.assert_array_equal(got, expect)
    assert glob["params"]["Dense_0"]["bias"] is None


def test_global_structured_counts_and_min_keep():
    t = tree()
    sc = scores_of(t)
    rules = [(r".*/embed/.*", None)]
    m = masks_from_scores(sc, 0.5, sparsity_type=Channel(-1), scope="global", rules=rules)
    sm = summary(m)
    # units are channels of sizes 6 (Dense) and 18 (Conv); pruned count is within half a unit
    assert abs(sm.zeros - round_half_up(0.5, sm.total)) <= 9
    for _, leaf in leaves_with_paths(m):
        leaf = np.asarray(leaf)
        rows = tuple(range(leaf.ndim - 1))
        assert (leaf.all(axis=rows) | ~leaf.any(axis=rows)).all()
    full = masks_from_scores(sc, 1.0, sparsity_type=Channel(-1), scope="global", rules=rules)
    for _, leaf in leaves_with_paths(full):
        assert np.asarray(leaf).reshape(-1, leaf.shape[-1]).any(0).sum() == 1  # min_keep=1 per leaf
    blocks = masks_from_scores(sc, 0.6, sparsity_type=Block((2, 2)), scope="global", rules=rules)
    assert abs(summary(blocks).zeros - round_half_up(0.6, sm.total)) <= 2


def test_rule_sparsity_excluded_from_global_and_nm_fixed():
    sc = scores_of(tree())
    rules = [(r".*/Dense_0/kernel", 0.25), (r".*/Conv_0/kernel", NM(1, 4, axis=-1))]
    m = masks_from_scores(sc, 0.9, scope="global", rules=rules)
    s = summary(m).leaves
    assert s["params/Dense_0/kernel"].zeros == 12
    assert s["params/Conv_0/kernel"].zeros == 72 * 3 // 4 * 1  # 1:4 keeps a quarter
    assert s["params/embed/embedding"].zeros == 36


@functools.partial(jax.jit, static_argnums=1)
def _previous_global_masks(scores, stypes, count):
    """The global selection as it was before its per-leaf outputs moved out of the jit (one
    program returning every leaf's slice): the reference for ties, NaN, odd shapes, mixed types."""
    units, sizes, prot, spans, start = [], [], [], [], 0
    for stype, score in zip(stypes, scores):
        u, z = stype.units(score, "")
        units.append(u.astype(jnp.float32))
        sizes.append(np.asarray(z, np.int64))
        prot.append(top_units(u, stype.min_keep) if stype.min_keep else jnp.zeros(u.shape, bool))
        spans.append((start, start + u.shape[0]))
        start += u.shape[0]
    prune = select_prune(jnp.concatenate(units), np.concatenate(sizes), count, jnp.concatenate(prot))
    return [t.expand(~prune[a:b], s.shape) for t, s, (a, b) in zip(stypes, scores, spans)]


@pytest.mark.parametrize("seed", [0, 1])
def test_global_masks_equal_previous_selection_and_one_program_output(seed):
    rng = np.random.default_rng(seed)
    shapes = {"a": (3, 5), "b": (2, 3, 5), "c": (1, 1), "d": (7,), "e": (5, 4), "f": (6, 8)}
    sc = {k: jnp.asarray(rng.integers(0, 3, size=shp), jnp.float32) for k, shp in shapes.items()}  # ties
    sc["a"] = sc["a"].at[1, 2].set(jnp.nan)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sc["f"] = jax.device_put(sc["f"], jax.NamedSharding(mesh, jax.P(None, "x")))  # a sharded leaf
    types = {"b": Block((2, 3)), "e": Channel(-1), "f": Channel(-1, min_keep=3)}
    rules = [(f"{k}", t) for k, t in types.items()] + [("d", True)]
    stypes = tuple(types.get(k, Unstructured()) for k in shapes)
    run = jax.jit(lambda x, s: masks_from_scores(x, s, scope="global", rules=rules))
    total = sum(map(math.prod, shapes.values()))
    for s in (0.3, 0.55, 1.0):
        want = _previous_global_masks([sc[k] for k in shapes], stypes, round_half_up(s, total))
        eager = masks_from_scores(sc, s, scope="global", rules=rules)
        jitted = run(sc, s)
        for k, w in zip(shapes, want):
            np.testing.assert_array_equal(eager[k], w, err_msg=k)
            np.testing.assert_array_equal(jitted[k], w, err_msg=k)
    # the ranking is one program with one output (not one per leaf: XLA:CPU compiles a fusion
    # per output, tens of ms per leaf); no inner program returns per-leaf results
    jaxpr = jax.make_jaxpr(lambda x: masks_from_scores(x, 0.5, scope="global", rules=rules))(sc)
    outs = {e.params["name"]: len(e.outvars) for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")}
    assert outs.get("_global_keep") == 1 and max(outs.values()) == 1, outs


def test_scores_with_none_leaves_and_params_structure():
    t = tree()
    sc = scores_of(t)
    sc["params"]["embed"]["embedding"] = None
    m = masks_from_scores(sc, 0.5)
    assert m["params"]["embed"]["embedding"] is None
    m = masks_from_scores(sc, 0.5, rules=[(r".*/embed/.*", None)])  # a None score still has a path
    assert m["params"]["embed"]["embedding"] is None
    with pytest.raises(ValueError, match="no score for targeted leaf 'params/embed/embedding'"):
        masks_from_scores(sc, 0.5, params=t)
    bad = scores_of(t)
    bad["params"]["Dense_0"]["kernel"] = jnp.ones((8, 6))
    with pytest.raises(ValueError, match="'params/Dense_0/kernel'"):
        masks_from_scores(bad, 0.5, params=t)


def test_argument_errors():
    sc = scores_of(tree())
    with pytest.raises(ValueError, match="unknown scope 'model'"):
        masks_from_scores(sc, 0.5, scope="model")
    with pytest.raises(ValueError, match=r"unknown distribution 'erdos'.*erk"):
        masks_from_scores(sc, 0.5, distribution="erdos")
    with pytest.raises(ValueError, match="scope='layer'"):
        masks_from_scores(sc, 0.5, scope="global", distribution="erk")
    for bad in (-0.5, 1.01):
        with pytest.raises(ValueError, match="sparsity"):
            masks_from_scores(sc, bad)


def test_jit_traced_sparsity_equals_eager():
    sc = scores_of(tree())
    for kw in ({"scope": "global"}, {"distribution": "erk"}):
        f = jax.jit(lambda s, kw=kw: masks_from_scores(sc, s, **kw))
        for s in (0.0, 0.55, 1.0):
            jm, em = f(jnp.float32(s)), masks_from_scores(sc, jnp.float32(s), **kw)
            for (_, a), (_, b) in zip(leaves_with_paths(jm), leaves_with_paths(em)):
                np.testing.assert_array_equal(a, b)
            pm = masks_from_scores(sc, s, **kw)  # Python float: same masks here
            for (_, a), (_, b) in zip(leaves_with_paths(jm), leaves_with_paths(pm)):
                np.testing.assert_array_equal(a, b)


# -- apply, summary ----------------------------------------------------------------------------


def test_apply_masks_linen_dtype_and_none():
    t = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree())
    m = masks_from_scores(scores_of(t), 0.5)
    out = apply_masks(t, m)
    k = out["params"]["Dense_0"]["kernel"]
    assert k.dtype == jnp.bfloat16
    dense = t["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(k, np.where(m["params"]["Dense_0"]["kernel"], dense, 0))
    assert out["params"]["Dense_0"]["bias"] is t["params"]["Dense_0"]["bias"]
    out_j = jax.jit(apply_masks)(t, m)
    np.testing.assert_array_equal(out_j["params"]["Dense_0"]["kernel"], k)
    with pytest.raises(ValueError, match="'params/Dense_0/kernel'"):
        apply_masks(t, {"params": {"Dense_0": {"kernel": jnp.ones((2, 2), bool)}}})
    with pytest.raises(ValueError, match="params/nope"):
        apply_masks(t, {"params": {"nope": jnp.ones((2, 2), bool)}})


def test_nnx_state_boxes_preserved():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    _, state = nnx.split(model)
    m = masks_from_scores(jax.tree.map(jnp.abs, state), 0.5)
    assert isinstance(m["layers"][0]["kernel"], nnx.Variable)
    assert [p for p, _ in leaves_with_paths(m)] == ["layers/0/kernel", "layers/1/kernel"]
    out = apply_masks(state, m)
    assert isinstance(out["layers"][0]["kernel"], nnx.Param)
    assert summary(m).zeros == 64 + 32
    packed = pack_masks(m)
    back = unpack_masks(packed)
    np.testing.assert_array_equal(back["layers"][1]["kernel"][...], m["layers"][1]["kernel"][...])


def test_summary_exact_and_table():
    m = {"a": jnp.array([[True, False], [False, False]]), "b": None, "c": jnp.ones((3, 3), bool)}
    s = summary(m)
    assert (s.leaves["a"].total, s.leaves["a"].zeros) == (4, 3)
    assert s.leaves["a"].sparsity == 0.75
    assert (s.total, s.zeros) == (13, 3) and "b" not in s.leaves
    text = str(s)
    assert "a" in text and "75.00%" in text and "total" in text and "13" in text
    assert summary({}).sparsity == 0.0


# -- bit packing -------------------------------------------------------------------------------

_pack, _unpack = jax.jit(pack_masks), jax.jit(unpack_masks)  # one compile per shape


@given(
    st.sampled_from([(1,), (7,), (8,), (3, 5), (2, 3, 4), (0, 3), (17,)]),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=examples(25))
def test_pack_roundtrip_and_packbits(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    packed = _pack({"w": jnp.asarray(mask), "b": None})
    assert isinstance(packed["w"], PackedMask) and packed["b"] is None
    np.testing.assert_array_equal(np.asarray(packed["w"].bits), np.packbits(mask.reshape(-1)))
    assert packed["w"].bits.dtype == jnp.uint8 and packed["w"].shape == shape
    back = _unpack(packed)
    assert back["w"].dtype == jnp.bool_ and back["w"].shape == shape
    np.testing.assert_array_equal(back["w"], mask)


def test_pack_under_jit_and_summary_of_packed():
    m = masks_from_scores(scores_of(tree()), 0.3)
    packed = jax.jit(pack_masks)(m)
    back = jax.jit(unpack_masks)(packed)
    for (_, a), (_, b) in zip(leaves_with_paths(back), leaves_with_paths(m)):
        np.testing.assert_array_equal(a, b)
    assert summary(packed).zeros == summary(m).zeros
    assert apply_masks(tree(), unpack_masks(packed))["params"]["Dense_0"]["kernel"].shape == (6, 8)


def test_packed_masks_accepted_wherever_masks_are():
    """``apply_masks``, ``apply_masks_ste`` and ``shrink``'s plan take packed masks as
    they are (before, ``apply_masks`` raised about paths ``.../kernel/0`` that the tree
    lacks: the packed leaf's children)."""
    t = tree()
    m = masks_from_scores(scores_of(t), 0.4)
    packed = pack_masks(m)
    for got, want in (
        (apply_masks(t, packed), apply_masks(t, m)),
        (jax.jit(apply_masks)(t, packed), apply_masks(t, m)),
        (qjax.prune.apply_masks_ste(t, packed), qjax.prune.apply_masks_ste(t, m)),
    ):
        for (pa, a), (pb, b) in zip(leaves_with_paths(got), leaves_with_paths(want)):
            assert pa == pb
            np.testing.assert_array_equal(a, b)


def test_idempotent_on_pruned_tree():
    t = tree()
    m1 = masks_from_scores(scores_of(t), 0.6, scope="global")
    t2 = apply_masks(t, m1)
    m2 = masks_from_scores(scores_of(t2), 0.6, scope="global")
    for (_, a), (_, b) in zip(leaves_with_paths(m1), leaves_with_paths(m2)):
        np.testing.assert_array_equal(a, b)


def test_unstructured_default_type():
    m = masks_from_scores(scores_of(tree()), 0.5, sparsity_type=Unstructured())
    assert summary(m).zeros == sum(round_half_up(0.5, n) for n in (48, 72, 40))


def test_learned_lsq_scales_are_never_pruned():
    """An LSQParams' learned scales (rank 2, like a kernel) are skipped by the pruners;
    its params keep their paths."""
    lsq = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    t = qjax.lsq_params(params, qjax.Policy([qjax.Rule(r".*kernel", weight=lsq)]))
    assert list(resolve_targets(t)) == ["dense/kernel"]
    m = qjax.prune.magnitude(t, sparsity=0.5)
    assert m.scales["dense/kernel"] is None and m.params["dense"]["kernel"].shape == (8, 4)


@pytest.mark.parametrize(
    "stype,distribution",
    [
        (Unstructured(), "uniform"),
        (Unstructured(per_slice=-1), "uniform"),
        (Unstructured(), "erk"),
        (Block((2, 2)), "uniform"),
    ],
)
def test_stacked_leaf_with_leaf_config_stack_equals_the_unrolled_layers(stype, distribution):
    # A (L, K, N) stack was ranked across its layers in layer scope (0.27 / 0.73 kept).
    k = (
        jnp.asarray(np.random.default_rng(5).normal(size=(3, 8, 6)), jnp.float32)
        * jnp.array([1, 3, 9.0])[:, None, None]
    )
    head = jnp.asarray(np.random.default_rng(6).normal(size=(6, 4)), jnp.float32)
    stacked = {"stack": k, "head": head}
    flat = {"l0": k[0], "l1": k[1], "l2": k[2], "head": head}
    got = qjax.prune.magnitude(
        stacked,
        0.6,
        sparsity_type=stype,
        distribution=distribution,
        rules=[("stack", LeafConfig(stack=1)), ("head", True)],
    )
    want = qjax.prune.magnitude(flat, 0.6, sparsity_type=stype, distribution=distribution)
    np.testing.assert_array_equal(got["stack"], np.stack([want["l0"], want["l1"], want["l2"]]))
    np.testing.assert_array_equal(got["head"], want["head"])


def test_leaf_config_stack_errors_and_channel_keeps_shared_channels():
    with pytest.raises(ValueError, match=r"LeafConfig\.stack"):
        LeafConfig(stack=-1)
    with pytest.raises(ValueError, match=r"'w'.*3 stacked-layer axes"):
        qjax.prune.magnitude({"w": jnp.ones((2, 3, 4))}, 0.5, rules=[("w", LeafConfig(stack=3))])
    k = jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 6)), jnp.float32)
    m = qjax.prune.magnitude({"w": k}, 0.5, sparsity_type=Channel(-1), rules=[("w", LeafConfig(stack=1))])[
        "w"
    ]
    np.testing.assert_array_equal(m[0], m[1])  # the same channels in every layer (shrink needs it)
    # a positive per_slice axis counts the leaf's axes: axis 1 of the stack is axis 0 of a layer
    cfg = LeafConfig(sparsity_type=Unstructured(per_slice=1), stack=1)
    got = qjax.prune.magnitude({"w": k}, 0.5, rules=[("w", cfg)])["w"]
    want = [
        qjax.prune.magnitude({"w": k[i]}, 0.5, sparsity_type=Unstructured(per_slice=0))["w"] for i in (0, 1)
    ]
    np.testing.assert_array_equal(got, np.stack(want))
