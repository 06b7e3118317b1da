"""fp8 checkpoints with 2-D block scales in and out: DeepSeek-V3 / R1, Qwen3-FP8 and
other models saved in the "block-wise fp8" layout. A linear layer holds ``weight`` ``(N, K)``
(out, in; ``float8_e4m3fn``) and ``weight_scale_inv`` ``(ceil(N / bn), ceil(K / bk))``
float32 with ``W[n, k] = weight[n, k] · weight_scale_inv[n // bn, k // bk]`` (blocks of
128 × 128).

:func:`from_fp8_blocks` makes the ``(K, N)`` QArray of a Flax ``Dense`` kernel with the same
codes and scales (the scales stored per output channel, repeated over each block: a spec
with ``group_size=bk`` along K and ``tile_size=bn`` along N makes the same QArray from the
float weight); :func:`to_fp8_blocks` writes such a QArray back.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax.numerics.formats import fp8_e4m3
from qjax.numerics.qarray import QArray
from qjax.numerics.spec import QuantSpec

__all__ = ["fp8_block_spec", "from_fp8_blocks", "to_fp8_blocks"]


def fp8_block_spec(block: tuple[int, int] = (128, 128)) -> QuantSpec:
    """The spec of a ``(K, N)`` kernel in the block-wise fp8 layout: ``float8_e4m3fn`` codes,
    one absmax scale per ``block[1] × block[0]`` tile (``(out, in)`` block order, as the
    checkpoints' ``weight_block_size``), the last tiles possibly short.

    Example:
      >>> policy = qjax.Policy([qjax.Rule(r".*kernel", weight=fp8_block_spec())])
      >>> qparams = qjax.quantize_params(variables, policy)
    """
    bn, bk = _block(block)
    return QuantSpec(
        fp8_e4m3, channel_axes=(-1,), group_size=bk, group_axis=0, pad_groups=True, tile_size=bn, tile_axis=-1
    )


def _block(block) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block)
    ):
        raise ValueError(f"block must be two positive ints (out, in), got {block!r}")
    return int(block[0]), int(block[1])


def _as_e4m3(weight: Any) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype == np.uint8:  # raw bytes, as some loaders give them
        w = w.view(ml_dtypes.float8_e4m3fn)
    if w.dtype != ml_dtypes.float8_e4m3fn:
        raise TypeError(f"weight must be float8_e4m3fn (or its uint8 bytes), got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be (out, in), got shape {w.shape}")
    return w


def from_fp8_blocks(
    weight: Any, scale_inv: Any, *, block=(128, 128), dtype=jnp.bfloat16, layout: str = "kn"
) -> QArray:
    """One layer of a block-wise fp8 checkpoint as the ``(K, N)`` QArray of a Flax ``Dense``.

    Args:
      weight: ``(N, K)`` ``float8_e4m3fn`` codes (or their ``uint8`` bytes).
      scale_inv: ``(ceil(N / bn), ceil(K / bk))`` scales (``weight_scale_inv``; despite the
        name, the factor the codes are multiplied by).
      block: ``(bn, bk)``, the checkpoint's ``weight_block_size`` (128, 128).
      dtype: the float dtype the QArray dequantizes to.
      layout: ``"kn"``: the ``(K, N)`` QArray (codes transposed once, here); ``"nk"``: the
        ``(N, K)`` QArray as stored, for a model that reads the weight as ``x @ w.T``.

    Returns:
      The QArray whose ``dequantize()`` is ``weight.T · scale_inv`` per block (``weight ·
      scale_inv`` for ``"nk"``), exactly: its codes are the checkpoint's, its scales float32
      repeated over each block's outputs, grouped by ``bk`` along K (one group when K ≤ bk),
      as ``qjax.quantize(w, fp8_block_spec(block))`` lays them out.

    Raises:
      TypeError: ``weight`` is not fp8 e4m3.
      ValueError: shapes that do not fit ``block``, NaN/Inf or non-positive scales, NaN
        codes, an unknown ``layout``.

    Example:
      >>> t = safetensors.numpy.load_file("model-00001.safetensors")
      >>> p = "model.layers.3.mlp.down_proj"
      >>> kernel = qjax.from_fp8_blocks(t[p + ".weight"], t[p + ".weight_scale_inv"])
    """
    bn, bk = _block(block)
    w = _as_e4m3(weight)
    n, k = w.shape
    s = np.asarray(scale_inv, np.float32)
    want = (math.ceil(n / bn), math.ceil(k / bk))
    if s.shape != want:
        raise ValueError(f"scale_inv must be {want} for a {w.shape} weight in {block} blocks, got {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("scale_inv holds NaN, Inf or non-positive scales")
    if layout not in ("kn", "nk"):
        raise ValueError(f"layout must be 'kn' or 'nk', got {layout!r}")
    nan = (w.view(np.uint8) & 0x7F) == 0x7F  # e4m3fn's only NaN encodings
    if nan.any():
        raise ValueError(
            f"weight holds {int(nan.sum())} NaN codes (first at (out, in) {np.argwhere(nan)[0].tolist()})"
        )
    scale = np.repeat(s.T, bn, axis=1)[:, :n]  # (K / bk, N): each block's scale on its outputs
    if layout == "nk":
        values, scale, axes = w, scale.T, dict(channel_axes=(-2,), group_axis=-1)
    else:
        values, axes = w.T, dict(channel_axes=(-1,), group_axis=-2)
    return QArray(
        jnp.asarray(np.ascontiguousarray(values)),
        jnp.asarray(np.ascontiguousarray(scale)),
        format=fp8_e4m3,
        dtype=dtype,
        group_size=bk,
        **axes,
    )


def to_fp8_blocks(q: QArray, *, block=(128, 128)) -> dict[str, np.ndarray]:
    """A ``(K, N)`` fp8 e4m3 QArray with block scales as the checkpoint layout.

    Args:
      q: e.g. ``qjax.quantize(w, fp8_block_spec(block))`` or :func:`from_fp8_blocks`'s.
      block: ``(bn, bk)``.

    Returns:
      ``{"weight": (N, K) float8_e4m3fn, "weight_scale_inv": (ceil(N / bn), ceil(K / bk))
      float32}``.

    Raises:
      ValueError: not a 2-D fp8 e4m3 QArray grouped by ``bk`` along K (or per channel with
        ``K <= bk``), or scales that differ within a block (names the first block).
    """
    bn, bk = _block(block)
    if not isinstance(q, QArray) or q.format != fp8_e4m3 or len(q.shape) != 2 or q.zero_point is not None:
        raise ValueError("to_fp8_blocks takes a 2-D fp8_e4m3 QArray (symmetric)")
    nk = q.group_axis is not None and q.group_axis % 2 == 1  # from_fp8_blocks(layout="nk")
    k, n = q.shape[::-1] if nk else q.shape
    groups = math.ceil(k / bk)
    grouped_ok = q.group_axis is not None and q.group_size == bk
    if not (grouped_ok or (q.group_axis is None and groups == 1)):
        raise ValueError(
            f"to_fp8_blocks: the QArray must be grouped by {bk} along K, got group_axis="
            f"{q.group_axis}, group_size={q.group_size}"
        )
    scale = np.asarray(q.scale, np.float32)
    s = np.broadcast_to(scale.T if nk else scale, (groups, n))
    tiles = math.ceil(n / bn)
    padded = np.pad(s, ((0, 0), (0, tiles * bn - n)), mode="edge").reshape(groups, tiles, bn)
    same = np.all(padded == padded[..., :1], axis=2)
    if not same.all():
        g, t = (int(i) for i in np.argwhere(~same)[0])
        raise ValueError(
            f"to_fp8_blocks: scales differ within block (in {g}, out {t}) of {block}: quantize with "
            "fp8_block_spec(block) (tile scales)"
        )
    values = np.asarray(q.values)
    return {
        "weight": np.ascontiguousarray(values if nk else values.T),
        "weight_scale_inv": np.ascontiguousarray(padded[..., 0].T),
    }
