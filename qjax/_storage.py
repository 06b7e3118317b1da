"""How array leaves are written by Orbax (tensorstore): the dtype stored for each array
dtype and the bitcasts between them, shared by :mod:`qjax.checkpoint` and
:class:`qjax.parallel.TrainCheckpointer`.

fp8 (and the E8M0 scales of OCP MX specs) is stored bitcast to ``uint8`` (tensorstore may
not support it), fp4 (unpacked ``float4_e2m1fn``) bitcast to ``int4``; ``uint4`` / ``uint2``,
which tensorstore does not have, bitcast to ``int4`` / ``int2`` (same width, bit-exact);
every other dtype as it is. A dtype tensorstore cannot store either way (e.g. ``int1``) is
refused before anything is written.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

_SIGNED_OF = {"uint4": "int4", "uint2": "int2"}


def stored_dtype(dtype: Any) -> np.dtype:
    """The dtype an array of ``dtype`` is written as (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:
        return np.dtype(np.uint8)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 4:
        return jnp.dtype(jnp.int4)
    if dtype.name in _SIGNED_OF:
        return jnp.dtype(_SIGNED_OF[dtype.name])
    return dtype


def cast(x: Any, dtype: Any) -> Any:
    """Bitcast between a dtype and its stored dtype (on device for jax arrays)."""
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype:
        return x
    return jax.lax.bitcast_convert_type(x, dtype) if isinstance(x, jax.Array) else np.asarray(x).view(dtype)


def check_storable(path: str, dtype: Any) -> None:
    """Refuse, before anything is written, an array dtype that tensorstore cannot store.

    Raises:
      TypeError: naming the leaf ``path`` and the dtype.
    """
    import tensorstore as ts  # Orbax's storage layer

    name = stored_dtype(dtype).name
    try:
        ts.dtype(name)
    except (ValueError, TypeError):
        raise TypeError(
            f"leaf {path!r}: cannot checkpoint an array of dtype {jnp.dtype(dtype).name} (the storage "
            "layer has no such type); convert it first (e.g. astype int8)"
        ) from None


def checkpoint_path(directory):
    """``directory`` as an ``epath.Path`` Orbax accepts: a local path made absolute (Orbax
    refuses relative ones), a URL (``gs://...``) as it is."""
    text = os.fspath(directory) if not isinstance(directory, epath.Path) else str(directory)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))
