"""``qjax.calibrate`` on ops inside ``lax.while_loop`` bodies: ranges reduced over the
iterations in the loop's carry equal those of the same loop unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qjax

W_SPEC = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))


def _loop(p, x, steps):
    """``h = tanh(h @ w)`` while ``i < steps`` (a traced count: a real while_loop)."""

    def body(state):
        i, h = state
        return i + 1, jnp.tanh(h @ p["w"]) * 2.0

    return lax.while_loop(lambda s: s[0] < steps, body, (jnp.int32(0), x))[1] @ p["out"]


def _unrolled(p, x, steps):
    h = x
    for _ in range(steps):
        h = jnp.tanh(h @ p["w"]) * 2.0
    return h @ p["out"]


@pytest.mark.parametrize(
    "calibration", [qjax.calib.absmax(), qjax.calib.minmax(), qjax.calib.percentile(95.0)], ids=str
)
def test_while_loop_ranges_equal_the_unrolled_loop(calibration):
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(k[0], (16, 16)) / 2, "out": jax.random.normal(k[1], (16, 4))}
    batches = [jax.random.normal(k[2], (8, 16)) * 3, jax.random.normal(k[3], (8, 16))]
    symmetric = calibration.name != "minmax"
    act = qjax.QuantSpec(qjax.int8, symmetric=symmetric, calibration=calibration)
    pol = qjax.Policy([qjax.Rule(".*", weight=W_SPEC, act=act)])
    steps = 3
    looped = qjax.calibrate(_loop, pol, params, [(x, jnp.int32(steps)) for x in batches])
    unrolled = qjax.calibrate(lambda p, x: _unrolled(p, x, steps), pol, params, batches)
    assert set(looped) == set(unrolled) == {"w", "out"}
    for path in unrolled:
        np.testing.assert_allclose(looped[path].lo, unrolled[path].lo, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(looped[path].hi, unrolled[path].hi, rtol=1e-5, atol=1e-6)
    if calibration.name != "percentile":  # every iteration was seen: the first reads x itself
        assert float(looped["w"].hi) >= max(float(jnp.max(x)) for x in batches)


def test_zero_iterations_leave_the_batch_out():
    """A loop that ran no iteration measured nothing (NaN), which leaves the ranges as the
    other batches set them."""
    params = {"w": jnp.eye(4), "out": jnp.ones((4, 2))}
    pol = qjax.Policy([qjax.Rule("w", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8))])
    x = jnp.full((2, 4), 0.5)
    stats = qjax.calibrate(_loop, pol, params, [(x, jnp.int32(0)), (x, jnp.int32(1))])
    np.testing.assert_allclose(stats["w"].hi, 0.5)
    only_empty = qjax.calibrate(_loop, pol, params, [(x, jnp.int32(0))])
    assert np.isnan(float(only_empty["w"].hi))


def test_static_scales_serve_inside_the_loop():
    k = jax.random.split(jax.random.key(1), 3)
    params = {"w": jax.random.normal(k[0], (16, 16)) / 2, "out": jax.random.normal(k[1], (16, 4))}
    x = jax.random.normal(k[2], (8, 16))
    pol = qjax.Policy([qjax.Rule(".*", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8))])
    stats = qjax.calibrate(_loop, pol, params, [(x, jnp.int32(3))])
    qp = qjax.quantize_params(params, pol, act_stats=stats)
    y = jax.jit(qjax.quantized(_loop, pol))(qp, x, jnp.int32(3))
    ref = _unrolled(params, x, 3)
    assert float(jnp.max(jnp.abs(y - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_statistics_without_a_loop_reduction_still_raise():
    params = {"w": jnp.eye(4), "out": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match=r"op 'w' inside lax.while_loop emits values"):
        qjax.graph.input_statistics(_loop, params, [(jnp.ones((2, 4)), jnp.int32(2))], lambda r: r.T @ r)


def _fori(p, x, steps):
    """The same loop with static bounds: jax lowers it to a scan whose constant is ``w``."""
    return lax.fori_loop(0, steps, lambda i, h: jnp.tanh(h @ p["w"]) * 2.0, x) @ p["out"]


def _scan_closure(p, x, steps):
    def body(h, _):
        return jnp.tanh(h @ p["w"]) * 2.0, None

    return lax.scan(body, x, None, length=steps)[0] @ p["out"]


@pytest.mark.parametrize("loop", [_fori, _scan_closure], ids=["fori_loop", "scan_constant"])
@pytest.mark.parametrize("calibration", [qjax.calib.absmax(), qjax.calib.percentile(95.0)], ids=str)
def test_a_weight_every_scan_iteration_reads_is_one_op(loop, calibration):
    """A scan that reuses one weight (not a stack of layers) pools its iterations' ranges
    into one per-tensor range, as the while_loop does (they were stacked per iteration, and
    ``quantized`` then rejected the ``(iterations,)`` activation scale)."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w": jax.random.normal(k[0], (16, 16)) / 2, "out": jax.random.normal(k[1], (16, 4))}
    batches = [jax.random.normal(k[2], (8, 16)) * 3, jax.random.normal(k[3], (8, 16))]
    pol = qjax.Policy(
        [qjax.Rule(".*", weight=W_SPEC, act=qjax.QuantSpec(qjax.int8, calibration=calibration))]
    )
    steps = 3
    got = qjax.calibrate(lambda p, x: loop(p, x, steps), pol, params, batches)
    want = qjax.calibrate(lambda p, x: _unrolled(p, x, steps), pol, params, batches)
    for path in want:
        assert np.shape(got[path].hi) == np.shape(want[path].hi) == ()
        np.testing.assert_allclose(got[path].hi, want[path].hi, rtol=1e-5, atol=1e-6)
    qp = qjax.quantize_params(params, pol, act_stats=got)
    x = batches[0]
    np.testing.assert_allclose(
        qjax.quantized(lambda p, x: loop(p, x, steps), pol)(qp, x),
        qjax.quantized(lambda p, x: _unrolled(p, x, steps), pol)(
            qjax.quantize_params(params, pol, act_stats=want), x
        ),
        rtol=1e-5,
        atol=1e-5,
    )
