"""Benchmark models shared by qjax and its peers (Qwix, AQT): Flax Linen definitions.

Two workloads:

* ``MLP``: a 3-layer MLP, 1024 -> 1024 -> 1024 -> 1024 (``nn.Dense``, relu between the
  layers, the last layer linear), float32.
* ``EncoderBlock``: one post-LayerNorm transformer encoder layer shaped like MiniLM's
  (BERT-style): d_model 384, 6 heads of 64, MLP 1536 with gelu, sequence length 128.
  It is written the way real Flax models are: the query/key/value projections are
  ``nn.DenseGeneral`` to ``(heads, head_dim)``, the attention output projection is an
  ``einsum`` against a ``(heads, head_dim, d_model)`` kernel parameter (as Gemma/MaxText
  do), the attention scores and the weighted sum of values are activation x activation
  ``jnp.einsum`` calls, and the MLP is two ``nn.Dense``.

Both modules are plain Linen modules, so Qwix's ``quantize_model`` (which intercepts
``jax.lax.dot_general`` / ``jnp.einsum`` inside module calls) needs no change to them. For
AQT, which is injected, every weight matmul accepts an injected implementation:

* ``dot_general_cls``: passed to every ``nn.Dense`` / ``nn.DenseGeneral`` as
  ``dot_general_cls=`` (e.g. ``functools.partial(aqt_flax.AqtDotGeneral, cfg)``);
* ``einsum_cls``: a zero-argument factory of a Linen module called like ``jnp.einsum``
  (``einsum(eqn, lhs, rhs)``), used for the weight einsum of the attention output
  projection (e.g. ``functools.partial(aqt_flax.AqtEinsum, cfg)``).

With both left ``None`` the modules compute in float with ``jax.lax.dot_general`` and
``jnp.einsum`` (looked up at call time, so interception sees them).

The activation x activation einsums of attention (``scores`` and ``context``) are kept in
a separate submodule named ``attention_core`` so that quantization rules can tell them
apart from the weight matmuls by module path (Qwix rules match a module-path regex).

Helpers: ``make_workload(name, batch)`` builds the module, float params (fixed seed) and an
input batch; ``init_params`` / ``make_inputs`` do the two halves separately.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PARAM_SEED = 0
INPUT_SEED = 1

MLP_WIDTH = 1024
D_MODEL = 384
NUM_HEADS = 6
MLP_DIM = 1536
SEQ_LEN = 128


class MLP(nn.Module):
    """``features[i]``-wide ``nn.Dense`` layers with relu between them (last one linear)."""

    features: Sequence[int] = (MLP_WIDTH, MLP_WIDTH, MLP_WIDTH)
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = nn.Dense(f, dot_general_cls=self.dot_general_cls, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class EinsumDense(nn.Module):
    """``einsum(eqn, x, kernel) + bias`` with a kernel parameter of ``kernel_shape``.

    ``einsum_cls`` (a factory of a module called like ``jnp.einsum``) replaces the einsum,
    e.g. by AQT's ``AqtEinsum``; by default ``jnp.einsum`` is called.
    """

    eqn: str
    kernel_shape: Sequence[int]
    bias_shape: Sequence[int]
    einsum_cls: Callable[[], Any] | None = None
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, tuple(self.kernel_shape), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), tuple(self.bias_shape), jnp.float32)
        if self.einsum_cls is None:
            y = jnp.einsum(self.eqn, x, kernel)
        else:
            y = self.einsum_cls()(self.eqn, x, kernel)
        return y + bias


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v over ``[batch, seq, heads, head_dim]`` (no weights)."""

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None):
        q = q / math.sqrt(q.shape[-1])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        if mask is not None:  # [batch, key] with 1 = attend
            scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class EncoderBlock(nn.Module):
    """A MiniLM/BERT-style post-LN encoder layer (self-attention + gelu MLP)."""

    d_model: int = D_MODEL
    num_heads: int = NUM_HEADS
    mlp_dim: int = MLP_DIM
    dot_general_cls: Any = None
    einsum_cls: Callable[[], Any] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = self.num_heads
        dh = self.d_model // h
        proj = lambda name: nn.DenseGeneral((h, dh), axis=-1, dot_general_cls=self.dot_general_cls, name=name)
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        ctx = AttentionCore(name="attention_core")(q, k, v, mask)
        attn = EinsumDense(
            "bqhd,hdm->bqm",
            (h, dh, self.d_model),
            (self.d_model,),
            einsum_cls=self.einsum_cls,
            name="attention_out",
        )(ctx)
        x = nn.LayerNorm(epsilon=1e-12, name="attention_ln")(x + attn)
        y = nn.Dense(self.mlp_dim, dot_general_cls=self.dot_general_cls, name="mlp_in")(x)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.d_model, dot_general_cls=self.dot_general_cls, name="mlp_out")(y)
        return nn.LayerNorm(epsilon=1e-12, name="output_ln")(x + y)


# -- workloads ----------------------------------------------------------------------------

MODEL_NAMES = ("mlp", "encoder")


def make_model(name: str, *, dot_general_cls: Any = None, einsum_cls: Any = None) -> nn.Module:
    """The module ``name`` (``"mlp"`` or ``"encoder"``), optionally with injected matmuls."""
    if name == "mlp":
        if einsum_cls is not None:
            raise ValueError("the MLP has no einsum to inject")
        return MLP(dot_general_cls=dot_general_cls)
    if name == "encoder":
        return EncoderBlock(dot_general_cls=dot_general_cls, einsum_cls=einsum_cls)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def input_shape(name: str, batch: int) -> tuple[int, ...]:
    if name == "mlp":
        return (batch, MLP_WIDTH)
    if name == "encoder":
        return (batch, SEQ_LEN, D_MODEL)
    raise ValueError(f"unknown model {name!r}")


def make_inputs(name: str, batch: int, *, seed: int = INPUT_SEED) -> jax.Array:
    """A float32 input batch: standard normal (the encoder's like LayerNormed embeddings)."""
    return jax.random.normal(jax.random.key(seed), input_shape(name, batch), jnp.float32)


def make_targets(name: str, batch: int, *, seed: int = INPUT_SEED + 1) -> jax.Array:
    """Regression targets for a training step (same shape as the model output)."""
    return jax.random.normal(jax.random.key(seed), input_shape(name, batch), jnp.float32)


def init_params(name: str, *, seed: int = PARAM_SEED) -> dict[str, Any]:
    """Float32 params of the float model ``name`` (a pure dict: ``{'params': ...}`` unboxed).

    The tree is the same for the injected (AQT) variants, whose extra collections, if any,
    are created by those variants themselves.
    """
    model = make_model(name)
    x = make_inputs(name, 1)
    return nn.unbox(model.init(jax.random.key(seed), x))


@dataclasses.dataclass
class Workload:
    """One model at one batch size: the float module, its variables and an input batch."""

    model_name: str
    batch: int
    model: nn.Module
    variables: dict[str, Any]  # {'params': ...}, float32
    x: jax.Array
    y_target: jax.Array

    @property
    def params(self) -> dict[str, Any]:
        return self.variables["params"]

    @property
    def label(self) -> str:
        if self.model_name == "encoder":
            return f"encoder b={self.batch} s={SEQ_LEN}"
        return f"mlp b={self.batch}"

    def float_apply(self, variables: dict[str, Any], x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x)


def make_workload(name: str, batch: int) -> Workload:
    return Workload(
        model_name=name,
        batch=batch,
        model=make_model(name),
        variables=init_params(name),
        x=make_inputs(name, batch),
        y_target=make_targets(name, batch),
    )


def mse_loss(y: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y - target))
