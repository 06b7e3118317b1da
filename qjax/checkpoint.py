"""Orbax save/restore of pytrees holding ``QArray``s, masks, plain arrays and a ``Policy``.

A checkpoint directory holds ``arrays/`` (Orbax: one entry per array leaf, a dict
``{values, scale, zero_point}`` per QArray leaf), ``qjax_checkpoint.json`` (format version,
each leaf's ``qjax.rules`` path and metadata, the container structure when it is made of
dicts/lists/tuples, Python scalars and strings) and, optionally, ``policy.json``. Arrays
keep their dtype (int4/int2 QArray values are already packed ``uint8``) except fp8, stored
bitcast to ``uint8``, ``uint4`` / ``uint2``, bitcast to ``int4`` / ``int2`` (see
``qjax._storage``), bool arrays (pruning masks), stored bit-packed 8 per byte, and typed
PRNG key arrays, stored as their key data with the implementation's name. A
``TransposedQArray`` is stored as its stored ``QArray`` with ``"transposed": true`` in its
metadata. The JSON file is written last: without it a save is incomplete.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from qjax._storage import cast, check_storable, checkpoint_path, stored_dtype
from qjax.numerics.formats import format_from_name
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray, is_quantized
from qjax.quant.policy import Policy
from qjax.rules import leaves_with_paths, map_with_path

FORMAT_VERSION = 1
_META, _POLICY, _ARRAYS = "qjax_checkpoint.json", "policy.json", "arrays"
_PARTS = ("values", "scale", "zero_point", "act_scale", "act_zero_point")
_LEAF = "*"
_KEY = jax.dtypes.prng_key
_barrier_ids = itertools.count()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"qjax_checkpoint_{name}_{next(_barrier_ids)}")


def _key(i: int) -> str:
    return f"leaf_{i:06d}"


def _array_meta(x) -> dict[str, Any]:
    return {"shape": [int(d) for d in x.shape], "dtype": jnp.dtype(x.dtype).name}


def _leaf_meta(path: str, leaf: Any) -> dict[str, Any]:
    """JSON metadata of one leaf; the same function describes saved and target leaves."""
    if isinstance(leaf, TransposedQArray):  # the stored QArray, flagged
        return {**_leaf_meta(path, leaf.stored), "transposed": True}
    if isinstance(leaf, QArray):
        meta = {
            "kind": "qarray",
            "format": leaf.format.name,
            "dtype": jnp.dtype(leaf.dtype).name,
            "channel_axes": list(leaf.channel_axes),
            "group_axis": leaf.group_axis,
            "group_size": leaf.group_size,
            "packed_axis": leaf.packed_axis,
            "packed_length": leaf.packed_length,
        }
        for part in _PARTS:
            child = getattr(leaf, part)
            meta[part] = None if child is None else _array_meta(child)
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, _KEY):
        # typed PRNG keys: their raw key data is stored, the implementation recorded
        data = jax.eval_shape(jax.random.key_data, leaf)
        meta = {"kind": "key", "shape": [int(d) for d in leaf.shape], "dtype": str(leaf.dtype)}
        meta["data"] = _array_meta(data)
        if isinstance(leaf, jax.Array):  # a target's ShapeDtypeStruct cannot name it; its dtype does
            meta["impl"] = str(jax.random.key_impl(leaf))
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.dtype(leaf.dtype) == jnp.bool_:
        meta = {"kind": "bits", **_array_meta(leaf)}  # masks: stored 8 per byte
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        meta = {"kind": "array", **_array_meta(leaf)}
    elif isinstance(leaf, (bool, int, float, str)):
        meta = {"kind": "scalar", "value": leaf}
    else:
        what = f"{type(leaf).__name__} {getattr(leaf, 'dtype', '')}".strip()
        raise TypeError(
            f"leaf {path!r}: cannot checkpoint a {what} (arrays, PRNG key arrays, QArrays, "
            "Python scalars and strings only)"
        )
    return {"path": path, **meta}


def _on_device(x) -> Any:
    """Restored numpy arrays go to the default device unless JAX would change their dtype
    (64-bit types without ``jax_enable_x64``): those stay numpy, bit-exact."""
    keep = isinstance(x, jax.Array) or jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype
    return x if keep else jnp.asarray(x)


def _parts(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {shape, dtype}}`` of the arrays stored for a leaf (none for a scalar)."""
    if m["kind"] in ("array", "bits", "key") and math.prod(m["shape"]) == 0:
        return {}  # Orbax stores no zero-size arrays: rebuilt from the metadata
    if m["kind"] == "array":
        return {"array": m}
    if m["kind"] == "key":
        return {"array": m["data"]}
    if m["kind"] == "bits":
        return {"array": {"shape": [-(-math.prod(m["shape"]) // 8)], "dtype": "uint8"}}
    return {k: m[k] for k in _PARTS if m.get(k) is not None}


def _pack_bits(x) -> Any:
    """A bool array as ``np.packbits`` of its flattening (big-endian bits), on device."""
    flat = jnp.asarray(x, jnp.uint8).reshape(-1)
    flat = jnp.pad(flat, (0, -flat.shape[0] % 8)).reshape(-1, 8)
    return jnp.sum(flat << jnp.arange(7, -1, -1, dtype=jnp.uint8), axis=1, dtype=jnp.uint8)


def _unpack_bits(bits, shape) -> Any:
    if isinstance(bits, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.bool_)
    n = math.prod(shape)
    out = (jnp.asarray(bits, jnp.uint8)[:, None] >> jnp.arange(7, -1, -1, dtype=jnp.uint8)) & 1
    return out.reshape(-1)[:n].astype(jnp.bool_).reshape(tuple(shape))


def _build(m: dict[str, Any], parts: dict[str, Any]) -> Any:
    """A leaf from its metadata and its arrays (jax arrays or ``ShapeDtypeStruct``s)."""
    if m["kind"] == "key":
        data = parts.get("array")
        if data is None:
            data = jnp.zeros(tuple(m["data"]["shape"]), m["data"]["dtype"])
        wrap = lambda d: jax.random.wrap_key_data(d, impl=m["impl"])
        return jax.eval_shape(wrap, data) if isinstance(data, jax.ShapeDtypeStruct) else wrap(data)
    if m["kind"] in ("array", "bits") and not parts:
        return jnp.zeros(tuple(m["shape"]), jnp.bool_ if m["kind"] == "bits" else m["dtype"])
    if m["kind"] == "bits":
        return _unpack_bits(parts["array"], m["shape"])
    if m["kind"] != "qarray":
        return parts.get("array", m.get("value"))
    aux = (
        format_from_name(m["format"]),
        jnp.dtype(m["dtype"]),
        tuple(m["channel_axes"]),
        m["group_axis"],
        m["group_size"],
        m["packed_axis"],
        m["packed_length"],
    )
    q = QArray.tree_unflatten(aux, [parts.get(k) for k in _PARTS])
    return TransposedQArray.tree_unflatten(None, [q]) if m.get("transposed") else q


def _encode(x: Any) -> Any:
    """The container structure as JSON (``None`` where it holds other node types)."""
    if x is None:
        return None
    if is_quantized(x) or jax.tree_util.all_leaves([x]):
        return _LEAF
    if type(x) is dict and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in x):
        items = [[k, _encode(v)] for k, v in x.items()]
        kind = "dict"
    elif type(x) in (list, tuple):
        items, kind = [_encode(v) for v in x], type(x).__name__
    else:
        raise TypeError(type(x).__name__)
    return {kind: items}


def _decode(s: Any, mark: object) -> Any:
    if s is None or s == _LEAF:
        return None if s is None else mark
    ((kind, items),) = s.items()
    if kind == "dict":
        return {k: _decode(v, mark) for k, v in items}
    return {"list": list, "tuple": tuple}[kind](_decode(v, mark) for v in items)


def _check_dir(path: epath.Path, overwrite: bool) -> None:
    if not path.exists():
        return
    names = {p.name for p in path.iterdir()}
    if names and not overwrite:
        raise FileExistsError(
            f"checkpoint directory {path} already exists and is not empty; pass overwrite=True to replace it"
        )
    foreign = sorted(n for n in names if n not in (_META, _POLICY) and not n.startswith(_ARRAYS))
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {path}: it holds files that are not part of a qjax "
            f"checkpoint ({', '.join(foreign[:5])}); remove them yourself"
        )
    if jax.process_index() == 0:
        for p in path.iterdir():
            p.rmtree() if p.is_dir() else p.unlink()


def save(directory, tree: Any, *, policy: Policy | None = None, overwrite: bool = False) -> None:
    """Save a pytree of arrays, ``QArray``s, masks and scalars (and a ``Policy``) with Orbax.

    Args:
      directory: checkpoint directory (a path or ``epath``-style string); created if needed.
        An existing empty directory is used as is.
      tree: any pytree (dicts, lists, tuples, Linen variables, NNX ``State``, ...) whose
        leaves are jax/numpy arrays, typed PRNG key arrays, ``QArray``s, Python scalars or
        strings.
      policy: a ``qjax.Policy`` stored as JSON beside the arrays (see :func:`restore_policy`).
      overwrite: replace an existing non-empty checkpoint directory.

    Raises:
      FileExistsError: ``directory`` is not empty and ``overwrite`` is false, or it holds
        files that are not part of a qjax checkpoint (never deleted).
      TypeError: a leaf cannot be stored (the message names its path), or ``policy`` is
        not a ``Policy``.

    Example:
      >>> qjax.checkpoint.save("/tmp/ckpt", qparams, policy=policy)
      >>> qparams = qjax.checkpoint.restore("/tmp/ckpt")
    """
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a qjax.Policy or None, got {type(policy).__name__}")
    path = checkpoint_path(directory)
    leaves = leaves_with_paths(tree)
    metas = [_leaf_meta(p, leaf) for p, leaf in leaves]
    arrays = {}
    for m in metas:  # refused before anything is written
        for p in _parts(m).values():
            check_storable(m["path"], p["dtype"])
    for i, ((_, leaf), m) in enumerate(zip(leaves, metas)):
        if parts := _parts(m):
            if m["kind"] == "bits":
                arrays[_key(i)] = {"array": _pack_bits(leaf)}
                continue
            if m["kind"] == "key":
                arrays[_key(i)] = {"array": jax.random.key_data(leaf)}
                continue
            src = leaf.stored if isinstance(leaf, TransposedQArray) else leaf
            arrays[_key(i)] = {
                k: cast(src if k == "array" else getattr(src, k), stored_dtype(p["dtype"]))
                for k, p in parts.items()
            }
    try:
        structure, tree_type = _encode(tree), None
    except TypeError as e:
        structure, tree_type = None, str(e)
    _check_dir(path, overwrite)
    _sync("prepare")
    path.mkdir(parents=True, exist_ok=True)
    if arrays:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(path / _ARRAYS, args=ocp.args.StandardSave(arrays))
    if jax.process_index() == 0:
        if policy is not None:
            (path / _POLICY).write_text(policy.to_json())
        meta = dict(qjax_checkpoint=FORMAT_VERSION, leaves=metas, structure=structure, tree_type=tree_type)
        (path / _META).write_text(json.dumps(meta, indent=1))
    _sync("done")


def _read_meta(path: epath.Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    if not (path / _META).exists():
        raise FileNotFoundError(f"{path} is not a qjax checkpoint: it has no {_META} (incomplete save?)")
    try:
        meta = json.loads((path / _META).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / _META} is not valid JSON (a damaged checkpoint?): {e}") from None
    version = meta.get("qjax_checkpoint")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this qjax reads versions up to {FORMAT_VERSION})"
        )
    return meta


def _data_error(path: epath.Path, saved: list[dict], e: Exception) -> ValueError:
    """A readable error for arrays that could not be read: the leaf path of the internal
    ``leaf_NNNNNN`` key the storage layer names, if it names one."""
    found = re.search(r"leaf_(\d{6})", str(e))
    leaf = ""
    if found and int(found.group(1)) < len(saved):
        leaf = f" of leaf {saved[int(found.group(1))]['path']!r}"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return ValueError(
        f"checkpoint {path}: cannot read the arrays{leaf} (damaged or missing files under "
        f"{path / _ARRAYS}): {first}"
    )


def _check(path: epath.Path, saved: list[dict], units: list[tuple[str, Any]]) -> None:
    where = f"checkpoint {path} does not match the target"
    for i in range(max(len(saved), len(units))):
        want = saved[i] if i < len(saved) else {"path": None}
        have = _leaf_meta(*units[i]) if i < len(units) else {"path": None}
        if want["path"] != have["path"]:
            ck, tg = ("no more leaves" if m["path"] is None else repr(m["path"]) for m in (want, have))
            raise ValueError(f"{where}: first differing leaf: checkpoint has {ck} where the target has {tg}")
        bits = "bits" in (want.get("kind"), have.get("kind"))  # a bool mask vs another dtype: say dtype
        for k in ["dtype", "kind", *want] if bits else ["kind", "transposed", *want]:
            if k not in ("path", "value", "impl") and want.get(k) != have.get(k):
                raise ValueError(
                    f"{where}: leaf {have['path']!r} differs in {k}: checkpoint "
                    f"{want.get(k)!r}, target {have.get(k)!r}"
                )


def _fit(s, shape):
    """A scale's sharding from its weight's: replicate dimensions the mesh axes do not divide."""
    if not isinstance(s, jax.sharding.NamedSharding):
        return s
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    size = lambda e: math.prod(s.mesh.shape[n] for n in (e if isinstance(e, tuple) else (e,)))
    spec = [None if e is None or d % size(e) else e for d, e in zip(shape, spec)]
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))


def _array_shardings(target: Any, shardings: Any) -> list:
    """One sharding (or ``None``) per array leaf of ``target``, in flatten order."""
    if shardings is None:
        return [getattr(x, "sharding", None) for x in jax.tree.leaves(target)]
    is_leaf = lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    reps = jax.tree.map(lambda s, sub: (s,) * len(jax.tree.leaves(sub)), shardings, target, is_leaf=is_leaf)
    return jax.tree.leaves(reps, is_leaf=is_leaf)


def restore(directory, target: Any = None, *, shardings: Any = None) -> Any:
    """Restore a pytree saved by :func:`save`.

    Args:
      directory: the checkpoint directory.
      target: a pytree of the saved structure (e.g. the tree that was saved, an NNX
        ``State`` from ``nnx.split``, Linen variables, or ``jax.eval_shape`` of either);
        its leaves may be arrays, ``jax.ShapeDtypeStruct``s or ``QArray``s of those. The
        result has its structure (NNX ``Variable``s and other boxes kept). Without it, the
        saved structure is rebuilt when it is made of dicts, lists, tuples and ``None``.
      shardings: a ``jax.sharding.Sharding``, or a pytree of them (``None`` entries: no
        placement) that is a prefix of ``target``; a sharding given for a ``QArray`` is
        used for its values and, with axes its shape cannot take replicated, for its
        scale and zero point. Default: the shardings of ``target``'s jax arrays (and of
        ``ShapeDtypeStruct``s that have one); other leaves go to the default device.

    Returns:
      The tree, with jax arrays (bit-identical to the saved ones), ``QArray``s with their
      saved format and granularity, and Python scalars as saved.

    Raises:
      FileNotFoundError: ``directory`` does not exist or holds no qjax checkpoint.
      ValueError: ``target`` does not match the checkpoint (the message names the first
        differing leaf path and, for a shape/dtype/format difference, both values); or
        no ``target`` is given for a tree whose structure is not stored.

    Example:
      >>> graphdef, state = nnx.split(model)
      >>> model = nnx.merge(graphdef, qjax.checkpoint.restore("/tmp/ckpt", state))
    """
    path = checkpoint_path(directory)
    meta = _read_meta(path)
    saved = meta["leaves"]
    if target is None:
        if meta["tree_type"] is not None:
            raise ValueError(
                f"checkpoint {path} holds a {meta['tree_type']} tree whose structure is not "
                "stored; pass target= (e.g. the state from nnx.split)"
            )
        abstract = iter(
            [
                _build(
                    m,
                    {
                        k: jax.ShapeDtypeStruct(tuple(p["shape"]), jnp.dtype(p["dtype"]))
                        for k, p in _parts(m).items()
                    },
                )
                for m in saved
            ]
        )
        target = map_with_path(lambda _p, _leaf: next(abstract), _decode(meta["structure"], object()))
    units = leaves_with_paths(target)
    _check(path, saved, units)
    flat_shardings = iter(_array_shardings(target, shardings))
    abstract = {}
    bit_shardings = {}
    for i, m in enumerate(saved):
        if m["kind"] == "scalar" or (m["kind"] in ("array", "bits", "key") and not _parts(m)):
            next(flat_shardings)  # a leaf with no stored array still has its target's sharding slot
        for k, p in _parts(m).items():
            s, shape, dtype = next(flat_shardings), tuple(p["shape"]), stored_dtype(p["dtype"])
            if m["kind"] == "bits":  # packed bytes: read whole, placed after unpacking
                bit_shardings[i], s = s, None
            s = s if k in ("array", "values") else _fit(s, shape)
            abstract.setdefault(_key(i), {})[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    out = {}
    if abstract:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            try:
                out = ckptr.restore(path / _ARRAYS, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # tensorstore / OCDBT errors name internal keys only
                raise _data_error(path, saved, e) from e

    def leaf(i, m):
        x = _build(m, {k: _on_device(cast(out[_key(i)][k], p["dtype"])) for k, p in _parts(m).items()})
        return x if bit_shardings.get(i) is None else jax.device_put(x, bit_shardings[i])

    it = iter(leaf(i, m) for i, m in enumerate(saved))
    return map_with_path(lambda _p, _leaf: next(it), target)


def restore_policy(directory) -> Policy | None:
    """The ``Policy`` saved with a checkpoint.

    Args:
      directory: the checkpoint directory.

    Returns:
      The ``qjax.Policy`` given to :func:`save`, or ``None`` if none was.

    Raises:
      FileNotFoundError: ``directory`` does not exist or holds no qjax checkpoint.
      ValueError: the stored policy is malformed.

    Example:
      >>> policy = qjax.checkpoint.restore_policy("/tmp/ckpt")
    """
    path = checkpoint_path(directory)
    _read_meta(path)
    if not (path / _POLICY).exists():
        return None
    return Policy.from_json((path / _POLICY).read_text())
