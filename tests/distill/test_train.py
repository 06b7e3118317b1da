"""Teacher–student steps: frozen teacher, trained student and adapters, cached top-k
teacher outputs, fake-quantized student."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import distill


class MLP(nn.Module):
    hidden: int
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="body")(x))
        return nn.Dense(self.classes, name="head")(x)


X = jax.random.normal(jax.random.key(0), (64, 12))
Y = jax.random.randint(jax.random.key(1), (64,), 0, 5)
TEACHER, STUDENT = MLP(64), MLP(8)
T_VARS = TEACHER.init(jax.random.key(2), X)
S_VARS = STUDENT.init(jax.random.key(3), X)
T_FEAT, S_FEAT = "params/body/kernel", "params/body/kernel"


def kd_hint(student, teacher, batch, adapters):
    kd = distill.kd_loss(student.logits, teacher.logits, batch["y"], 4.0, 0.9)
    hint = distill.hint_loss(
        student.features[S_FEAT]["output"], teacher.features[T_FEAT]["output"], adapters["body"]
    )
    return kd + 0.5 * hint, {"kd": kd, "hint": hint}


def _step():
    return distill.distill_step(
        STUDENT.apply,
        TEACHER.apply,
        kd_hint,
        optax.adam(1e-2),
        student_patterns=[S_FEAT],
        teacher_patterns=[T_FEAT],
        add_bias=True,
    )


def test_teacher_stays_fixed_and_loss_decreases():
    ds = _step()
    adapters = {"body": distill.init_adapter(jax.random.key(4), 8, 64)}
    state = ds.init(S_VARS, adapters)
    # the teacher is not in the optimizer state
    assert len(jax.tree.leaves(state.opt_state)) == 1 + 2 * len(jax.tree.leaves(state.params))
    teacher_before = jax.tree.map(np.array, T_VARS)
    batch = {"x": X, "y": Y}
    first = None
    for _ in range(60):
        state, metrics = ds.step(state, T_VARS, batch)
        first = metrics if first is None else first
    assert int(state.step) == 60
    assert float(metrics["loss"]) < 0.6 * float(first["loss"])
    assert float(metrics["hint"]) < float(first["hint"]) and float(metrics["kd"]) < float(first["kd"])
    jax.tree.map(np.testing.assert_array_equal, T_VARS, teacher_before)
    # the student and the adapter moved
    assert not np.allclose(state.params["adapters"]["body"]["kernel"], adapters["body"]["kernel"])
    body = state.params["student"]["params"]["body"]["kernel"]
    assert not np.allclose(body, S_VARS["params"]["body"]["kernel"])
    # no gradient reaches the teacher (stop_gradient), even if one asks for it
    g_teacher = jax.grad(lambda t: ds.loss(state.params, t, batch)[0])(T_VARS)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))


def test_loss_matches_hand_written_objective():
    ds = _step()
    adapters = {"body": distill.init_adapter(jax.random.key(4), 8, 64)}
    params = {"student": S_VARS, "adapters": adapters}
    got, metrics = ds.loss(params, T_VARS, {"x": X, "y": Y})
    sp, tp = S_VARS["params"], T_VARS["params"]
    s_h = X @ sp["body"]["kernel"] + sp["body"]["bias"]
    t_h = X @ tp["body"]["kernel"] + tp["body"]["bias"]
    want = distill.kd_loss(STUDENT.apply(S_VARS, X), TEACHER.apply(T_VARS, X), Y, 4.0, 0.9)
    want = want + 0.5 * distill.hint_loss(s_h, t_h, adapters["body"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(metrics) == {"loss", "kd", "hint"}


def test_cached_topk_teacher_skips_the_teacher():
    full = distill.cache_teacher(TEACHER.apply, T_VARS, X, k=5, temperature=4.0, batch_size=24)
    top2 = distill.cache_teacher(TEACHER.apply, T_VARS, X, k=2, temperature=4.0, batch_size=24)
    assert full.log_probs.shape == (64, 5) and top2.indices.shape == (64, 2)
    ds = distill.distill_step(STUDENT.apply, None, distill.kd_objective(4.0, 0.9), optax.adam(1e-2))
    kd = distill.kd_objective(4.0, 0.9)
    live = distill.distill_step(STUDENT.apply, TEACHER.apply, kd, optax.adam(1e-2))
    params = {"student": S_VARS, "adapters": {}}
    idx = np.arange(10, 40)
    batch = {"x": X[idx], "y": Y[idx]}
    want = live.loss(params, T_VARS, batch)[0]
    np.testing.assert_allclose(ds.loss(params, None, {**batch, "teacher": full[idx]})[0], want, rtol=1e-5)
    approx = ds.loss(params, None, {**batch, "teacher": top2[idx]})[0]
    assert abs(float(approx) - float(want)) < 0.1 * float(want)
    # training from the cache only (teacher_params=None) reduces the loss
    state = ds.init(S_VARS)
    losses = []
    for _ in range(40):
        state, m = ds.step(state, None, {"x": X, "y": Y, "teacher": top2})
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match="no teacher params"):
        live.loss(params, None, batch)
    feats = distill.distill_step(
        STUDENT.apply, TEACHER.apply, kd_hint, optax.sgd(0.1), teacher_patterns=[T_FEAT]
    )
    with pytest.raises(ValueError, match="features"):
        feats.loss(params, T_VARS, {**batch, "teacher": full[idx]})


def test_fake_quantized_student_in_the_same_step():
    w4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=w4)])
    ds = distill.distill_step(
        STUDENT.apply,
        TEACHER.apply,
        kd_hint,
        optax.adam(1e-2),
        student_patterns=[S_FEAT],
        teacher_patterns=[T_FEAT],
        student_policy=policy,
        add_bias=True,
    )
    adapters = {"body": distill.init_adapter(jax.random.key(4), 8, 64)}
    params = {"student": S_VARS, "adapters": adapters}
    got = ds.loss(params, T_VARS, {"x": X, "y": Y})[0]
    # by hand: the student's logits and features with fake-quantized int4 kernels
    sp, tp = S_VARS["params"], T_VARS["params"]
    s_logits = qjax.fake_quantized(STUDENT.apply, policy)(S_VARS, X)
    s_h = X @ qjax.fake_quant(sp["body"]["kernel"], w4) + sp["body"]["bias"]
    t_h = X @ tp["body"]["kernel"] + tp["body"]["bias"]
    want = distill.kd_loss(s_logits, TEACHER.apply(T_VARS, X), Y, 4.0, 0.9)
    want = want + 0.5 * distill.hint_loss(s_h, t_h, adapters["body"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    float_loss = _step().loss(params, T_VARS, {"x": X, "y": Y})[0]
    assert abs(float(got) - float(float_loss)) > 1e-4
    # one jitted step trains through the quantizer (straight-through gradients)
    state = ds.init(S_VARS, adapters)
    first = None
    for _ in range(60):
        state, m = ds.step(state, T_VARS, {"x": X, "y": Y})
        first = m if first is None else first
    assert float(m["loss"]) < 0.7 * float(first["loss"])
    assert ds.step._cache_size() == 1


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(8, name="body")(x)))
        return nn.Dense(5, name="head")(x)


def test_step_key_drives_stochastic_rounding():
    """The step's key reaches the student's stochastic-rounding policy (refused without a
    key, which distill_step could not take); the loss equals the hand-built one."""
    w4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), rounding="stochastic")
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=w4)])
    batch, key = {"x": X, "y": Y}, jax.random.key(7)
    params = {"student": S_VARS, "adapters": {}}
    t_logits = TEACHER.apply(T_VARS, X)
    ds = distill.distill_step(
        STUDENT.apply, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1), student_policy=policy
    )
    with pytest.raises(ValueError, match="needs a PRNG key"):
        ds.loss(params, T_VARS, batch)
    want = distill.kd_loss(
        qjax.fake_quantized(STUDENT.apply, policy, key=key)(S_VARS, X), t_logits, Y, 4.0, 0.9
    )
    np.testing.assert_allclose(ds.loss(params, T_VARS, batch, key)[0], want, rtol=1e-6)
    _, metrics = ds.step(ds.init(S_VARS), T_VARS, batch, key)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)


def test_student_key_drives_student_dropout():
    """With student_key the student function takes a key of its own (dropout); none given
    is an error naming the option."""
    batch, key = {"x": X, "y": Y}, jax.random.key(7)
    t_logits = TEACHER.apply(T_VARS, X)
    model = DropoutMLP()
    v = model.init(jax.random.key(9), X)
    fn = lambda p, x, k: model.apply(p, x, rngs={"dropout": k})
    ds = distill.distill_step(fn, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1), student_key=True)
    with pytest.raises(ValueError, match="student_key=True"):
        ds.loss({"student": v, "adapters": {}}, T_VARS, batch)
    k = jax.random.key_data(key)  # a raw key, as qjax.parallel's step key
    got = ds.loss({"student": v, "adapters": {}}, T_VARS, batch, k)[0]
    want = distill.kd_loss(fn(v, X, jax.random.split(k)[1]), t_logits, Y, 4.0, 0.9)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_distill_step_trains_lsq_scales():
    """A student_policy with ste="lsq": init trains the learned scales beside the student
    (it failed at the first step asking for scale=); the first step's gradients equal the
    hand-written fake_quantized(..., scales=) loss's, and the export matches the QAT forward."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5)(nn.relu(nn.Dense(8)(x)))

    lsq = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    pol = qjax.Policy([qjax.Rule(r".*/kernel", weight=lsq)])
    x = jax.random.normal(jax.random.key(0), (16, 6))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 5)
    net = Net()
    sv, tv = net.init(jax.random.key(2), x), net.init(jax.random.key(3), x)
    objective = distill.kd_objective(2.0, 0.5)
    ds = distill.distill_step(net.apply, net.apply, objective, optax.sgd(0.1), student_policy=pol)
    state = ds.init(sv)
    student = state.params["student"]
    assert isinstance(student, qjax.LSQParams) and set(student.scales) == {
        "params/Dense_0/kernel",
        "params/Dense_1/kernel",
    }
    new, m0 = ds.step(state, tv, {"x": x, "y": y})

    def loss(p, s):
        out = qjax.fake_quantized(net.apply, pol, scales=s)(p, x)
        return distill.kd_loss(out, net.apply(tv, x), y, 2.0, 0.5)

    gp, gs = jax.grad(loss, argnums=(0, 1))(sv, qjax.lsq_scales(sv, pol))
    got = jax.tree.map(lambda a, b: (a - b) / 0.1, student, new.params["student"])  # sgd: -0.1 gradient
    for g, w in zip(jax.tree.leaves((got.params, got.scales)), jax.tree.leaves((gp, gs))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gs))
    state = new
    for _ in range(5):
        state, m = ds.step(state, tv, {"x": x, "y": y})
    assert float(m["loss"]) < float(m0["loss"])
    trained = state.params["student"]
    served = qjax.quantized(net.apply, pol)(qjax.quantize_params(trained, pol), x)
    fake = qjax.fake_quantized(net.apply, pol)(trained, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(fake), atol=1e-5)


def test_misspelt_student_pattern_is_an_error_not_a_zero_hint_loss():
    ds = distill.distill_step(
        STUDENT.apply, TEACHER.apply, kd_hint, optax.adam(1e-2), student_patterns=["params/bdy/kernel"]
    )
    state = ds.init(S_VARS, {"body": distill.init_adapter(jax.random.key(4), 8, 64)})
    with pytest.raises(ValueError, match=r"\['params/bdy/kernel'\] match no weight"):
        ds.step(state, T_VARS, {"x": X, "y": Y})


def test_student_act_stats_give_the_student_static_activation_scales():
    """``student_act_stats`` reaches ``fake_quantized``: the student is distilled with the
    static W8A8 activation scales it is served with."""
    act = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=qjax.QuantSpec(qjax.int8), act=act)])
    stats = qjax.calibrate(STUDENT.apply, policy, S_VARS, [0.5 * X])
    batch, params = {"x": X, "y": Y}, {"student": S_VARS, "adapters": {}}
    t_logits = TEACHER.apply(T_VARS, X)
    ds = distill.distill_step(
        STUDENT.apply,
        TEACHER.apply,
        distill.kd_objective(),
        optax.sgd(0.1),
        student_policy=policy,
        student_act_stats=stats,
    )
    served = qjax.quantized(STUDENT.apply, policy)(qjax.quantize_params(S_VARS, policy, act_stats=stats), X)
    want = distill.kd_loss(served, t_logits, Y, 4.0, 0.9)
    np.testing.assert_allclose(ds.loss(params, T_VARS, batch)[0], want, rtol=1e-5)


def test_student_delayed_scaling_histories_ride_in_the_state():
    """``student_act_stats_momentum=qjax.DelayedScaling``: ``init`` turns calibrated stats
    into histories, each step pushes the student's batch range as ``fake_quantized`` does."""
    act = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=qjax.QuantSpec(qjax.int8), act=act)])
    stats = qjax.calibrate(STUDENT.apply, policy, S_VARS, [0.5 * X])
    delayed = qjax.DelayedScaling(history=2)
    kw = dict(student_policy=policy, student_act_stats_momentum=delayed)
    ds = distill.distill_step(STUDENT.apply, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1), **kw)
    state = ds.init(S_VARS, act_stats=stats)  # calibrated stats: made histories
    assert all(isinstance(h, qjax.ActHistory) for h in state.act_stats.values())
    new_state, metrics = ds.step(state, T_VARS, {"x": X, "y": Y})
    logits, want = qjax.fake_quantized(STUDENT.apply, policy, act_stats_momentum=delayed)(
        S_VARS, delayed.init(stats), X
    )
    for path in stats:
        np.testing.assert_allclose(new_state.act_stats[path].hi, want[path].hi, rtol=1e-6)
    kd = distill.kd_loss(logits, TEACHER.apply(T_VARS, X), Y, 4.0, 0.9)
    np.testing.assert_allclose(metrics["loss"], kd, rtol=1e-5)


def test_running_student_act_stats_move_with_each_step():
    """``student_act_stats_momentum``: the state carries the student's running ranges, each
    step moves them as ``fake_quantized(..., act_stats_momentum=...)`` does and distils the
    student quantized with the moved ranges; misuse is refused by name."""
    act = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=qjax.QuantSpec(qjax.int8), act=act)])
    stats = qjax.calibrate(STUDENT.apply, policy, S_VARS, [0.5 * X])
    kw = dict(student_policy=policy, student_act_stats_momentum=0.8)
    ds = distill.distill_step(STUDENT.apply, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1), **kw)
    state = ds.init(S_VARS, act_stats=stats)
    new_state, metrics = ds.step(state, T_VARS, {"x": X, "y": Y})
    logits, want = qjax.fake_quantized(STUDENT.apply, policy, act_stats_momentum=0.8)(S_VARS, stats, X)
    assert "act_stats" not in metrics and int(new_state.step) == 1
    for path in stats:
        assert float(new_state.act_stats[path].hi) == pytest.approx(float(want[path].hi), rel=1e-6)
        assert float(want[path].hi) != pytest.approx(float(stats[path].hi), rel=1e-3)
    kd = distill.kd_loss(logits, TEACHER.apply(T_VARS, X), Y, 4.0, 0.9)
    np.testing.assert_allclose(metrics["loss"], kd, rtol=1e-5)
    with pytest.raises(ValueError, match="starting stats of student_act_stats_momentum"):
        ds.init(S_VARS)
    with pytest.raises(ValueError, match="pass the running stats"):
        ds.loss({"student": S_VARS, "adapters": {}}, T_VARS, {"x": X, "y": Y})
    with pytest.raises(ValueError, match="needs a student_policy"):
        distill.distill_step(
            STUDENT.apply, None, distill.kd_objective(), optax.sgd(0.1), student_act_stats_momentum=0.8
        )
    with pytest.raises(ValueError, match="act_stats_momentum=2"):
        distill.distill_step(
            STUDENT.apply,
            None,
            distill.kd_objective(),
            optax.sgd(0.1),
            student_policy=policy,
            student_act_stats_momentum=2,
        )


def test_a_momentum_teacher_is_the_moving_average_of_the_student():
    """``teacher_momentum``: the teacher (the student's architecture) is ``m·t + (1−m)·s``
    after every step, starts from the student, takes no gradient, and the loss of step k
    reads the teacher of step k − 1 (float64 replay)."""
    m = 0.9
    ds = distill.distill_step(
        STUDENT.apply, STUDENT.apply, distill.kd_objective(4.0, 0.9), optax.sgd(0.5), teacher_momentum=m
    )
    state = ds.init(S_VARS)
    assert not jax.tree.leaves(state.opt_state)  # plain sgd holds nothing: the teacher is no trained param
    batch = {"x": X, "y": Y}
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    teacher = f64(S_VARS)
    for _ in range(3):
        want_loss, _ = ds.loss(state.params, state.teacher, batch)
        state, metrics = ds.step(state, None, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-6)
        teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s, teacher, f64(state.params["student"]))
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), f64(state.teacher), teacher
        )
    assert not np.allclose(
        state.teacher["params"]["body"]["kernel"], state.params["student"]["params"]["body"]["kernel"]
    )


def test_a_bf16_students_momentum_teacher_keeps_float32():
    """With m = 0.999 a bf16 average rounds most updates away; the teacher is float32."""
    student = jax.tree.map(lambda a: a.astype(jnp.bfloat16), S_VARS)
    ds = distill.distill_step(
        STUDENT.apply, STUDENT.apply, distill.kd_objective(), optax.sgd(0.5), teacher_momentum=0.999
    )
    state = ds.init(student)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.teacher))
    first = jax.tree.map(np.asarray, state.teacher)
    for _ in range(3):
        state, _ = ds.step(state, None, {"x": X, "y": Y})
    moved = np.mean(
        np.asarray(state.teacher["params"]["body"]["kernel"]) != first["params"]["body"]["kernel"]
    )
    assert moved > 0.9


def test_momentum_teacher_misuse_is_refused():
    ds = distill.distill_step(
        STUDENT.apply, STUDENT.apply, distill.kd_objective(), optax.sgd(0.1), teacher_momentum=0.99
    )
    state = ds.init(S_VARS)
    with pytest.raises(ValueError, match=r"the teacher is state\.teacher; pass None"):
        ds.step(state, T_VARS, {"x": X, "y": Y})
    with pytest.raises(ValueError, match="the student's structure"):
        ds.init(S_VARS, teacher={"params": {}})
    with pytest.raises(ValueError, match="needs a teacher_fn"):
        distill.distill_step(
            STUDENT.apply, None, distill.kd_objective(), optax.sgd(0.1), teacher_momentum=0.9
        )
    plain = distill.distill_step(STUDENT.apply, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="give distill_step\\(teacher_momentum"):
        plain.init(S_VARS, teacher=S_VARS)
    from qjax import parallel as qp

    with pytest.raises(ValueError, match="does not carry a momentum teacher"):
        kd = distill.kd_objective()
        qp.distill_train_step(
            STUDENT.apply, STUDENT.apply, kd, optax.sgd(0.1), None, None, None, teacher_momentum=0.9
        )
