"""Hidden-dimension pruning across LayerNorm / RMSNorm (``inexact_norms=True``), as
Torch-Pruning prunes a transformer's width: the shrunk model is the model whose norms run
over the kept channels only, checked against a float64 NumPy forward of hand-sliced params."""

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from qjax.graph import nnx_apply
from qjax.graph.coupling import channel_groups, format_groups
from qjax.prune.masks import apply_masks
from qjax.prune.rebuild import linen_apply, shrink_nnx
from qjax.prune.shrink import shrink

from .test_shrink import _col_mask, _rand

D, HIDDEN, EPS = 16, 24, 1e-6


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        y = nn.Dense(HIDDEN)(nn.LayerNorm(epsilon=EPS)(h))
        return h + nn.Dense(h.shape[-1])(nn.gelu(y, approximate=True))


class Net(nn.Module):
    width: int = D

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width)(x)
        for _ in range(2):
            h = Block()(h)
        return nn.Dense(5)(nn.RMSNorm(epsilon=EPS)(h))


def _reference(p, x, keep):
    """The net in float64 with the hidden channels ``keep`` only (params sliced by hand)."""
    a = lambda t: np.asarray(t, np.float64)
    k = np.asarray(keep)
    h = a(x) @ a(p["Dense_0"]["kernel"])[:, k] + a(p["Dense_0"]["bias"])[k]
    for i in range(2):
        b = p[f"Block_{i}"]
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        y = (h - mu) / np.sqrt(var + EPS) * a(b["LayerNorm_0"]["scale"])[k] + a(b["LayerNorm_0"]["bias"])[k]
        y = y @ a(b["Dense_0"]["kernel"])[k] + a(b["Dense_0"]["bias"])
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        h = h + y @ a(b["Dense_1"]["kernel"])[:, k] + a(b["Dense_1"]["bias"])[k]
    h = h / np.sqrt((h**2).mean(-1, keepdims=True) + EPS) * a(p["RMSNorm_0"]["scale"])[k]
    return h @ a(p["Dense_1"]["kernel"])[k] + a(p["Dense_1"]["bias"])


def _net():
    model, x = Net(), _rand(0, 3, 7, 8)
    v = model.init(jax.random.key(1), x)
    # norms with their own scales and biases, so a wrong slice shows
    v = jax.tree_util.tree_map_with_path(
        lambda path, t: t + 0.3 * _rand(len(str(path)), *t.shape) if "Norm" in str(path) else t, v
    )
    return model, v, x


def _width_group(groups):
    (g,) = [g for g in groups if ("params/Dense_0/kernel", 1) in {(m.path, m.axis) for m in g.members}]
    return g


def test_the_hidden_width_is_blocked_by_default_and_inexact_on_request():
    model, v, x = _net()
    g = _width_group(channel_groups(model.apply, v, x))
    assert not g.prunable and "reduce_sum" in g.reason and g.inexact == ()
    g = _width_group(channel_groups(model.apply, v, x, inexact_norms=True))
    assert g.prunable and g.reasons == () and "reduce_sum" in g.inexact[0]
    members = {(m.path, m.axis) for m in g.members}
    for i in range(2):
        for leaf in ("LayerNorm_0/scale", "LayerNorm_0/bias", "Dense_1/bias"):
            assert (f"params/Block_{i}/{leaf}", 0) in members
        assert (f"params/Block_{i}/Dense_0/kernel", 0) in members
        assert (f"params/Block_{i}/Dense_1/kernel", 1) in members
    assert {("params/RMSNorm_0/scale", 0), ("params/Dense_1/kernel", 0)} <= members
    assert (
        "(inexact: summed over by reduce_sum in Net/Block_0/LayerNorm_0 (normalization.py:"
        in format_groups([g])
    )
    assert [n.split(" (")[0] for n in g.inexact] == [  # one note per module, naming it
        f"summed over by reduce_sum in Net/{m}"
        for m in ("Block_0/LayerNorm_0", "Block_1/LayerNorm_0", "RMSNorm_0")
    ]
    # the MLP's hidden layer has no norm: still exact
    inner = [
        g
        for g in channel_groups(model.apply, v, x, inexact_norms=True)
        if "Block_0/Dense_0/kernel:1" in g.name
    ]
    assert inner[0].prunable and inner[0].inexact == ()


def test_inexact_norms_do_not_admit_a_softmax_over_channels():
    p = {"w": _rand(1, 8, 6)}
    f = lambda p, x: jax.nn.softmax(x @ p["w"], axis=-1) @ p["w"].T
    (g,) = [g for g in channel_groups(f, p, _rand(2, 4, 8), inexact_norms=True) if g.name == "w:1"]
    assert not g.prunable and "reduce_max" in g.reason


def test_shrunk_width_is_the_model_with_norms_over_the_kept_channels():
    model, v, x = _net()
    dead = [2, 5, 11]
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Dense_0"]["kernel"] = _col_mask((8, D), dead)
    small, plan = shrink(model.apply, v, masks, x, inexact_norms=True)
    keep = [i for i in range(D) if i not in dead]
    assert small["params"]["Block_1"]["LayerNorm_0"]["scale"].shape == (D - 3,)
    assert small["params"]["Block_0"]["Dense_0"]["kernel"].shape == (D - 3, HIDDEN)
    got = jax.jit(linen_apply(model, plan=plan))(small, x)
    want = _reference(v["params"], x, keep)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # and it is not the masked model: the norms saw the zeros there (the documented approximation)
    masked = model.apply(apply_masks(v, plan.group_masks(v)), x)
    assert np.max(np.abs(np.asarray(masked) - want)) > 1e-3
    # without the option the width is left alone, and the plan says why
    small2, plan2 = shrink(model.apply, v, masks, x)
    assert small2["params"]["Dense_0"]["kernel"].shape == (8, D)
    assert any("reduce_sum" in why for _, why in plan2.skipped)


def test_nnx_transformer_width_shrinks_with_its_norms():
    class Net2(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(8, D, rngs=rngs)
            self.ln = nnx.LayerNorm(D, epsilon=EPS, rngs=rngs)
            self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
            self.down = nnx.Linear(HIDDEN, D, rngs=rngs)
            self.rms = nnx.RMSNorm(D, epsilon=EPS, rngs=rngs)
            self.out = nnx.Linear(D, 5, rngs=rngs)

        def __call__(self, x):
            h = self.inp(x)
            h = h + self.down(jax.nn.relu(self.up(self.ln(h))))
            return self.out(self.rms(h))

    model, x = Net2(nnx.Rngs(0)), _rand(3, 4, 8)
    model.ln.scale[...] = _rand(4, D)
    model.ln.bias[...] = _rand(5, D)
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["inp"]["kernel"] = _col_mask((8, D), [0, 7])
    _, plan = shrink(nnx_apply(graphdef), state, masks, x)
    assert plan.groups == () and plan.skipped  # nothing shrinks without the option
    _, plan = shrink(nnx_apply(graphdef), state, masks, x, inexact_norms=True)
    k = np.array([i for i in range(D) if i not in (0, 7)])
    a = lambda t: np.asarray(t, np.float64)
    h = a(x) @ a(model.inp.kernel[...])[:, k] + a(model.inp.bias[...])[k]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    y = (h - mu) / np.sqrt(var + EPS) * a(model.ln.scale[...])[k] + a(model.ln.bias[...])[k]
    y = np.maximum(y @ a(model.up.kernel[...])[k] + a(model.up.bias[...]), 0)
    h = h + y @ a(model.down.kernel[...])[:, k] + a(model.down.bias[...])[k]
    h = h / np.sqrt((h**2).mean(-1, keepdims=True) + EPS) * a(model.rms.scale[...])[k]
    want = h @ a(model.out.kernel[...])[k] + a(model.out.bias[...])
    shrink_nnx(model, plan)
    assert model.ln.num_features == D - 2 and model.rms.num_features == D - 2
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-4, atol=1e-4)


class LM(nn.Module):
    """Embedding (tied head), pre-LN attention with Flax's default qkv_features (the input
    width) and an MLP: the width a Torch-Pruning user prunes."""

    width: int = D
    qkv: int | None = None

    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(11, self.width)
        h = emb(tok)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.qkv)(nn.LayerNorm()(h))
        h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(HIDDEN)(nn.RMSNorm()(h))))
        return emb.attend(nn.LayerNorm()(h))


def _slice_width(p, k):
    """The LM's params with only the width channels ``k``, sliced by hand."""
    p = jax.tree.map(np.asarray, p)
    att = p["MultiHeadDotProductAttention_0"]
    out = {
        "Embed_0": {"embedding": p["Embed_0"]["embedding"][:, k]},
        "MultiHeadDotProductAttention_0": {
            **{n: {"kernel": att[n]["kernel"][k], "bias": att[n]["bias"]} for n in ("query", "key", "value")},
            "out": {"kernel": att["out"]["kernel"][..., k], "bias": att["out"]["bias"][k]},
        },
        # the outer Dense (back to the width) is built first: Dense_0; the inner one Dense_1
        "Dense_0": {"kernel": p["Dense_0"]["kernel"][:, k], "bias": p["Dense_0"]["bias"][k]},
        "Dense_1": {"kernel": p["Dense_1"]["kernel"][k], "bias": p["Dense_1"]["bias"]},
        "RMSNorm_0": {"scale": p["RMSNorm_0"]["scale"][k]},
    }
    for n in ("LayerNorm_0", "LayerNorm_1"):
        out[n] = {"scale": p[n]["scale"][k], "bias": p[n]["bias"][k]}
    return out


def test_a_language_models_width_shrinks_through_embedding_attention_and_norms():
    model, tok = LM(), jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
    v = model.init(jax.random.key(1), tok)
    v = jax.tree_util.tree_map_with_path(
        lambda path, t: t + 0.3 * _rand(len(str(path)), *t.shape) if "Norm" in str(path) else t, v
    )
    groups = channel_groups(model.apply, v, tok, inexact_norms=True)
    (g,) = [g for g in groups if ("params/Embed_0/embedding", 1) in {(m.path, m.axis) for m in g.members}]
    assert g.prunable  # the embedding lookup (a gather) passes the width through
    dead = [1, 4, 9]
    masks = jax.tree.map(lambda a: None, v)
    masks["params"]["Embed_0"]["embedding"] = _col_mask((11, D), dead)
    small, plan = shrink(model.apply, v, masks, tok, inexact_norms=True)
    assert plan.summary()["inexact"] == 1 and plan.groups[0].inexact == g.inexact
    assert type(plan).from_json(plan.to_json()) == plan
    keep = [i for i in range(D) if i not in dead]
    # the reference: Flax's own layers configured for 13 channels, with the params sliced by hand
    want = LM(width=D - 3, qkv=D).apply({"params": _slice_width(v["params"], keep)}, tok)
    got = jax.jit(linen_apply(model, plan=plan))(small, tok)  # 13 channels, 2 heads: qkv_features restored
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_nnx_language_model_width_shrinks_with_embedding_and_attention():
    class NnxLM(nnx.Module):
        def __init__(self, width, rngs):
            self.emb = nnx.Embed(11, width, rngs=rngs)
            self.ln = nnx.LayerNorm(width, rngs=rngs)
            self.att = nnx.MultiHeadAttention(2, width, qkv_features=D, decode=False, rngs=rngs)
            self.rms = nnx.RMSNorm(width, rngs=rngs)

        def __call__(self, tok):
            h = self.emb(tok)
            h = h + self.att(self.ln(h))
            return self.emb.attend(self.rms(h))

    model, tok = NnxLM(D, nnx.Rngs(0)), jax.random.randint(jax.random.key(2), (2, 5), 0, 11)
    model.ln.bias[...] = _rand(7, D)
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["emb"]["embedding"] = _col_mask((11, D), [0, 5, 6])
    _, plan = shrink(nnx_apply(graphdef), state, masks, tok, inexact_norms=True)
    k = np.array([i for i in range(D) if i not in (0, 5, 6)])
    ref = NnxLM(D - 3, nnx.Rngs(1))
    ref.emb.embedding[...] = model.emb.embedding[...][:, k]
    for norm in ("ln", "rms"):
        for leaf in ("scale", "bias"):
            if hasattr(getattr(ref, norm), leaf) and getattr(getattr(ref, norm), leaf) is not None:
                getattr(getattr(ref, norm), leaf)[...] = getattr(getattr(model, norm), leaf)[...][k]
    for n in ("query", "key", "value"):
        getattr(ref.att, n).kernel[...] = getattr(model.att, n).kernel[...][k]
        getattr(ref.att, n).bias[...] = getattr(model.att, n).bias[...]
    ref.att.out.kernel[...] = model.att.out.kernel[...][..., k]
    ref.att.out.bias[...] = model.att.out.bias[...][k]
    want = ref(tok)
    shrink_nnx(model, plan)
    assert (model.att.in_features, model.att.out_features, model.emb.features) == (D - 3, D - 3, D - 3)
    np.testing.assert_allclose(np.asarray(model(tok)), np.asarray(want), rtol=2e-5, atol=2e-5)
