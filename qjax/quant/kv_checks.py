"""Argument checks of :class:`qjax.quant.kv_cache.KVCache`: its specs and static scales,
the keys / values written, the positions and counts of a write. Each error names the
argument (``spec``, ``value_spec``, ``k``, ``v``, ``index``, ``count``, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics import calibration as calib
from qjax.numerics.spec import QuantSpec
from qjax.quant.kv_attention import B_AXIS as _B
from qjax.quant.kv_attention import D_AXIS as _D
from qjax.quant.kv_attention import T_AXIS as _T


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_spec(name: str, spec, shape, scale, zero_point) -> str:
    """Validate a cache side's spec; return its mode (``kv_attention.mode``)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name}: expected a qjax.QuantSpec, got {type(spec).__name__}")
    if spec.rounding != "nearest":
        raise ValueError(f"{name}: a KV cache rounds to nearest; got rounding={spec.rounding!r}")
    layout = spec.layout(shape)
    if layout.group_axis not in (None, _D, _T):
        raise ValueError(
            f"{name}: groups must run along head_dim (axis 3 of (batch, length, heads, head_dim)), or "
            f"along the length (axis 1: blocks of tokens), got group_axis={spec.group_axis}"
        )
    if spec.packed and spec.pack_axis % 4 != 3:
        raise ValueError(
            f"{name}: packed codes must be packed along head_dim (pack_axis=-1), got pack_axis="
            f"{spec.pack_axis}: tokens are written one at a time"
        )
    if layout.group_axis == _T:
        return check_block_spec(name, spec, layout, shape, scale, zero_point)
    if layout.group_axis is not None and shape[_D] % layout.group_size:
        raise ValueError(f"{name}: group_size={layout.group_size} must divide head_dim={shape[_D]}")
    per_token = _T in layout.channel_axes
    if per_token:
        if _B not in layout.channel_axes:
            raise ValueError(
                f"{name}: per-token scales must also be per batch row (channel_axes must include axes 0 "
                f"and 1, e.g. qjax.PER_TOKEN), got channel_axes={spec.channel_axes}"
            )
        if scale is not None or zero_point is not None:
            raise ValueError(
                f"{name}: a per-token spec computes its scales from each written token; a static "
                "scale / zero point needs a spec without the length axis in channel_axes"
            )
        if _D in layout.channel_axes:
            raise ValueError(
                f"{name}: per-token scales may vary along head_dim only per group (group_size along axis "
                f"3), got channel_axes={spec.channel_axes}; per-channel scales are static (without axis 1) "
                "or per block of tokens (group_axis=1)"
            )
        return "token"
    if _B in layout.channel_axes:
        raise ValueError(
            f"{name}: a static cache scale may vary along heads and head_dim only, not along the batch "
            f"axis (channel_axes={spec.channel_axes})"
        )
    if scale is None:
        raise ValueError(
            f"{name}: the spec has no per-token scale (axis 1 is not in channel_axes={spec.channel_axes}), "
            "so it needs a static scale: pass it to KVCache.init (e.g. qjax.compute_scale(samples, spec)), "
            "or use channel_axes=qjax.PER_TOKEN"
        )
    return "static"


def check_block_spec(name: str, spec, layout, shape, scale, zero_point) -> str:
    """A spec with blocks of tokens (KIVI): per sequence, computed from the data."""
    block = layout.group_size
    if shape[_T] % block:
        raise ValueError(f"{name}: the block of {block} tokens (group_size) must divide length={shape[_T]}")
    if _B not in layout.channel_axes:
        raise ValueError(
            f"{name}: scales per block of tokens must also be per batch row (channel_axes must include "
            f"axis 0, e.g. (0, 2, 3)), got channel_axes={spec.channel_axes}"
        )
    if scale is not None or zero_point is not None:
        raise ValueError(
            f"{name}: a spec with blocks of tokens computes its scales from the data; drop the static scale"
        )
    if not isinstance(spec.calibration, (calib.AbsMax, calib.MinMax)):
        raise ValueError(
            f"{name}: a partly written block of tokens is calibrated with its unwritten positions as zeros, "
            f"which only absmax and minmax ignore; got calibration {spec.calibration!r}"
        )
    return "block"


def check_kv(name: str, x, batch: int, heads: int, head_dim: int):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"{name} must have shape (batch, new_tokens, heads, head_dim) = ({batch}, S, {heads}, "
            f"{head_dim}), got {tuple(x.shape)}"
        )
    return x


def counts(count, batch: int, new: int):
    """``count`` as an int32 ``(batch,)`` array in ``[0, new]`` (checked when concrete, clipped
    to it when traced: an appending cache must not count tokens it was not given), or None."""
    if count is None:
        return None
    c = jnp.asarray(count)
    if not jnp.issubdtype(c.dtype, jnp.integer):
        raise TypeError(f"count must be an integer scalar or (batch,) array, got dtype {c.dtype}")
    if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch):
        raise ValueError(f"count must be a scalar or have shape ({batch},), got {tuple(c.shape)}")
    if is_concrete(c):
        host = np.asarray(c)
        if host.min(initial=0) < 0 or host.max(initial=0) > new:
            raise ValueError(f"count {host.tolist()} must lie in [0, {new}] (the tokens given)")
    return jnp.broadcast_to(jnp.clip(c, 0, new).astype(jnp.int32), (batch,))  # clipped before the cast


def positions(index, batch: int, length: int, new, verb: str = "writes"):
    """``index`` as an int32 ``(batch,)`` array, checked when concrete (``new``: the tokens
    written or read from it, an int or one per sequence)."""
    idx = jnp.asarray(index)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"index must be an integer scalar or (batch,) array, got dtype {idx.dtype}")
    if idx.ndim > 1 or (idx.ndim == 1 and idx.shape[0] != batch):
        raise ValueError(f"index must be a scalar or have shape ({batch},), got {tuple(idx.shape)}")
    if is_concrete(idx):
        host = np.asarray(idx)
        ends = np.broadcast_to(host, (batch,)) + np.broadcast_to(np.asarray(new), (batch,))
        if host.min() < 0 or ends.max() > length:
            many = np.asarray(new).tolist()
            raise ValueError(
                f"index {host.tolist()} with {many} {'new tokens' if verb == 'writes' else 'queries'} {verb} "
                f"outside the cache's length {length} (positions 0..{length - 1})"
            )
    return jnp.broadcast_to(idx.astype(jnp.int32), (batch,))


def check_static(name: str, stored_scale: jax.Array, zero_point) -> None:
    """A concrete static scale must be finite and positive as stored (in the spec's scale
    dtype), a zero point integral."""
    prefix = "k" if name == "spec" else "v"
    if is_concrete(stored_scale):
        host = np.asarray(stored_scale.astype(jnp.float32), np.float64)
        if not (np.all(np.isfinite(host)) and np.all(host > 0)):
            raise ValueError(
                f"{prefix}_scale must be finite and positive in the scale dtype "
                f"({jnp.dtype(stored_scale.dtype).name}); stored it is {np.unique(host).tolist()}"
            )
    if zero_point is not None and is_concrete(zero_point):
        host = np.asarray(zero_point, np.float64)
        if not np.array_equal(host, np.round(host)):
            raise ValueError(f"{prefix}_zero_point must hold integers (codes), got {host.tolist()}")
