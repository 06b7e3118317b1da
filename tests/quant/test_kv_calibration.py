"""``qjax.kv_cache_scales``: static KV-cache scales from ``qjax.calibrate``'s ``OpRule`` entries,
against float64 ranges of the keys and values, and a cache built with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax

R = np.random.default_rng(0)
HEADS, HEAD_DIM = 2, 8
P = {n: jnp.asarray(R.normal(size=(16, HEADS * HEAD_DIM)), jnp.float32) for n in ("wq", "wk", "wv")}
X = jnp.asarray(R.normal(size=(2, 5, 16)), jnp.float32)
CALIB = [X, 0.5 * X]
KEYS, VALUES = "op:attn/bqhd,bkhd->bhqk:rhs", "op:attn/bhqk,bkhd->bqhd:lhs"  # Flax's PV: dot(v, probs)


def project(p, x, name):
    b, t, _ = x.shape
    return (x @ p[name]).reshape(b, t, HEADS, HEAD_DIM)


def attend(p, x):
    q, k, v = (project(p, x, n) for n in ("wq", "wk", "wv"))
    with jax.named_scope("attn"):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def _float64_range(name):
    vals = [np.asarray(c, np.float64) @ np.asarray(P[name], np.float64) for c in CALIB]
    return min(v.min() for v in vals), max(v.max() for v in vals)


def _stats(spec):
    return qjax.calibrate(attend, qjax.Policy([qjax.OpRule(r"attn/.*", lhs=spec, rhs=spec)]), P, CALIB)


@pytest.mark.parametrize("fmt,qmax", [(qjax.int8, 127.0), (qjax.fp8_e4m3, 448.0)], ids=["int8", "fp8_e4m3"])
def test_symmetric_scales_are_the_calibrated_absmax_over_qmax(fmt, qmax):
    spec = qjax.QuantSpec(fmt)
    scales = qjax.kv_cache_scales(_stats(spec), keys=KEYS, values=VALUES, spec=spec)
    assert scales["k_zero_point"] is None and scales["v_zero_point"] is None
    for side, name in (("k", "wk"), ("v", "wv")):
        lo, hi = _float64_range(name)
        assert float(scales[f"{side}_scale"]) == pytest.approx(max(-lo, hi) / qmax, rel=1e-6)


def test_asymmetric_value_spec_gets_an_integral_zero_point_the_cache_takes():
    spec = qjax.QuantSpec(qjax.int8)
    value_spec = qjax.QuantSpec(qjax.int8, symmetric=False)
    stats = _stats(value_spec)  # an asymmetric calibration spec records min / max, not +-absmax
    scales = qjax.kv_cache_scales(stats, keys=KEYS, values=VALUES, spec=spec, value_spec=value_spec)
    lo, hi = _float64_range("wv")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    want_scale = (hi - lo) / 255
    assert float(scales["v_scale"]) == pytest.approx(want_scale, rel=1e-6)
    assert float(scales["v_zero_point"]) == np.clip(-128 - np.round(lo / want_scale), -128, 127)
    cache = qjax.KVCache.init(
        spec,
        batch=2,
        length=5,
        heads=HEADS,
        head_dim=HEAD_DIM,
        value_spec=value_spec,
        dtype=jnp.float32,
        **scales,
    )
    k, v = project(P, X, "wk"), project(P, X, "wv")
    k_hat, v_hat = cache.update(k, v, 0).dequantize()
    # the calibration covered X: every key / value within half a step of its code
    np.testing.assert_allclose(k_hat, k, atol=0.51 * float(scales["k_scale"]))
    np.testing.assert_allclose(v_hat, v, atol=0.51 * want_scale)


def test_a_cache_with_calibrated_scales_attends_like_float64_over_its_codes():
    spec = qjax.QuantSpec(qjax.fp8_e4m3)
    scales = qjax.kv_cache_scales(_stats(spec), keys=KEYS, values=VALUES, spec=spec)
    cache = qjax.KVCache.init(
        spec, batch=2, length=8, heads=HEADS, head_dim=HEAD_DIM, dtype=jnp.float32, **scales
    )
    q, k, v = (project(P, X, n) for n in ("wq", "wk", "wv"))
    cache = cache.update(k, v, 0)
    out = cache.attend(q[:, -1:], 4)  # the last prompt token, attending over positions 0..4
    k_hat, v_hat = (np.asarray(a, np.float64) for a in cache.dequantize())
    q64 = np.asarray(q[:, -1:], np.float64)
    s = np.einsum("bqhd,bkhd->bhqk", q64, k_hat[:, :5]) / np.sqrt(HEAD_DIM)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v_hat[:, :5])
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-4, atol=1e-5)


def test_missing_keys_name_the_op_entries_there_are():
    stats = _stats(qjax.QuantSpec(qjax.int8))
    with pytest.raises(KeyError, match=r"keys='op:attn/typo:rhs'.*op:attn/bqhd,bkhd->bhqk:rhs"):
        qjax.kv_cache_scales(stats, keys="op:attn/typo:rhs", values=VALUES, spec=qjax.QuantSpec(qjax.int8))
    with pytest.raises(KeyError, match=r"values='wk'"):
        qjax.kv_cache_scales(stats, keys=KEYS, values="wk", spec=qjax.QuantSpec(qjax.int8))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_range_that_is_not_finite_is_refused(bad):
    stats = dict(_stats(qjax.QuantSpec(qjax.int8)))
    stats[VALUES] = qjax.ActStats(jnp.float32(-1.0), jnp.float32(bad))
    with pytest.raises(
        ValueError, match=r"stats\['op:attn/bhqk,bkhd->bqhd:lhs'\]: its activation range is (NaN|infinite)"
    ):
        qjax.kv_cache_scales(stats, keys=KEYS, values=VALUES, spec=qjax.QuantSpec(qjax.int8))


def test_a_per_layer_range_and_a_spec_that_is_not_a_quantspec_are_refused():
    stats = dict(_stats(qjax.QuantSpec(qjax.int8)))
    with pytest.raises(TypeError, match="value_spec must be a QuantSpec"):
        qjax.kv_cache_scales(
            stats, keys=KEYS, values=VALUES, spec=qjax.QuantSpec(qjax.int8), value_spec="int8"
        )
    stats[KEYS] = qjax.ActStats(-jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="is not one range"):
        qjax.kv_cache_scales(stats, keys=KEYS, values=VALUES, spec=qjax.QuantSpec(qjax.int8))


def test_all_zero_keys_get_scale_one():
    """A layer whose keys were all zero in calibration (a zero range) gets scale 1, not 0 or NaN."""
    stats = dict(_stats(qjax.QuantSpec(qjax.int8)))
    stats[KEYS] = qjax.ActStats(jnp.float32(0.0), jnp.float32(0.0))
    scales = qjax.kv_cache_scales(stats, keys=KEYS, values=VALUES, spec=qjax.QuantSpec(qjax.int8))
    assert float(scales["k_scale"]) == 1.0


def test_traced_stats_under_jit_give_the_same_scales():
    spec = qjax.QuantSpec(qjax.int8, symmetric=False)
    stats = {k: v for k, v in _stats(spec).items() if k in (KEYS, VALUES)}
    eager = qjax.kv_cache_scales(stats, keys=KEYS, values=VALUES, spec=spec)
    traced = jax.jit(lambda s: qjax.kv_cache_scales(s, keys=KEYS, values=VALUES, spec=spec))(stats)
    for name, value in eager.items():
        np.testing.assert_array_equal(np.asarray(traced[name]), np.asarray(value), err_msg=name)


def test_a_weight_ops_input_range_is_not_taken_for_keys():
    spec = qjax.QuantSpec(qjax.int8)
    policy = qjax.Policy(
        [qjax.Rule("w.", weight=spec, act=spec), qjax.OpRule(r"attn/.*", lhs=spec, rhs=spec)]
    )
    stats = qjax.calibrate(attend, policy, P, CALIB)
    with pytest.raises(ValueError, match=r"keys='wk' is a weight op's input range.*op:attn/"):
        qjax.kv_cache_scales(stats, keys="wk", values=VALUES, spec=spec)


def test_head_major_attention_has_its_values_on_the_other_side_and_the_probabilities_warn():
    """``"bhqk,bhkd->bhqd"`` lowers to ``dot_general(p, v)``: its values are the ``rhs``; the
    ``lhs`` is the probabilities, whose [0, 1] range would clip every value."""

    def head_major(p, x):
        q, k, v = (project(p, x, n).transpose(0, 2, 1, 3) for n in ("wq", "wk", "wv"))
        with jax.named_scope("attn"):
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
            return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, -1), v)

    spec = qjax.QuantSpec(qjax.int8)
    stats = qjax.calibrate(head_major, qjax.Policy([qjax.OpRule(r"attn/.*", lhs=spec, rhs=spec)]), P, CALIB)
    keys, probs, values = (
        "op:attn/bhqd,bhkd->bhqk:rhs",
        "op:attn/bhqk,bhkd->bhqd:lhs",
        "op:attn/bhqk,bhkd->bhqd:rhs",
    )
    scales = qjax.kv_cache_scales(stats, keys=keys, values=values, spec=spec)
    lo, hi = _float64_range("wv")
    assert float(scales["v_scale"]) == pytest.approx(max(-lo, hi) / 127, rel=1e-6)
    with pytest.warns(UserWarning, match=r"within \[-1, 1\]: it looks like the attention probabilities"):
        qjax.kv_cache_scales(stats, keys=keys, values=probs, spec=spec)
    asym = qjax.QuantSpec(qjax.int8, symmetric=False)  # min / max: the probabilities' [0, <= 1]
    stats = qjax.calibrate(head_major, qjax.Policy([qjax.OpRule(r"attn/.*", lhs=asym, rhs=asym)]), P, CALIB)
    assert float(stats[probs].lo) >= 0.0
    with pytest.warns(UserWarning, match="it looks like the attention probabilities"):
        qjax.kv_cache_scales(stats, keys=keys, values=probs, spec=asym)
