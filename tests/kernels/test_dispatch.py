"""Dispatch from ``qjax.quantized`` / ``quantized_dot_general`` to the Pallas kernels
(``backend=``), checked on CPU with the kernels in the Pallas interpreter."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.kernels import BlockConfig, dispatch, tuning
from qjax.quant.ops import quantized_dot_general


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(128)(nn.relu(nn.Dense(256)(x)))


@pytest.fixture(scope="module")
def model():
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (3, 5, 256), jnp.bfloat16)
    return m, m.init(jax.random.key(1), x), x


WEIGHT_SPECS = {
    "int4 packed along N": qjax.QuantSpec(qjax.int4, channel_axes=(-1,)),
    "int4 g128 packed along K": qjax.QuantSpec(
        qjax.int4, channel_axes=(-1,), group_axis=0, group_size=128, pack_axis=0
    ),
    "int4 g64 packed along N": qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=64),
    "int8": qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
    "int4 g64, bfloat16-stored scales": qjax.QuantSpec(
        qjax.int4, channel_axes=(-1,), group_axis=0, group_size=64, scale_dtype="bfloat16"
    ),
}


@pytest.mark.parametrize("backend", ["interpret-gpu", "interpret-tpu"])
@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
def test_weight_only_kernels_match_xla(model, name, backend):
    m, v, x = model
    pol = qjax.Policy([qjax.Rule(r".*kernel", weight=WEIGHT_SPECS[name])])
    qp = qjax.quantize_params(v, pol)
    ref = qjax.quantized(m.apply, pol, backend="xla")(qp, x).astype(jnp.float32)
    out = qjax.quantized(m.apply, pol, backend=backend)(qp, x).astype(jnp.float32)
    assert out.shape == ref.shape == (3, 5, 128)
    # same codes and scales; bf16 rounding of the hidden activation and the output differ
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("backend", ["interpret-gpu", "interpret-tpu"])
def test_w8a8_kernel_matches_xla(model, backend):
    m, v, x = model
    pol = qjax.Policy(
        [
            qjax.Rule(
                r".*kernel",
                weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
                act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
            )
        ]
    )
    qp = qjax.quantize_params(v, pol)
    xf = x.astype(jnp.float32)
    ref = qjax.quantized(m.apply, pol, backend="xla")(qp, xf)
    out = qjax.quantized(m.apply, pol, backend=backend)(qp, xf)
    # same integer products and the same float32 rescale
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_w8a8_static_scale_and_grad():
    x = jax.random.normal(jax.random.key(2), (6, 128))
    w = qjax.quantize(
        jax.random.normal(jax.random.key(3), (128, 64)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    )
    spec = qjax.QuantSpec(qjax.int8)
    dn = (((1,), (0,)), ((), ()))

    def f(x, backend):
        return quantized_dot_general(x, w, dn, lhs_spec=spec, lhs_scale=jnp.float32(0.03), backend=backend)

    np.testing.assert_allclose(f(x, "interpret-gpu"), f(x, "xla"), rtol=1e-6, atol=1e-6)
    g_kernel = jax.grad(lambda x: f(x, "interpret-gpu").sum())(x)
    g_xla = jax.grad(lambda x: f(x, "xla").sum())(x)
    np.testing.assert_allclose(g_kernel, g_xla, rtol=1e-6)


def test_auto_on_cpu_is_xla(model):
    m, v, x = model
    pol = qjax.Policy([qjax.Rule(r".*kernel", weight=WEIGHT_SPECS["int8"])])
    qp = qjax.quantize_params(v, pol)
    np.testing.assert_array_equal(
        qjax.quantized(m.apply, pol)(qp, x), qjax.quantized(m.apply, pol, backend="xla")(qp, x)
    )


def test_forced_kernel_errors_name_the_leaf_and_reason(model):
    m, v, x = model
    pol = qjax.Policy([qjax.Rule(r".*kernel", weight=WEIGHT_SPECS["int8"])])
    qp = qjax.quantize_params(v, pol)
    with pytest.raises(ValueError, match=r"params/Dense_\d/kernel.*backend='pallas'.*no GPU or TPU"):
        qjax.quantized(m.apply, pol, backend="pallas")(qp, x)
    asym = qjax.Policy(
        [qjax.Rule(r".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,), symmetric=False))]
    )
    with pytest.raises(ValueError, match="zero point"):
        qjax.quantized(m.apply, asym, backend="interpret-gpu")(qjax.quantize_params(v, asym), x)
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        qjax.quantized(m.apply, pol, backend="triton")(qp, x)


def test_uncovered_ops_fall_back_or_raise():
    no_act_gpu = ((((1,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    w = qjax.quantize(jnp.ones((64, 32)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))
    x = jnp.ones((4, 64), jnp.bfloat16)
    plan, why = dispatch.plan(x, w, (((1,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    assert plan is not None and plan.kind == "w8a16" and plan.layout == "int8"
    plan, why = dispatch.plan(x.T, w, (((0,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    assert plan is None and "last axis" in why
    w2 = qjax.quantize(jnp.ones((64, 32)), qjax.QuantSpec(qjax.int2, channel_axes=(-1,)))
    plan, why = dispatch.plan(x, w2, (((1,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    assert plan is None and "nibbles only" in why
    fp8 = qjax.quantize(jnp.ones((64, 32)), qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,)))
    plan, why = dispatch.plan(x, fp8, (((1,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    assert plan is None and "signed integer" in why
    for spec in (
        qjax.mx_spec(qjax.fp4_e2m1),
        qjax.QuantSpec(qjax.fp4_e2m1, channel_axes=(-1,)),
        qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=64, group_axis=0),
    ):  # fp4 / NF4 have no kernel: refused with a reason, so backend="auto" runs XLA
        plan, why = dispatch.plan(x, qjax.quantize(jnp.ones((64, 32)), spec), *no_act_gpu)
        assert plan is None and f"{spec.format!r} (kernels take signed integer" in why
    small = qjax.quantize(jnp.ones((64, 8)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))
    plan, why = dispatch.plan(x, small, (((1,), (0,)), ((), ())), None, None, None, "interpret-gpu")
    assert plan is None and "block_n must divide N" in why  # N=8: no legal GPU tile


def test_tuning_lookup_buckets_and_nearest_shape():
    cfg = BlockConfig(16, 64, 128, 2, True)
    entries = (
        tuning.TunedEntry("w8a16", 1, 4096, 4096, None, cfg, 10.0, 30.0),
        tuning.TunedEntry("w8a16", 16, 8192, 8192, None, cfg, 40.0, 30.0),
        tuning.TunedEntry("w8a16", 256, 4096, 4096, None, cfg, 50.0, 40.0),
    )
    e = tuning.lookup("gpu", "w8a16", 4, 4096, 4096, None, entries)
    assert e.k == 4096 and e.speedup == 3.0  # same bucket (<= 16), nearest (K, N)
    assert tuning.lookup("gpu", "w8a16", 12, 7000, 9000, None, entries).k == 8192
    assert tuning.lookup("gpu", "w8a16", 100, 4096, 4096, None, entries) is None  # bucket 128: none measured
    assert tuning.lookup("gpu", "w8a16", 4, 4096, 4096, 128, entries) is None  # other group size
    assert tuning.m_bucket(1) == tuning.m_bucket(16) == 16 and tuning.m_bucket(17) == 32


def test_tuning_table_round_trip(tmp_path):
    e = tuning.TunedEntry("w4a16_k_halves", 16, 4096, 4096, 128, BlockConfig(16, 64, 128, 4, True), 5.0, 12.5)
    path = tmp_path / "t.json"
    tuning.write_table(path, "dev", "2026-11-26", [e])
    import json

    rows = json.loads(path.read_text())["entries"]
    assert rows[0]["config"]["split_k"] == 4 and rows[0]["xla_us"] == 12.5


W8A8_TOKENS = qjax.QuantSpec(qjax.int8, channel_axes=(0,))  # resolved per-token spec of a (4, 64) input


@pytest.mark.parametrize(
    "speedups,expected",
    [((1.3, 1.8), "nk"), ((1.8, 1.3), "kn"), ((None, 1.2), "nk"), ((0.9, 0.8), None), ((None, None), None)],
)
def test_auto_w8a8_takes_the_faster_weight_layout(monkeypatch, speedups, expected):
    cfg = BlockConfig(16, 32, 64, 1, False, 4, 3)
    entries = tuple(
        tuning.TunedEntry(name, 16, 64, 32, None, cfg, 18.0 / s, 18.0)
        for name, s in zip(("w8a8", "w8a8_nk"), speedups, strict=True)
        if s is not None
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)), WEIGHT_SPECS["int8"])
    x = jnp.ones((4, 64), jnp.float32)
    plan, why = dispatch.plan(x, w, (((1,), (0,)), ((), ())), W8A8_TOKENS, None, None, "auto")
    if expected is None:
        assert plan is None and "no measured speedup for w8a8 at M=4, K=64, N=32" in why
    else:
        assert plan is not None and plan.kind == "w8a8" and plan.layout == expected


def test_auto_w8a8_layouts_measured_at_one_shape_go_to_the_shorter_kernel(monkeypatch):
    """Each layout's entry divides by its own timing of XLA's dot: the kernel times decide."""
    cfg = BlockConfig(16, 32, 64, 1, False, 4, 3)
    entries = (
        tuning.TunedEntry("w8a8", 16, 64, 32, None, cfg, 10.0, 20.0),  # 2.0x on a slow baseline
        tuning.TunedEntry("w8a8_nk", 16, 64, 32, None, cfg, 8.0, 12.0),  # 1.5x, but faster
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)), WEIGHT_SPECS["int8"])
    plan, why = dispatch.plan(jnp.ones((4, 64)), w, (((1,), (0,)), ((), ())), W8A8_TOKENS, None, None, "auto")
    assert plan is not None and plan.layout == "nk", why


def test_auto_applies_the_margin_to_the_preferred_layout(monkeypatch):
    """The preferred entry first, then the margin, as for the engines of one layout: a faster
    kernel measured within the margin of XLA keeps XLA, rather than a slower kernel whose own
    (noisier) XLA timing made its speedup look larger."""
    cfg = BlockConfig(16, 32, 64, 1, False, 4, 3)
    entries = (
        tuning.TunedEntry("w8a8", 16, 64, 32, None, cfg, 100.0, 102.0),
        tuning.TunedEntry("w8a8_nk", 16, 64, 32, None, cfg, 150.0, 225.0),
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    w = qjax.quantize(jax.random.normal(jax.random.key(0), (64, 32)), WEIGHT_SPECS["int8"])
    plan, why = dispatch.plan(jnp.ones((4, 64)), w, (((1,), (0,)), ((), ())), W8A8_TOKENS, None, None, "auto")
    assert plan is None and "the preferred entry, w8a8, measured 1.02x" in why, why


def test_w8a8_transposed_weight_plan_runs_like_the_plain_one():
    w = qjax.quantize(jax.random.normal(jax.random.key(0), (256, 128)), WEIGHT_SPECS["int8"])
    x = jax.random.normal(jax.random.key(1), (4, 256), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    plan, _ = dispatch.plan(x, w, dn, W8A8_TOKENS, None, None, "interpret-gpu")
    assert plan.layout == "kn"
    run = lambda p: dispatch.run(p, x, w, W8A8_TOKENS, None, None, None, jnp.float32)
    y, y_nk = run(plan), run(dataclasses.replace(plan, layout="nk"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_nk))
    ref = quantized_dot_general(x, w, dn, lhs_spec=W8A8_TOKENS, backend="xla")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_w8a8_weight_stored_nk_runs_without_transpose(monkeypatch):
    """A W8A8 weight stored (N, K) and contracted on axis 1 (``x @ w.T``) goes to the kernel
    as it is ("nk_stored": no transpose in the program) and matches XLA; so does a
    weight-only one (the W8A16 kernel's "int8_nk")."""
    w = qjax.quantize(
        jax.random.normal(jax.random.key(0), (128, 256)), qjax.QuantSpec(qjax.int8, channel_axes=(0,))
    )
    assert jnp.shape(w.scale) == (128, 1)
    x = jax.random.normal(jax.random.key(1), (2, 3, 256), jnp.float32)
    dn = (((2,), (1,)), ((), ()))
    tokens = qjax.QuantSpec(qjax.int8, channel_axes=(0, 1))
    plan, why = dispatch.plan(x, w, dn, tokens, None, None, "interpret-gpu")
    assert plan is not None and (plan.layout, plan.k, plan.n, plan.m) == ("nk_stored", 256, 128, 6), why
    y = quantized_dot_general(x, w, dn, lhs_spec=tokens, backend="interpret-gpu")
    ref = quantized_dot_general(x, w, dn, lhs_spec=tokens, backend="xla")
    assert y.shape == (2, 3, 128)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x: dispatch.run(plan, x, w, tokens, None, None, None, jnp.float32))(x))
    assert "transpose" not in jaxpr
    plan, why = dispatch.plan(x.astype(jnp.bfloat16), w, dn, None, None, None, "interpret-gpu")
    assert (plan.kind, plan.layout) == ("w8a16", "int8_nk"), why
    # auto: only a measured stored-(N, K) entry counts, not the transposing one
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    cfg = BlockConfig(16, 32, 64, 1, False, 4, 3)
    for names, expected in [(("w8a8_nk",), None), (("w8a8_nk", "w8a8_nk_stored"), "nk_stored")]:
        entries = tuple(tuning.TunedEntry(name, 16, 256, 128, None, cfg, 10.0, 15.0) for name in names)
        monkeypatch.setattr(tuning, "load_table", lambda platform, e=entries: e)
        plan, why = dispatch.plan(x, w, dn, tokens, None, None, "auto")
        if expected is None:
            assert plan is None and "no measured speedup for w8a8_nk_stored" in why
        else:
            assert plan.layout == expected and plan.config == cfg
    # a forced kernel with no stored-(N, K) entry takes the transposing entry's config (same kernel)
    entries = (tuning.TunedEntry("w8a8_nk", 16, 256, 128, None, cfg, 10.0, 15.0),)
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    plan, _ = dispatch.plan(x, w, dn, tokens, None, None, "interpret-gpu")
    assert plan.layout == "nk_stored" and plan.config == cfg


def test_weight_stored_nk_scale_and_group_checks():
    x = jnp.ones((4, 64), jnp.float32)
    dn = (((1,), (1,)), ((), ()))
    tokens = qjax.QuantSpec(qjax.int8, channel_axes=(0,))
    per_tensor = qjax.quantize(jnp.ones((32, 64)), qjax.QuantSpec(qjax.int8))
    assert dispatch.plan(x, per_tensor, dn, tokens, None, None, "interpret-gpu")[0].layout == "nk_stored"
    wrong_axis = qjax.quantize(jnp.ones((32, 64)), qjax.QuantSpec(qjax.int8, channel_axes=(1,)))
    plan, why = dispatch.plan(x, wrong_axis, dn, tokens, None, None, "interpret-gpu")
    assert plan is None and "varies along K" in why
    grouped = qjax.quantize(
        jnp.ones((32, 64)), qjax.QuantSpec(qjax.int8, channel_axes=(0,), group_axis=1, group_size=32)
    )
    plan, why = dispatch.plan(x, grouped, dn, tokens, None, None, "interpret-gpu")
    assert plan is None and "per-channel weight" in why


NK_SPECS = {  # a weight stored (N, K) = (128, 256), as PyTorch's (out, in)
    "int4 packed along K": (qjax.QuantSpec(qjax.int4, channel_axes=(0,)), "k_pairs_nk"),
    "int4 g64 packed along N": (
        qjax.QuantSpec(qjax.int4, channel_axes=(0,), group_axis=1, group_size=64, pack_axis=0),
        "n_pairs_nk",
    ),
    "int8 g128": (qjax.QuantSpec(qjax.int8, channel_axes=(0,), group_axis=1, group_size=128), "int8_nk"),
}


@pytest.mark.parametrize("name", list(NK_SPECS))
def test_weight_only_x_at_w_transposed_runs_the_nk_kernel_in_place(name, monkeypatch):
    """``x @ w.T`` on a weight-only ``(N, K)`` weight: the transpose is folded into the
    contraction and the kernel reads the stored bytes (no transpose, no unpacking of codes
    in the program); results match XLA and float64."""
    spec, layout = NK_SPECS[name]
    w = jax.random.normal(jax.random.key(0), (128, 256))
    x = jax.random.normal(jax.random.key(1), (3, 5, 256), jnp.bfloat16)
    pol = qjax.Policy([qjax.Rule("w", weight=spec)])
    qp = qjax.quantize_params({"w": w}, pol)
    f = lambda p, x: x @ p["w"].T
    g = jax.jit(qjax.quantized(f, pol, backend="interpret-gpu"))
    y = g(qp, x).astype(jnp.float32)
    ref = qjax.quantized(f, pol, backend="xla")(qp, x).astype(jnp.float32)
    assert y.shape == (3, 5, 128)
    np.testing.assert_allclose(y, ref, atol=1e-2 * float(jnp.max(jnp.abs(ref))))
    exact = np.asarray(x, np.float64) @ np.asarray(qp["w"].dequantize(), np.float64).T
    np.testing.assert_allclose(y, exact, atol=1e-2 * np.abs(exact).max())
    jaxpr = str(jax.make_jaxpr(g)(qp, x))
    assert f"qjax_w{4 if 'int4' in name else 8}a16_{layout}" in jaxpr
    # no integer transpose, and no integer array larger than the stored bytes (unpacked codes)
    assert not re.search(r"[ui]\d+\[[\d,]+\] = transpose", jaxpr)
    found = re.findall(r"[ui]\d+\[([\d,]+)\] =", jaxpr)
    sizes = [np.prod([int(d) for d in dims.split(",")]) for dims in found]
    assert max(sizes) <= qp["w"].values.size, sorted(sizes)[-3:]
    # the TPU kernel reads it in place as well, with groups of whole K tiles (128 lanes)
    if spec.group_size is not None and spec.group_size < 128:
        with pytest.raises(ValueError, match=r"group_size=64 must be a multiple of config\.block_k"):
            qjax.quantized(f, pol, backend="interpret-tpu")(qp, x)
    else:
        y_tpu = qjax.quantized(f, pol, backend="interpret-tpu")(qp, x).astype(jnp.float32)
        np.testing.assert_allclose(y_tpu, exact, atol=1e-2 * np.abs(exact).max())
    # auto: an entry measured for this stored layout is taken (triton engine only)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    kind = "w8a16" if layout == "int8_nk" else "w4a16"
    cfg = BlockConfig(16, 64, 64, 1, True, 4, 3)
    entries = (
        tuning.TunedEntry(tuning.kernel_name(kind, layout), 16, 256, 128, spec.group_size, cfg, 10.0, 15.0),
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    plan, why = dispatch.plan(x.reshape(15, 256), qp["w"], (((1,), (1,)), ((), ())), None, None, None, "auto")
    assert plan is not None and (plan.kind, plan.layout, plan.config) == (kind, layout, cfg), why
    assert tuning.kernel_name(kind, layout) != tuning.kernel_name(kind, layout.removesuffix("_nk"))
