"""The graph layer: which params leaf feeds which matmul/conv, through every construct."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import qjax
from qjax.graph import find_ops


def _paths(f, params, *args):
    return [(op.path, op.primitive, op.weight_operand) for op in find_ops(f, params, *args)]


X = jnp.ones((2, 8))
W = {"w": jnp.ones((8, 4)), "v": jnp.ones((4, 3))}


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: x @ p["w"],
        lambda p, x: jnp.dot(x, p["w"]),
        lambda p, x: jnp.matmul(x, p["w"]),
        lambda p, x: jnp.einsum("bi,ij->bj", x, p["w"]),
        lambda p, x: jax.lax.dot_general(x, p["w"], (((1,), (0,)), ((), ()))),
        lambda p, x: (p["w"].T @ x.T).T,  # weight on the left, transposed
        lambda p, x: x @ p["w"].astype(jnp.bfloat16).astype(jnp.float32),
        lambda p, x: jax.jit(lambda a, b: a @ b)(x, p["w"]),
        lambda p, x: jax.checkpoint(lambda a: a @ p["w"])(x),
        lambda p, x: jax.nn.relu(x) @ p["w"],  # custom_jvp before the matmul
    ],
)
def test_single_matmul_forms(fn):
    ops = find_ops(fn, W, X)
    assert [op.path for op in ops] == ["w"]


def test_three_operand_einsum_and_chain():
    ops = _paths(lambda p, x: jnp.einsum("bi,ij,jk->bk", x, p["w"], p["v"]), W, X)
    assert {o[0] for o in ops} == {"w", "v"}


def test_custom_vjp_inside_model():
    @jax.custom_vjp
    def mm(a, b):
        return a @ b

    mm.defvjp(lambda a, b: (a @ b, (a, b)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    assert _paths(lambda p, x: mm(x, p["w"]), W, X) == [("w", "dot_general", 1)]


def test_cond_and_while():
    def f(p, x):
        y = jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: -(x @ p["w"]))
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["v"] @ p["v"].T), y)

    paths = {o[0] for o in _paths(f, W, X)}
    assert paths == {"w", "v"}


def test_conv_with_feature_groups():
    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), strides=2)(x)
            return nn.Conv(8, (3, 3), feature_group_count=8)(x)

    x = jnp.ones((1, 8, 8, 3))
    v = C().init(jax.random.key(0), x)
    ops = find_ops(C().apply, v, x)
    assert [(o.path, o.primitive) for o in ops] == [
        ("params/Conv_0/kernel", "conv_general_dilated"),
        ("params/Conv_1/kernel", "conv_general_dilated"),
    ]
    assert ops[1].params["feature_group_count"] == 8


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(8)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
        return nn.remat(nn.Dense)(4)(x)


def test_nn_scan_stack_is_one_op_per_stacked_leaf():
    v = Stack().init(jax.random.key(0), X)
    ops = find_ops(Stack().apply, v, X)
    assert [o.path for o in ops] == [
        "params/Dense_0/kernel",
        "params/ScanBlock_0/Dense_0/kernel",
        "params/CheckpointDense_0/kernel",
    ]
    assert ops[1].weight_shape == (8, 8)  # the per-layer slice


def test_found_after_float_function_ran_with_same_shapes():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w", nn.initializers.ones, (8, 4))

    v = Custom().init(jax.random.key(0), X)
    jax.jit(Custom().apply)(v, X)  # warm the trace cache with the float function
    Custom().apply(v, X)
    assert [o.path for o in find_ops(Custom().apply, v, X)] == ["params/w"]


def test_nnx_model_split_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    assert [o.path for o in find_ops(apply, state, X)] == ["a/kernel", "b/kernel"]


def test_shard_map_body():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    def f(p, x):
        body = lambda w, x: jax.lax.psum(x @ w, "model")
        return jax.shard_map(
            body, mesh=mesh, in_specs=(P("model", None), P("data", "model")), out_specs=P("data", None)
        )(p["w"], x)

    w = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, P("model", None)))
    x = jax.device_put(jnp.ones((4, 8)), jax.NamedSharding(mesh, P("data", "model")))
    assert _paths(f, {"w": w}, x) == [("w", "dot_general", 1)]
    # one op per shard, on the shard's shapes: 8 x (2, 2) @ (2, 4) is the (4, 8) @ (8, 4)
    [op] = find_ops(f, {"w": w}, x)
    assert (op.count, op.weight_shape, op.activation_shape) == (8, (2, 4), (2, 2))


def test_op_count_is_executions_per_call():
    w = {"w": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}

    def counts(f):
        return {op.path: op.count for op in find_ops(f, w, X)}

    twice = lambda p, x: (x @ p["w"]) @ p["w"]
    scan = lambda p, x: jax.lax.scan(lambda h, _: (h @ p["w"], None), x, None, length=7)[0]
    fori = lambda p, x: jax.lax.fori_loop(0, 4, lambda i, h: h @ p["w"], x)
    # cond: an op counts as if its branch ran (one in both branches: once)
    cond = lambda p, x: jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: (2 * x) @ p["w"] @ p["v"])
    # while_loop: a data-dependent trip count, the body counts once per run of the loop
    loop = lambda p, x: jax.lax.while_loop(lambda h: h.sum() < 100, lambda h: h @ p["w"], x)
    in_scan = lambda p, x: jax.lax.scan(lambda h, _: (cond(p, h), None), x, None, length=3)[0]
    assert counts(twice) == {"w": 2}
    assert counts(scan) == {"w": 7}
    assert counts(fori) == {"w": 4}
    assert counts(cond) == {"w": 1, "v": 1}
    assert counts(loop) == {"w": 1}
    assert counts(in_scan) == {"w": 3, "v": 3}


def test_weight_read_by_elementwise_op_is_not_a_target():
    assert find_ops(lambda p, x: x * p["w"][:, 0], W, X) == []


# -- fake_quantized ------------------------------------------------------------------

INT8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


def test_fake_quantized_equals_hand_fake_quant_reference():
    policy = qjax.Policy(
        [qjax.Rule("w", weight=INT8, act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN))]
    )
    x = jax.random.normal(jax.random.key(0), (5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 4))
    f = lambda p, x: x @ p["w"]
    xq = qjax.fake_quant(x, qjax.QuantSpec(qjax.int8, channel_axes=(0,)))
    want = xq @ qjax.fake_quant(w, INT8)
    np.testing.assert_array_equal(qjax.fake_quantized(f, policy, integer_forward=False)({"w": w}, x), want)
    # the integer forward computes the same products, summed in int32 then scaled
    got = qjax.fake_quantized(f, policy)({"w": w}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    g_int = jax.grad(lambda p: jnp.sum(jnp.sin(qjax.fake_quantized(f, policy)(p, x))))({"w": w})
    g_float = jax.grad(
        lambda p: jnp.sum(jnp.sin(qjax.fake_quantized(f, policy, integer_forward=False)(p, x)))
    )({"w": w})
    np.testing.assert_allclose(g_int["w"], g_float["w"], rtol=1e-5, atol=1e-5)


def test_fake_quantized_gradients_are_the_ste_gradients():
    policy = qjax.Policy([qjax.Rule("w", weight=INT8)])
    x = jax.random.normal(jax.random.key(0), (5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 4))
    g = jax.grad(lambda p: jnp.sum(qjax.fake_quantized(lambda p, x: x @ p["w"], policy)(p, x) ** 2))({"w": w})
    wq = qjax.fake_quant(w, INT8)
    # d/dW sum((x Wq)^2) with identity STE (absmax calibration clips nothing) = 2 x^T (x Wq)
    np.testing.assert_allclose(g["w"], 2 * x.T @ (x @ wq), rtol=1e-5)


def test_fake_quantized_conv_gradients_are_real():
    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3))(x)

    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    v = C().init(jax.random.key(1), x)
    policy = qjax.Policy(
        [
            qjax.Rule(
                ".*kernel",
                weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)),
                act=qjax.QuantSpec(qjax.int8),
            )
        ]
    )
    g = jax.grad(lambda v: jnp.sum(qjax.fake_quantized(C().apply, policy)(v, x) ** 2))(v)
    gk = g["params"]["Conv_0"]["kernel"]
    assert float(jnp.abs(gk).min()) >= 0 and float(jnp.abs(gk).sum()) > 0
    ref = jax.grad(lambda v: jnp.sum(C().apply(v, x) ** 2))(v)["params"]["Conv_0"]["kernel"]
    assert float(jnp.vdot(gk, ref) / (jnp.linalg.norm(gk) * jnp.linalg.norm(ref))) > 0.95


def test_fake_quantized_scan_stack_uses_per_layer_slices():
    v = Stack().init(jax.random.key(0), X)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=spec)])
    got = qjax.fake_quantized(Stack().apply, policy)(v, X)

    # Reference: fake-quantize each layer's slice on its own (the op sees the slice).
    def fq_leaf(path, leaf):
        if not path.endswith("kernel"):
            return leaf
        if leaf.ndim == 3:
            return jnp.stack([qjax.fake_quant(leaf[i], spec) for i in range(leaf.shape[0])])
        return qjax.fake_quant(leaf, spec)

    want = Stack().apply(qjax.rules.map_with_path(fq_leaf, v), X)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unmatched_layers_stay_float():
    policy = qjax.Policy([qjax.Rule("nothing", weight=INT8)])
    x = jax.random.normal(jax.random.key(0), (5, 8))
    f = lambda p, x: x @ p["w"]
    np.testing.assert_array_equal(qjax.fake_quantized(f, policy)(W, x), f(W, x))


# -- calibrate -------------------------------------------------------------------------


def test_calibrate_streams_absmax_and_is_batch_size_free():
    policy = qjax.Policy([qjax.Rule("w", weight=INT8, act=qjax.QuantSpec(qjax.int8))])
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"].T
    xs = [jax.random.normal(jax.random.key(i), (n, 8)) * (i + 1) for i, n in enumerate([3, 7, 16])]
    stats = qjax.calibrate(f, policy, W, xs)
    assert set(stats) == {"w"} and stats["w"].count == 3
    # both reads of w are the same op: the range covers both activations of every batch
    acts = [a for x in xs for a in (x, jnp.tanh(x @ W["w"]))]
    want = max(float(jnp.abs(a).max()) for a in acts)
    np.testing.assert_allclose(stats["w"].hi, want, rtol=1e-6)
    assert stats["w"].hi.shape == ()


def test_calibrate_scan_gives_per_layer_ranges_and_cond_skips_untaken():
    v = Stack().init(jax.random.key(0), X)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=INT8, act=qjax.QuantSpec(qjax.int8))])
    stats = qjax.calibrate(Stack().apply, policy, v, [X, 2 * X])
    assert stats["params/ScanBlock_0/Dense_0/kernel"].hi.shape == (3,)

    def f(p, x):
        return jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: (2 * x) @ p["v"].T)

    pol = qjax.Policy(
        [qjax.Rule(".*", weight=INT8, act=qjax.QuantSpec(qjax.int8, calibration=qjax.calib.minmax()))]
    )
    p = {"w": jnp.ones((8, 4)), "v": jnp.ones((4, 8))}
    s = qjax.calibrate(f, pol, p, [jnp.ones((2, 8)), -jnp.ones((2, 8)) * 3])
    np.testing.assert_allclose([s["w"].lo, s["w"].hi], [-1.0, 1.0])  # only the first batch took it
    np.testing.assert_allclose([s["v"].lo, s["v"].hi], [-6.0, 6.0])


def test_calibrate_errors():
    policy = qjax.Policy([qjax.Rule("w", weight=INT8, act=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))])
    with pytest.raises(ValueError, match="static activation scales are per-tensor"):
        qjax.calibrate(lambda p, x: x @ p["w"], policy, W, [X])
    ok = qjax.Policy([qjax.Rule("w", weight=INT8, act=qjax.QuantSpec(qjax.int8))])
    with pytest.raises(ValueError, match="at least one batch"):
        qjax.calibrate(lambda p, x: x @ p["w"], ok, W, [])

    def loop(p, x):
        # v read once per iteration (read as v and as v.T too, its statistics could not be
        # added: input_statistics refuses that first)
        body = lambda c: (c[0] @ p["v"] @ jnp.ones((3, 4)), c[1] + 1)
        return jax.lax.while_loop(lambda c: c[1] < x.shape[0], body, (x @ p["w"], 0))[0]

    # inside a while_loop calibration reduces over the iterations (tests/quant/test_calibrate_loops.py);
    # statistics without a loop reduction still raise
    stats = qjax.calibrate(
        loop, qjax.Policy([qjax.Rule(".*", weight=INT8, act=qjax.QuantSpec(qjax.int8))]), W, [X]
    )
    assert set(stats) == {"w", "v"}
    with pytest.raises(ValueError, match=r"inside lax\.while_loop"):
        qjax.graph.input_statistics(loop, W, [X], lambda r: r.T @ r)


# -- views the walker follows, and custom derivative rules it keeps ----------------------


def _fq64(a, axes, bits=8):
    """float64 reference of symmetric absmax fake quant keeping ``axes`` (None: per tensor)."""
    a = np.asarray(a, np.float32)
    red = None if axes is None else tuple(d for d in range(a.ndim) if d not in axes)
    s = np.max(np.abs(a), axis=red, keepdims=True) * np.float32(1 / (2 ** (bits - 1) - 1))
    q = np.clip(np.round(a * (np.float32(1) / s)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.astype(np.float64) * s


W8A8 = qjax.Policy([qjax.Rule(".*", weight=INT8, act=qjax.QuantSpec(qjax.int8))])
TOK = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)


@jax.custom_vjp
def _binary(x, w):  # sign(w) forward, straight-through backward for w
    return x @ jnp.sign(w)


_binary.defvjp(lambda x, w: (_binary(x, w), (x, w)), lambda r, g: (g @ jnp.sign(r[1]).T, r[0].T @ g))


@jax.custom_jvp
def _scaled(x, w):  # a custom tangent rule that differs from the body's derivative
    return x * jnp.sum(w)


_scaled.defjvp(lambda p, t: (_scaled(*p), t[0] * 2.0 + jnp.sum(t[1]) * 3.0))


def test_user_custom_derivatives_are_kept_when_no_rule_acts_on_their_weight():
    rng = np.random.default_rng(0)
    p = {
        "bin": rng.normal(size=(8, 6)).astype(np.float32),
        "head": rng.normal(size=(6, 3)).astype(np.float32),
    }
    x = rng.normal(size=(4, 8)).astype(np.float32)
    f = lambda p, x: _binary(x, p["bin"]) @ p["head"]
    head_only = qjax.Policy([qjax.Rule("head", weight=INT8)])
    g = jax.grad(lambda p: jnp.sum(qjax.fake_quantized(f, head_only, integer_forward=False)(p, x) ** 2))(p)
    # float64 reference: straight-through gradient of bin through the fake-quantized head
    h = x.astype(np.float64) @ np.sign(p["bin"])
    hq = _fq64(p["head"], (1,))
    ref = x.T.astype(np.float64) @ (2 * (h @ hq) @ hq.T)
    # entries are sums of terms ~100: float32 rounding is relative to the largest, not to each
    np.testing.assert_allclose(g["bin"], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    g0 = jax.grad(lambda p: jnp.sum(qjax.fake_quantized(f, qjax.Policy([]))(p, x) ** 2))(p)
    np.testing.assert_allclose(g0["bin"], jax.grad(lambda p: jnp.sum(f(p, x) ** 2))(p)["bin"], rtol=1e-6)
    # custom_jvp: under the rule each output's tangent is 3 * sum(dw), so d/dw sum(out) = 3 * out.size
    # (the body's derivative would give sum(x))
    fj = lambda p, x: _scaled(x, p["bin"])
    gj = jax.grad(lambda p: jnp.sum(qjax.fake_quantized(fj, qjax.Policy([]))(p, x)))(p)
    np.testing.assert_allclose(gj["bin"], np.full((8, 6), 3.0 * x.size), rtol=1e-5)


def test_stop_gradient_and_barrier_are_views_and_still_stop_the_gradient():
    rng = np.random.default_rng(1)
    p = {"base": rng.normal(size=(8, 6)).astype(np.float32), "v": rng.normal(size=(8, 6)).astype(np.float32)}
    x = rng.normal(size=(3, 8)).astype(np.float32)
    f = lambda p, x: x @ jax.lax.stop_gradient(p["base"]) + x @ p["v"]  # a frozen LoRA-style base
    barrier = lambda p, x: jnp.matmul(*jax.lax.optimization_barrier((x, p["base"])))
    assert [o.path for o in find_ops(f, p, x)] == ["base", "v"]
    assert [o.path for o in find_ops(barrier, p, x)] == ["base"]
    xq = _fq64(x, None)
    want = xq @ _fq64(p["base"], (1,)) + xq @ _fq64(p["v"], (1,))
    np.testing.assert_allclose(qjax.quantized(f, W8A8)(p, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qjax.quantized(barrier, W8A8)(p, x), xq @ _fq64(p["base"], (1,)), rtol=1e-5)
    int8_train = qjax.Policy(
        [qjax.Rule(".*", weight=INT8, act=qjax.QuantSpec(qjax.int8), grad=qjax.QuantSpec(qjax.int8))]
    )
    qat = [qjax.fake_quantized(f, W8A8), qjax.fake_quantized(f, W8A8, integer_forward=False)]
    for fn in qat:
        np.testing.assert_allclose(fn(p, x), want, rtol=1e-5, atol=1e-5)
    for fn in (qat[0], qjax.fake_quantized(f, int8_train)):
        g = jax.grad(lambda p, fn=fn: jnp.sum(fn(p, x)))(p)
        assert float(jnp.abs(g["base"]).max()) == 0.0 and float(jnp.abs(g["v"]).max()) > 0


def test_weight_views_returned_by_jit_helpers_unstack_and_rot90_are_followed():
    rng = np.random.default_rng(2)
    p = {"stack": (rng.normal(size=(3, 8, 8)) * 0.5).astype(np.float32)}
    x = rng.normal(size=(4, 8)).astype(np.float32)
    layer = lambda p, i: jax.lax.dynamic_index_in_dim(p["stack"], i, keepdims=False)  # a jit in jax 0.10
    f = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ layer(p, i)), x)
    assert [o.path for o in find_ops(f, p, x)] == ["stack"]
    tok = qjax.Policy([qjax.Rule("stack", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=TOK)])
    h, wq = x.astype(np.float64), _fq64(p["stack"], (0, 2))
    for i in range(3):
        h = np.tanh(_fq64(h, (0,)) @ wq[i])
    np.testing.assert_allclose(qjax.quantized(f, tok)(p, x), h, rtol=1e-5, atol=1e-5)
    helper = jax.jit(lambda w: w.T.astype(jnp.bfloat16).astype(jnp.float32).T)
    for g in (
        lambda p, x: x @ jnp.unstack(p["stack"])[1],
        lambda p, x: x @ jnp.rot90(jnp.rot90(p["stack"][1], 1), -1),
        lambda p, x: x @ helper(p["stack"][1]),
    ):
        assert [o.path for o in find_ops(g, p, x)] == ["stack"]
    want = _fq64(x, None) @ _fq64(p["stack"], (2,))[1]  # W8A8's channel axis is the leaf's last
    got = qjax.quantized(lambda p, x: x @ jnp.rot90(jnp.rot90(p["stack"][1], 1), -1), W8A8)(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_stack_cast_or_transposed_before_its_scan_is_still_sliced_per_layer():
    rng = np.random.default_rng(3)
    p = {"stack": rng.normal(size=(3, 8, 8)).astype(np.float32)}
    x = rng.normal(size=(4, 8)).astype(np.float32)
    body = lambda h, w: (jnp.tanh(h @ w), None)
    cast = lambda p, x: jax.lax.scan(body, x, p["stack"].astype(jnp.bfloat16).astype(jnp.float32))[0]
    swapped = lambda p, x: jax.lax.scan(body, x, jnp.swapaxes(p["stack"], 1, 2))[0]
    bf16 = lambda w: w.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    # per-layer weight scales along the op's output axis (stored axis 2, or 1 when swapped)
    for fn, axis, layer in ((cast, 1, bf16), (swapped, 0, lambda w: w.T)):
        spec = qjax.QuantSpec(qjax.int8, channel_axes=(axis - 2,))
        policy = qjax.Policy([qjax.Rule("stack", weight=spec, act=qjax.QuantSpec(qjax.int8))])
        assert [(o.path, o.weight_shape) for o in find_ops(fn, p, x)] == [("stack", (8, 8))]
        h = x.astype(np.float64)
        for i in range(3):  # per-tensor activations
            h = np.tanh(_fq64(h, None) @ layer(_fq64(p["stack"][i], (axis,))))
        got = qjax.fake_quantized(fn, policy, integer_forward=False)(p, x)
        np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
        assert list(qjax.calibrate(fn, policy, p, [(x,)])) == ["stack"]
