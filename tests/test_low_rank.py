"""LoRA as a function transform (``qjax.lora``, ``lora_adapters``, ``merge_lora``), checked
against float64 numpy references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qjax

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 16)).astype(np.float32)
P = {
    "w1": RNG.standard_normal((16, 12)).astype(np.float32) / 4,
    "w2": RNG.standard_normal((12, 5)).astype(np.float32) / 4,
}
ALPHA = 3.0


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _random(adapters, scale=0.3, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape).astype(np.float32)), adapters
    )


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _mlp_reference(p, ad, x, alpha=ALPHA):
    """float64 numpy: x @ W + alpha/r * (x @ A) @ B per layer."""
    p, ad, x = _np(p), _np(ad), np.asarray(x, np.float64)

    def layer(h, name):
        a, b = ad[name]["a"], ad[name]["b"]
        return h @ p[name] + alpha / a.shape[-1] * (h @ a) @ b

    return layer(np.tanh(layer(x, "w1")), "w2")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(12)(x))
        return nn.Dense(5)(h)


def test_initial_output_equals_f_exactly_and_adapter_shapes():
    v = jax.jit(MLP().init)(jax.random.key(0), X)
    ad = qjax.lora_adapters(MLP().apply, [(r".*/bias", None), (r".*/kernel", 4)], jax.random.key(1), v, X)
    assert {k: (a["a"].shape, a["b"].shape) for k, a in ad.items()} == {
        "params/Dense_0/kernel": ((16, 4), (4, 12)),
        "params/Dense_1/kernel": ((12, 4), (4, 5)),
    }
    a = np.asarray(ad["params/Dense_0/kernel"]["a"])
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(16) and not np.any(np.asarray(ad["params/Dense_0/kernel"]["b"]))
    y = jax.jit(qjax.lora(MLP().apply, alpha=8.0))(v, ad, X)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(MLP().apply)(v, X)))


def test_adapted_output_matches_float64_reference():
    ad = _random(qjax.lora_adapters(mlp, [("w.", 3)], jax.random.key(0), P, X))
    y = jax.jit(qjax.lora(mlp, alpha=ALPHA))(P, ad, X)
    np.testing.assert_allclose(np.asarray(y), _mlp_reference(P, ad, X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, wshape, shapes",
    [
        ("btd,dhk->bthk", (16, 3, 4), ((16, 2), (2, 3, 4))),  # attention q/k/v kernel
        ("bthk,hkd->btd", (3, 4, 16), ((3, 4, 2), (2, 16))),  # attention output kernel
        ("dn,btd->nbt", (16, 5), ((16, 2), (2, 5))),  # weight as the left operand
        ("ebd,edf->ebf", (3, 16, 5), ((3, 16, 2), (3, 2, 5))),  # one adapter per expert
    ],
)
def test_einsum_layouts_match_float64_reference(spec, wshape, shapes):
    x_spec, w_spec = (s for s in spec.split("->")[0].split(","))
    if spec.startswith("dn"):
        x_spec, w_spec = w_spec, x_spec
    x_shape = tuple({"b": 3, "t": 2, "d": 16, "h": 3, "k": 4, "e": 3}[c] for c in x_spec)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    p = {"w": RNG.standard_normal(wshape).astype(np.float32)}

    def f(p, x):
        return jnp.einsum(spec, p["w"], x) if spec.startswith("dn") else jnp.einsum(spec, x, p["w"])

    ad = qjax.lora_adapters(f, [("w", 2)], jax.random.key(0), p, x)
    assert (ad["w"]["a"].shape, ad["w"]["b"].shape) == shapes
    ad = _random(ad)
    y = qjax.lora(f, alpha=ALPHA)(p, ad, x)
    a, b = _np(ad["w"]).values()
    nb = a.ndim + b.ndim - 2 - len(wshape)
    delta = (
        np.einsum("eKr,erN->eKN", a.reshape(3, -1, 2), b.reshape(3, 2, -1))
        if nb
        else a.reshape(-1, 2) @ b.reshape(2, -1)
    )
    merged = np.asarray(p["w"], np.float64) + ALPHA / 2 * delta.reshape(wshape)
    ref = np.einsum(spec, merged, x) if spec.startswith("dn") else np.einsum(spec, np.float64(x), merged)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    merged_q = qjax.merge_lora(p, ad, alpha=ALPHA)
    np.testing.assert_allclose(np.asarray(merged_q["w"]), merged, rtol=1e-6, atol=1e-6)


def test_gradients_wrt_adapters_match_float64_analytic():
    p = {"w": P["w1"]}
    f = lambda p, x: x @ p["w"]
    ad = _random(qjax.lora_adapters(f, [("w", 3)], jax.random.key(0), p, X))
    g = jax.jit(jax.grad(lambda ad, x: jnp.sum(qjax.lora(f, alpha=ALPHA)(p, ad, x) ** 2)))(ad, X)
    x, w, a, b, s = np.float64(X), np.float64(p["w"]), *_np(ad["w"]).values(), ALPHA / 3
    dy = 2 * (x @ w + s * (x @ a) @ b)
    np.testing.assert_allclose(np.asarray(g["w"]["a"]), s * x.T @ dy @ b.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g["w"]["b"]), s * (x @ a).T @ dy, rtol=1e-4, atol=1e-4)


def test_gradients_through_two_layers_match_finite_differences():
    ad = _random(qjax.lora_adapters(mlp, [("w.", 2)], jax.random.key(0), P, X))
    g = jax.jit(jax.grad(lambda ad: jnp.sum(qjax.lora(mlp, alpha=ALPHA)(P, ad, X) ** 2)))(ad)
    base = _np(ad)
    eps = 1e-6
    for name, part, idx in [("w1", "a", (3, 1)), ("w1", "b", (0, 7)), ("w2", "a", (5, 0))]:
        hi, lo = jax.tree.map(np.copy, base), jax.tree.map(np.copy, base)
        hi[name][part][idx] += eps
        lo[name][part][idx] -= eps
        fd = (np.sum(_mlp_reference(P, hi, X) ** 2) - np.sum(_mlp_reference(P, lo, X) ** 2)) / (2 * eps)
        np.testing.assert_allclose(float(g[name][part][idx]), fd, rtol=1e-4, atol=1e-4)


INT4 = qjax.Policy(
    [qjax.Rule("w.", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=4, group_axis=0))]
)


def _qlora_setup():
    qp = jax.jit(lambda p: qjax.quantize_params(p, INT4))(P)
    ad = _random(qjax.lora_adapters(mlp, [("w.", 3)], jax.random.key(0), P, X))
    return qp, ad, qjax.quantized(qjax.lora(mlp, alpha=ALPHA), INT4, backend="xla")


def test_qlora_int4_base_matches_dequantized_reference():
    qp, ad, qlora = _qlora_setup()
    assert all(qjax.is_qarray(qp[k]) for k in qp)
    np.testing.assert_allclose(
        np.asarray(jax.jit(qlora)(qp, ad, X)),
        _mlp_reference(jax.jit(qjax.dequantize_params)(qp), ad, X),
        rtol=1e-5,
        atol=1e-5,
    )
    # the base matmuls are the quantized transform's, on the int4 leaves
    report = qjax.dispatch_report(qjax.lora(mlp, alpha=ALPHA), INT4, backend="xla")(qp, ad, X)
    assert [r.path for r in report] == ["w1", "w2"] and all(r.quantized for r in report)
    # the other order would quantize W + A @ B: refused, pointing at the right one
    with pytest.raises(ValueError, match=r"qjax.quantized\(qjax.lora"):
        jax.eval_shape(qjax.lora(qjax.quantized(mlp, INT4, backend="xla"), alpha=ALPHA), qp, ad, X)


def test_qlora_gradients_match_dequantized_reference():
    qp, ad, qlora = _qlora_setup()
    g = jax.jit(jax.grad(lambda ad: jnp.sum(qlora(qp, ad, X) ** 2)))(ad)
    deq = jax.jit(qjax.dequantize_params)(qp)
    g_ref = jax.jit(jax.grad(lambda ad: jnp.sum(qjax.lora(mlp, alpha=ALPHA)(deq, ad, X) ** 2)))(ad)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), g, g_ref)


def test_fake_quantized_composition_is_qat_of_the_base_only():
    ad = _random(qjax.lora_adapters(mlp, [("w.", 3)], jax.random.key(0), P, X))
    y = qjax.fake_quantized(qjax.lora(mlp, alpha=ALPHA), INT4)(P, ad, X)
    ref = _mlp_reference(qjax.fake_quant_params(P, INT4), ad, X)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_merge_lora_equals_adapted_function():
    v = jax.jit(MLP().init)(jax.random.key(0), X)
    ad = _random(qjax.lora_adapters(MLP().apply, [(r".*/kernel", 4)], jax.random.key(1), v, X))
    merged = qjax.merge_lora(v, ad, alpha=8.0)
    y = qjax.lora(MLP().apply, alpha=8.0)(v, ad, X)
    np.testing.assert_allclose(np.asarray(MLP().apply(merged, X)), np.asarray(y), rtol=1e-5, atol=1e-5)
    w, (a, b) = np.float64(v["params"]["Dense_0"]["kernel"]), _np(ad["params/Dense_0/kernel"]).values()
    np.testing.assert_allclose(
        np.asarray(merged["params"]["Dense_0"]["kernel"]), w + 2.0 * a @ b, rtol=1e-6, atol=1e-7
    )
    assert merged["params"]["Dense_0"]["bias"] is v["params"]["Dense_0"]["bias"]
    with pytest.raises(ValueError, match=r"'w1'.*quantize"):
        qjax.merge_lora(qjax.quantize_params(P, INT4), {"w1": ad["params/Dense_0/kernel"]}, alpha=1.0)


def test_other_reads_of_an_adapted_leaf_see_the_merged_weight():
    def f(p, x):  # a tied weight: a matmul and an elementwise read
        return x @ p["w1"] + jnp.sum(p["w1"], axis=0)

    ad = _random(qjax.lora_adapters(f, [("w1", 2)], jax.random.key(0), P, X))
    y = qjax.lora(f, alpha=ALPHA)(P, ad, X)
    merged = qjax.merge_lora(P, ad, alpha=ALPHA)
    np.testing.assert_allclose(np.asarray(y), np.asarray(f(merged, X)), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(16)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
        return x


def test_nn_scan_stack_gets_per_layer_adapters():
    v = jax.jit(Stack().init)(jax.random.key(0), X)
    ad = qjax.lora_adapters(Stack().apply, [(r".*/kernel", 2)], jax.random.key(1), v, X)
    path = "params/ScanBlock_0/Dense_0/kernel"
    assert (ad[path]["a"].shape, ad[path]["b"].shape) == ((3, 16, 2), (3, 2, 16))
    ad = _random(ad)
    y = jax.jit(qjax.lora(Stack().apply, alpha=ALPHA))(v, ad, X)
    layer = _np(v["params"]["ScanBlock_0"]["Dense_0"])
    a, b = _np(ad[path]).values()
    h = np.float64(X)
    for i in range(3):  # float64 numpy, layer by layer
        h = np.tanh(h @ layer["kernel"][i] + layer["bias"][i] + ALPHA / 2 * (h @ a[i]) @ b[i])
    np.testing.assert_allclose(np.asarray(y), h, rtol=1e-5, atol=1e-5)
    merged = qjax.merge_lora(v, ad, alpha=ALPHA)
    np.testing.assert_allclose(np.asarray(jax.jit(Stack().apply)(merged, X)), h, rtol=1e-5, atol=1e-5)


def test_errors_name_the_pattern_or_leaf():
    with pytest.raises(ValueError, match=re.escape("'nope.*'")):
        qjax.lora_adapters(mlp, [("w1", 2), ("nope.*", 2)], jax.random.key(0), P, X)
    with pytest.raises(ValueError, match="rank"):
        qjax.lora_adapters(mlp, [("w.", 0)], jax.random.key(0), P, X)
    reshaped = lambda p, x: jnp.einsum("bij,ijn->bn", x.reshape(-1, 4, 4), p["w1"].reshape(4, 4, 12))
    with pytest.raises(ValueError, match=r"'w1'.*stored layout or transposed.*reshape"):
        qjax.lora_adapters(reshaped, [("w1", 2)], jax.random.key(0), P, X)
    with pytest.raises(ValueError, match=r"'w'.*batches over leaf axes \[1\]"):  # batch axis not leading
        qjax.lora_adapters(
            lambda p, x: jnp.einsum("ebk,kef->ebf", x, p["w"]),
            [("w", 2)],
            jax.random.key(0),
            {"w": jnp.ones((16, 3, 4))},
            jnp.ones((3, 2, 16)),
        )
    ambiguous = lambda p, x: jnp.einsum("bhk,nhk->bn", x.reshape(-1, 2, 8), p["w"])  # (N, H, K) = (8, 2, 8)
    with pytest.raises(ValueError, match=r"rank 8: its adapters' shapes \(8, 2, 8\), \(8, 8\) would fit"):
        qjax.lora_adapters(ambiguous, [("w", 8)], jax.random.key(0), {"w": jnp.ones((8, 2, 8))}, X)
    with pytest.raises(ValueError, match=r"rank 16: its adapters' shapes .* would fit the other layout"):
        qjax.lora_adapters(
            lambda p, x: x @ p["w"].T, [("w", 16)], jax.random.key(0), {"w": jnp.ones((16, 16))}, X
        )
    conv = lambda p, x: jax.lax.conv(x, p["k"], (1, 1), "SAME")
    with pytest.raises(ValueError, match=r"'k'.*conv_general_dilated"):
        qjax.lora_adapters(
            conv, [("k", 2)], jax.random.key(0), {"k": jnp.ones((4, 3, 3, 3))}, jnp.ones((1, 3, 8, 8))
        )
    ad = qjax.lora_adapters(mlp, [("w1", 2)], jax.random.key(0), P, X)
    with pytest.raises(ValueError, match="'w9'"):
        qjax.lora(mlp, alpha=1.0)(P, {"w9": ad["w1"]}, X)
    with pytest.raises(ValueError, match=r"'w2'.*expected a=\(12, 2\)"):
        qjax.lora(mlp, alpha=1.0)(P, {"w2": ad["w1"]}, X)


def _torch_reference(w, a, b, x, alpha):
    """float64: PyTorch-layout ``w`` (N, K) with PEFT's ``A (r, K)``, ``B (N, r)``:
    ``x @ (W + alpha/r · B @ A)ᵀ``."""
    w, a, b, x = (np.asarray(t, np.float64) for t in (w, a, b, x))
    return x @ (w + alpha / a.shape[0] * b @ a).T


@pytest.mark.parametrize(
    "read",
    [lambda w, x: x @ w.T, lambda w, x: jnp.einsum("bk,nk->bn", x, w), lambda w, x: jax.lax.dot(x, w.T)],
    ids=["x @ w.T", "einsum bk,nk", "lax.dot"],
)
def test_pytorch_layout_weights_get_peft_adapters(read):
    w = {"w": jnp.asarray(P["w1"].T)}  # (N, K) = (12, 16)
    f = lambda p, x: jnp.tanh(read(p["w"], x))
    ad = qjax.lora_adapters(f, [("w", 3)], jax.random.key(0), w, X)
    assert (ad["w"]["a"].shape, ad["w"]["b"].shape) == ((3, 16), (12, 3))  # PEFT's lora_A, lora_B
    assert float(jnp.abs(ad["w"]["b"]).max()) == 0.0
    ad = _random(ad)
    got = qjax.lora(f, alpha=ALPHA)(w, ad, X)
    want = np.tanh(_torch_reference(w["w"], ad["w"]["a"], ad["w"]["b"], X, ALPHA))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    merged = qjax.merge_lora(w, ad, alpha=ALPHA)
    np.testing.assert_allclose(np.asarray(f(merged, X)), want, rtol=1e-5, atol=1e-5)
    # adapters train: the gradient reaches both
    g = jax.grad(lambda ad: qjax.lora(f, alpha=ALPHA)(w, ad, X).sum())(ad)
    assert float(jnp.abs(g["w"]["a"]).max()) > 0 and float(jnp.abs(g["w"]["b"]).max()) > 0


def test_a_tied_embedding_adapts_its_lookup_and_its_head():
    # an LM's tied head reads the (V, D) table transposed; the lookup (a gather) sees the merged table
    emb = {"emb": jnp.asarray(RNG.standard_normal((11, 8)).astype(np.float32))}
    tokens = jnp.asarray([[1, 5, 7], [0, 10, 3]])
    f = lambda p, t: jnp.take(p["emb"], t, axis=0) @ p["emb"].T
    ad = _random(qjax.lora_adapters(f, [("emb", 2)], jax.random.key(1), emb, tokens))
    assert (ad["emb"]["a"].shape, ad["emb"]["b"].shape) == ((2, 8), (11, 2))
    got = qjax.lora(f, alpha=ALPHA)(emb, ad, tokens)
    e = np.asarray(emb["emb"], np.float64)
    merged = e + ALPHA / 2 * np.asarray(ad["emb"]["b"], np.float64) @ np.asarray(ad["emb"]["a"], np.float64)
    want = merged[np.asarray(tokens)] @ merged.T
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_a_stacked_pytorch_layout_weight_and_qlora():
    # (L, N, K) read per layer as x @ w[l].T in a scan; QLoRA with an int8 base
    w = {"w": jnp.asarray(RNG.standard_normal((2, 16, 16)).astype(np.float32) / 4)}

    def f(p, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl.T), None), x, p["w"])[0]

    ad = _random(qjax.lora_adapters(f, [("w", 4)], jax.random.key(2), w, X))
    assert (ad["w"]["a"].shape, ad["w"]["b"].shape) == ((2, 4, 16), (2, 16, 4))
    h = np.asarray(X, np.float64)
    for layer in range(2):
        h = np.tanh(_torch_reference(w["w"][layer], ad["w"]["a"][layer], ad["w"]["b"][layer], h, ALPHA))
    np.testing.assert_allclose(np.asarray(qjax.lora(f, alpha=ALPHA)(w, ad, X)), h, rtol=1e-5, atol=1e-5)
    policy = qjax.Policy([qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, 1)))])
    qw = qjax.quantize_params(w, policy)
    q = qjax.quantized(qjax.lora(f, alpha=ALPHA), policy)(qw, ad, X)
    base = qjax.dequantize_params(qw)
    np.testing.assert_allclose(np.asarray(q), np.asarray(qjax.lora(f, alpha=ALPHA)(base, ad, X)), atol=1e-4)
