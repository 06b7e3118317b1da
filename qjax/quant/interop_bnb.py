"""bitsandbytes 4-bit (NF4) checkpoints in and out: QLoRA's format, and that of the
``*-bnb-4bit`` models on the Hugging Face Hub.

A ``bnb.nn.Linear4bit`` layer saved with ``save_pretrained`` / safetensors holds, under its
weight's name ``W`` (PyTorch's ``(out, in)`` = ``(N, K)`` weight):

* ``W``: uint8 ``(N·K/2, 1)``, the codes of the weight flattened row-major, two per byte,
  the **first code of each pair in the high nibble** (another ``quant_storage`` dtype is
  the same bytes viewed as that type);
* ``W.absmax``: one scale per block of ``blocksize`` consecutive codes (float32), or with
  double quantization (``bnb_4bit_use_double_quant``, QLoRA's default) uint8 codes of
  those scales less their mean ``nested_offset``, in blocks of ``nested_blocksize`` (256)
  over ``W.nested_quant_map`` (256 values) with scales ``W.nested_absmax`` (float32);
* ``W.quant_map``: the 16 code values (NF4: the table of :data:`qjax.nf4`);
* ``W.quant_state.bitsandbytes__nf4``: a uint8 tensor of JSON text holding ``quant_type``,
  ``blocksize``, ``dtype``, ``shape`` and, when nested, ``nested_blocksize``,
  ``nested_dtype``, ``nested_offset``.

The value of a code ``c`` of block ``b`` is ``quant_map[c] · absmax[b]``, with the nested
absmax ``nested_quant_map[absmax8[b]] · nested_absmax[b // nested_blocksize] + offset``
computed in float32 as bitsandbytes does. A block of ``blocksize`` codes lies along ``in``
when ``in`` is a multiple of it, so :func:`from_bnb_4bit` gives the ``(K, N)`` NF4 QArray
grouped along K that ``qjax.quantize(w, QuantSpec(qjax.nf4, group_size=blocksize))`` would
make: codes as stored, one float32 scale per block (a nested checkpoint's scales come out
dequantized, exactly). :func:`to_bnb_4bit` writes such a QArray back (absmax in float32,
no double quantization).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import NF4_VALUES, nf4
from qjax.numerics.qarray import QArray
from qjax.quant.interop import kn_grouped

_STATE = ".quant_state.bitsandbytes__"
_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes 0.45+ dequantizes


def _read(tensors: Mapping[str, Any], name: str, key: str) -> np.ndarray:
    full = name + key
    if full not in tensors:
        near = sorted(k for k in tensors if k.startswith(name))
        raise ValueError(f"bitsandbytes tensors: no {full!r} (keys under {name!r}: {near})")
    return np.asarray(tensors[full])


def _quant_state(tensors: Mapping[str, Any], name: str) -> dict:
    """The JSON quant state of weight ``name``; refuses types other than NF4."""
    found = [k for k in tensors if k.startswith(name + _STATE)]
    if len(found) != 1:
        near = sorted(k for k in tensors if k.startswith(name))
        raise ValueError(
            f"bitsandbytes tensors: expected one {name + _STATE}<type>' entry, found {found} (keys under "
            f"{name!r}: {near}); is {name!r} a 4-bit weight?"
        )
    kind = found[0][len(name + _STATE) :]
    if kind != "nf4":
        raise ValueError(
            f"bitsandbytes weight {name!r} is {kind!r}: only NF4 (bnb_4bit_quant_type='nf4', QLoRA's and the "
            "Hub's *-bnb-4bit models') is read; bitsandbytes' fp4 table is not a qjax format"
        )
    raw = np.asarray(tensors[found[0]])
    try:
        state = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"bitsandbytes weight {name!r}: its quant state is not JSON text ({e})") from e
    needed = ("blocksize", "shape", "dtype") + (
        ("nested_blocksize", "nested_offset") if any(k.startswith("nested_") for k in state) else ()
    )
    for key in needed:
        if key not in state or state[key] is None:
            raise ValueError(f"bitsandbytes weight {name!r}: its quant state has no {key!r} ({state})")
    return state


def _block_scales(tensors: Mapping[str, Any], name: str, state: dict, blocks: int) -> np.ndarray:
    """float32 ``(blocks,)``: each block's absmax, dequantized when nested."""
    absmax = _read(tensors, name, ".absmax")
    if absmax.size != blocks:
        raise ValueError(f"bitsandbytes weight {name!r}: {absmax.size} absmax values for {blocks} blocks")
    absmax = absmax.reshape(-1)
    if "nested_blocksize" not in state:
        if absmax.dtype == np.uint8:
            raise ValueError(
                f"bitsandbytes weight {name!r}: uint8 absmax (double quantization) but no nested quant state"
            )
        scales = absmax.astype(np.float32)
    else:
        nested = int(state["nested_blocksize"])
        table = _read(tensors, name, ".nested_quant_map").astype(np.float32).reshape(-1)
        outer = _read(tensors, name, ".nested_absmax").astype(np.float32).reshape(-1)
        if absmax.dtype != np.uint8 or table.size != 256:
            raise ValueError(
                f"bitsandbytes weight {name!r}: a nested absmax must be uint8 codes over a 256-value "
                f"map, got {absmax.dtype} over {table.size} values"
            )
        if outer.size != -(-blocks // nested):
            raise ValueError(
                f"bitsandbytes weight {name!r}: {outer.size} nested absmax values for {blocks} blocks of "
                f"{nested}"
            )
        # bitsandbytes' dequantize_blockwise into nested_dtype (float32 but for the 0.44 CPU /
        # XPU backend's bf16 / fp16 absmax), then + offset in that dtype, then float32
        inner = jnp.dtype(state.get("nested_dtype", "float32"))
        scales = (table[absmax.astype(np.int64)] * np.repeat(outer, nested)[:blocks]).astype(inner)
        offset = np.float32(state["nested_offset"])
        scales = (scales.astype(np.float32) + offset).astype(inner).astype(np.float32)
    if not np.all(np.isfinite(scales)):
        raise ValueError(f"bitsandbytes weight {name!r}: its absmax holds NaN or Inf")
    return scales


def from_bnb_4bit(tensors: Mapping[str, Any], name: str, *, dtype=None, pack_codes: bool = True) -> QArray:
    """A bitsandbytes NF4 weight as the ``(K, N)`` (``in, out``: a Flax ``Dense`` kernel)
    NF4 :class:`QArray` grouped along K.

    Args:
      tensors: the checkpoint's arrays by name (``safetensors.numpy.load_file``; any
        array-likes).
      name: the weight's name, e.g. ``"model.layers.0.mlp.down_proj.weight"``; its quant
        state tensors are read from ``name + ".absmax"`` and the others (module doc).
      dtype: the float dtype the QArray dequantizes to (default: the quant state's
        ``dtype``, the layer's original one).
      pack_codes: store the codes two to a byte (``qjax.quantize``'s default).

    Returns:
      The QArray (``qjax.nf4``, groups of ``blocksize`` along K, float32 scales) whose
      ``dequantize()`` is bitsandbytes' ``dequantize_4bit`` of the weight, transposed.

    Raises:
      ValueError: a missing tensor (the message lists the keys under ``name``), a quant
        type other than NF4, a ``quant_map`` other than NF4's table, sizes that do not fit
        the shape, ``in`` not a multiple of ``blocksize`` (blocks would straddle rows), a
        NaN / Inf absmax.

    Example:
      >>> t = safetensors.numpy.load_file("model.safetensors")
      >>> kernel = qjax.from_bnb_4bit(t, "model.layers.0.mlp.down_proj.weight")
      >>> names = [k for k in t if k + ".quant_state.bitsandbytes__nf4" in t]  # every 4-bit weight
    """
    state = _quant_state(tensors, name)
    try:
        shape, block = tuple(int(d) for d in state["shape"]), int(state["blocksize"])
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"bitsandbytes weight {name!r}: bad shape / blocksize in its quant state ({state})"
        ) from e
    if len(shape) != 2:
        raise ValueError(
            f"bitsandbytes weight {name!r} has shape {shape}: only 2-D (out, in) weights are read"
        )
    n, k = shape
    if k % block:
        raise ValueError(
            f"bitsandbytes weight {name!r}: in_features {k} is not a multiple of blocksize {block}, so its "
            "blocks straddle rows and have no (group along K, output) scale layout"
        )
    table = _read(tensors, name, ".quant_map").astype(np.float32).reshape(-1)
    if table.shape != (16,) or not np.array_equal(table, np.asarray(NF4_VALUES, np.float32)):
        raise ValueError(f"bitsandbytes weight {name!r}: its quant_map is not NF4's table: {table.tolist()}")
    stored = np.ascontiguousarray(_read(tensors, name, ""))
    packed = stored.view(np.uint8).reshape(-1)
    if packed.size != -(-n * k // 2):
        raise ValueError(
            f"bitsandbytes weight {name!r}: {packed.size} bytes of codes for shape {shape} ({-(-n * k // 2)} "
            "expected)"
        )
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0xF  # the first of each pair is the high nibble
    codes = codes[: n * k].reshape(n, k).T  # (K, N)
    scales = _block_scales(tensors, name, state, n * k // block).reshape(n, k // block).T
    out_dtype = jnp.dtype(dtype if dtype is not None else state["dtype"])
    return kn_grouped(jnp.asarray(codes), scales, None, nf4, block, out_dtype, pack_codes)


def to_bnb_4bit(w: QArray, name: str) -> dict[str, np.ndarray]:
    """A ``(K, N)`` NF4 QArray grouped along K as a bitsandbytes 4-bit weight's tensors
    (float32 absmax, no double quantization), for ``safetensors.numpy.save_file``.

    Args:
      w: an NF4 QArray ``(K, N)`` with one scale per group of K and output (``QuantSpec(
        qjax.nf4, channel_axes=(-1,), group_size=64)``), or per output channel.
      name: the weight's name in the checkpoint (``"...down_proj.weight"``).

    Returns:
      ``{name: uint8 (N·K/2, 1), name + ".absmax": float32, name + ".quant_map": float32
      (16,), name + ".quant_state.bitsandbytes__nf4": uint8 JSON}``.

    Raises:
      ValueError: not NF4, not 2-D, zero points, or scales not per (group along K, output).
    """
    if not isinstance(w, QArray) or w.format != nf4:
        raise ValueError(f"to_bnb_4bit takes an NF4 QArray, got {getattr(w, 'format', type(w).__name__)}")
    if w.ndim != 2 or w.zero_point is not None:
        raise ValueError(f"to_bnb_4bit takes a 2-D (K, N) QArray without zero points, got {w!r}")
    k, n = w.shape
    block = w.group_size if w.group_size is not None else k
    if block not in _BLOCK_SIZES:
        raise ValueError(
            f"to_bnb_4bit: groups of {block} along K; bitsandbytes' kernels take blocksize {_BLOCK_SIZES}"
        )
    scales = np.asarray(w.scale, np.float32)
    if (w.group_axis not in (None, -2)) or scales.shape != (k // block, n):
        raise ValueError(
            f"to_bnb_4bit needs one scale per group along K and output channel (bitsandbytes' blocks, "
            f"QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=64, group_axis=-2)): scales of shape "
            f"({k // block}, {n}), got {scales.shape} (group axis {w.group_axis})"
        )
    codes = np.asarray(w.unpacked_values(), np.uint8).T.reshape(-1)  # (N, K) row-major
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    packed = (codes[0::2] << 4) | codes[1::2]
    state = {"quant_type": "nf4", "blocksize": int(block), "dtype": jnp.dtype(w.dtype).name, "shape": [n, k]}
    return {
        name: packed.reshape(-1, 1),
        name + ".absmax": np.ascontiguousarray(scales.T).reshape(-1),
        name + ".quant_map": np.asarray(NF4_VALUES, np.float32),
        name + _STATE + "nf4": np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy(),
    }


__all__ = ["from_bnb_4bit", "to_bnb_4bit"]
