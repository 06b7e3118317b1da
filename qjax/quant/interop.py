"""Quantized weights to and from other tools' checkpoint formats (GPTQ, AWQ).

Checkpoints on the Hugging Face Hub are often already quantized (AutoGPTQ / GPTQModel,
AutoAWQ). Their linear layers hold three tensors instead of a weight: ``qweight`` (the
codes packed into ``int32`` words), ``qzeros`` (the zero points, packed the same way) and
``scales``. :func:`from_gptq` and :func:`from_awq` turn them into the ``(K, N)``
(``in_features, out_features``: a Flax ``Dense`` kernel) QArray that ``qjax.quantize``
would have made for the same codes, grouped along K, so they run through
``qjax.quantized``, ``dispatch_report`` and the checkpoint functions like any other
quantized weight (the Pallas kernels take symmetric weights only: a checkpoint with zero
points, every AWQ one and GPTQ ``sym=False``, runs on XLA). The conversion is exact:
``dequantize()`` gives the tools' own ``scales * (q - zeros)`` (float32 of the stored
float16 scales).

Formats (bits of one word are a little-endian stream of ``bits``-wide values):

* GPTQ (``checkpoint_format="gptq"``, AutoGPTQ's "v1"): ``qweight`` ``(K * bits / 32, N)``
  packed along K; ``qzeros`` ``(K / group, N * bits / 32)`` packed along N, each stored
  one less than the zero point it means; ``scales`` ``(K / group, N)``; 2, 3, 4 or 8 bits.
  ``"gptq_v2"`` (GPTQModel) stores the zero points themselves.
* AWQ (AutoAWQ's ``"gemm"`` version): 4 bits; ``qweight`` ``(K, N / 8)`` and ``qzeros``
  ``(K / group, N / 8)`` packed along N in the interleaved order ``0, 2, 4, 6, 1, 3, 5, 7``
  (logical column ``j`` of a word is its nibble ``[0, 4, 1, 5, 2, 6, 3, 7][j]``).

Unsigned codes ``q`` and zero points ``z`` in ``[0, 2^bits)`` become signed codes
``q - 2^(bits-1)`` of ``IntFormat(bits)`` with zero points ``z - 2^(bits-1)`` (the same
differences). When every zero point is ``2^(bits-1)`` (a symmetric checkpoint) the QArray
is symmetric and carries no zero point, so the faster symmetric paths serve it.

:func:`to_gptq` and :func:`to_awq` go the other way, so a model quantized here (``qjax.gptq``,
``qjax.awq``, ``quantize_params``) can be served by runtimes that read those formats.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import IntFormat
from qjax.numerics.packing import pack
from qjax.numerics.qarray import QArray
from qjax.numerics.transposed import TransposedQArray

_AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column j of a word <- its nibble _AWQ_ORDER[j]


def _unpack_words(words: np.ndarray, bits: int, axis: int, count: int) -> np.ndarray:
    """The ``count`` unsigned ``bits``-wide values along ``axis`` of the little-endian bit
    stream of int32 ``words`` (value ``i`` in stream bits ``[bits i, bits (i + 1))``), as
    ``int16`` so that offsets and the v1 format's ``+ 1`` cannot wrap. Shifts of whole words
    when ``bits`` divides 32; 3-bit values straddle words and go bit by bit (a 4096 x 11008
    layer takes 1-2 s either way on 2 CPU cores, 0.9 GB peak)."""
    w = np.moveaxis(words.view(np.uint32), axis, -1)
    if 32 % bits == 0:
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        values = ((w[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.int16)
        values = values.reshape(*w.shape[:-1], -1)[..., :count]
    else:
        stream = np.unpackbits(
            np.ascontiguousarray(w).astype("<u4", copy=False).view(np.uint8), axis=-1, bitorder="little"
        )
        b = stream[..., : count * bits].reshape(*stream.shape[:-1], count, bits)
        values = sum(b[..., i].astype(np.int16) << i for i in range(bits))
    return np.moveaxis(values, -1, axis)


def _int32(name: str, a) -> np.ndarray:
    """``a`` as native-order 32-bit words (big-endian files are converted)."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu" or a.dtype.itemsize != 4:
        raise TypeError(f"{name} must hold int32 words (the packed codes), got dtype {a.dtype}")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be 2-D and non-empty, got shape {a.shape}")
    return a.astype(a.dtype.newbyteorder("="), copy=False)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")


def _groups(k: int, scales: np.ndarray, group_size: int | None) -> int:
    """The group size along K that ``scales`` ``(groups, N)`` implies (checked against
    ``group_size`` when given; ``-1`` or ``None`` with one row: per channel)."""
    rows = scales.shape[0]
    if group_size in (None, -1):
        if rows != 1 and k % rows == 0:
            return k // rows
        if rows == 1:
            return k
        raise ValueError(f"scales has {rows} rows, which do not divide K={k} into groups: pass group_size")
    _check_int("group_size", group_size)
    if rows == 1 and group_size >= k:  # a layer narrower than one group (AutoGPTQ writes one row)
        return k
    if group_size <= 0 or k % group_size or k // group_size != rows:
        raise ValueError(
            f"group_size={group_size} does not fit K={k} and scales of shape {scales.shape} "
            f"(expected {k}/{group_size} rows)"
        )
    return group_size


def _qarray(q: np.ndarray, z: np.ndarray, scales: np.ndarray, bits: int, group: int, dtype, pack_codes: bool):
    """The QArray of unsigned codes ``q`` ``(K, N)``, zero points ``z`` and ``scales``
    ``(K / group, N)``, grouped along K (per channel when ``group == K``)."""
    if np.any(z < 0) or np.any(z >= 1 << bits):
        raise ValueError(
            f"zero points outside [0, {1 << bits}) for {bits}-bit codes: the qzeros do not fit bits={bits}"
        )
    if not np.all(np.isfinite(scales)):
        raise ValueError("scales hold NaN or Inf")
    fmt = IntFormat(bits)
    mid = 1 << (bits - 1)
    codes = jnp.asarray(q - mid, fmt.storage_dtype)
    zero_point = None if np.all(z == mid) else jnp.asarray(z - mid, fmt.storage_dtype)
    return kn_grouped(codes, scales, zero_point, fmt, group, dtype, pack_codes)


def kn_grouped(codes, scales, zero_point, fmt, group: int, dtype, pack_codes: bool) -> QArray:
    """The ``(K, N)`` QArray of ``codes`` (``fmt``'s storage) with ``scales`` (and zero
    points) ``(K / group, N)``: grouped along K, per channel when ``group == K``, packed
    along N when ``pack_codes`` and the format packs."""
    k, n = codes.shape
    grouped = group != k
    packed = pack_codes and fmt.pack_bits is not None
    return QArray(
        pack(codes, fmt.pack_bits, -1) if packed else codes,
        jnp.asarray(scales, jnp.float32),
        zero_point,
        format=fmt,
        dtype=dtype,
        channel_axes=(-1,),
        group_axis=-2 if grouped else None,
        group_size=group if grouped else None,
        packed_axis=-1 if packed else None,
        packed_length=n if packed else None,
    )


def from_gptq(
    qweight,
    qzeros,
    scales,
    *,
    bits: int,
    group_size: int | None = None,
    g_idx=None,
    checkpoint_format: str = "gptq",
    dtype=jnp.float32,
    pack_codes: bool = True,
) -> QArray:
    """A GPTQ-quantized linear layer's tensors as a ``(K, N)`` :class:`QArray`.

    Args:
      qweight: int32 ``(K * bits / 32, N)``, codes packed along K.
      qzeros: int32 ``(K / group_size, N * bits / 32)``, zero points packed along N.
      scales: float ``(K / group_size, N)`` (float16 in the checkpoints).
      bits: 2, 3, 4 or 8 (``quantize_config.json``'s ``bits``).
      group_size: the checkpoint's ``group_size`` (``-1``/``None``: read from ``scales``).
      g_idx: the optional ``(K,)`` group of each input row; it must be ``row // group_size``.
      checkpoint_format: ``"gptq"`` (zero points stored minus one, AutoGPTQ) or
        ``"gptq_v2"`` (stored as they are, GPTQModel).
      dtype: the float dtype the QArray dequantizes to.
      pack_codes: store 2/3/4-bit codes two or four to a byte (``qjax.quantize``'s default).

    Returns:
      The QArray (``IntFormat(bits)``, scales per group along K and output channel, zero
      points unless the checkpoint is symmetric) whose ``dequantize()`` is
      ``scales * (q - zeros)``.

    Raises:
      ValueError: shapes that do not fit each other or ``bits``, zero points out of range,
        NaN/Inf scales, an unknown ``checkpoint_format``, or an act-order ``g_idx`` (a
        ``desc_act=True`` checkpoint, whose groups are not contiguous rows: load it with
        :func:`from_gptq_act_order`).
      TypeError: ``qweight`` / ``qzeros`` are not int32.

    Example:
      >>> t = safetensors.numpy.load_file("model.safetensors")
      >>> p = "model.layers.0.mlp.down_proj"
      >>> parts = (t[p + ".qweight"], t[p + ".qzeros"], t[p + ".scales"])
      >>> kernel = qjax.from_gptq(*parts, bits=4, group_size=128)
    """
    qweight, qzeros, scales, k, n, group = _gptq_parts(
        qweight, qzeros, scales, bits, group_size, checkpoint_format
    )
    if g_idx is not None and np.shape(g_idx) != (k,):
        raise ValueError(f"g_idx must have shape (K,) = ({k},), got {np.shape(g_idx)}")
    if g_idx is not None and not np.array_equal(np.asarray(g_idx), np.arange(k) // group):
        raise ValueError(
            "g_idx is not row // group_size: an act-order (desc_act=True) checkpoint, whose groups are not "
            "contiguous rows; load it with qjax.from_gptq_act_order (the rows sorted by group, and the "
            "permutation to apply to the layer's input)"
        )
    q, z = _gptq_codes(qweight, qzeros, bits, k, n, checkpoint_format)
    return _qarray(q, z, scales, bits, group, dtype, pack_codes)


def _gptq_parts(qweight, qzeros, scales, bits, group_size, checkpoint_format):
    """Checked ``(qweight, qzeros, scales, k, n, group)`` of a GPTQ layer."""
    _check_int("bits", bits)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ checkpoints have 2, 3, 4 or 8 bits, got bits={bits}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    qweight, qzeros = _int32("qweight", qweight), _int32("qzeros", qzeros)
    scales = np.asarray(scales, np.float32)
    if scales.ndim != 2:
        raise ValueError(f"scales must be 2-D (groups, N), got shape {scales.shape}")
    n = scales.shape[1]
    k = qweight.shape[0] * 32 // bits
    if qweight.shape[1] != n or (qweight.shape[0] * 32) % bits:
        raise ValueError(
            f"qweight of shape {qweight.shape} does not fit scales of shape {scales.shape} at {bits} bits"
        )
    group = _groups(k, scales, group_size)
    want = (scales.shape[0], -(-n * bits // 32))
    if qzeros.shape != want:
        raise ValueError(f"qzeros has shape {qzeros.shape}, expected {want} for N={n} at {bits} bits")
    return qweight, qzeros, scales, k, n, group


def _gptq_codes(qweight, qzeros, bits: int, k: int, n: int, checkpoint_format: str):
    """The unsigned codes ``(K, N)`` and zero points ``(groups, N)`` of a GPTQ layer."""
    q = _unpack_words(qweight, bits, 0, k)
    z = _unpack_words(qzeros, bits, 1, n) + (1 if checkpoint_format == "gptq" else 0)
    if checkpoint_format == "gptq" and np.any(z == 1 << bits):
        raise ValueError(
            f"qzeros hold {(1 << bits) - 1} in the 'gptq' (v1) format: a zero point of 0 stored minus "
            f"one, which AutoGPTQ's kernels read back as {1 << bits}, outside the {bits}-bit range. If "
            "the checkpoint is GPTQModel's v2 format, pass checkpoint_format='gptq_v2'"
        )
    return q, z


def from_gptq_act_order(
    qweight,
    qzeros,
    scales,
    g_idx,
    *,
    bits: int,
    group_size: int | None = None,
    checkpoint_format: str = "gptq",
    dtype=jnp.float32,
    pack_codes: bool = True,
) -> tuple[QArray, np.ndarray]:
    """An act-order (``desc_act=True``) GPTQ layer: its rows sorted by group, as a ``(K, N)``
    :class:`QArray` with contiguous groups, and the permutation of the layer's input.

    GPTQ with act-order quantizes the input rows in order of decreasing activation, so the
    rows of one scale group are scattered: ``g_idx[k]`` is row ``k``'s group. Sorting the
    rows by group (stably, as exllama's kernels do) makes every group contiguous, which a
    grouped QArray expresses; the layer then computes ``x[..., perm] @ kernel``, the same
    product: serve it with :func:`qjax.with_input_permutation`.

    Args:
      qweight, qzeros, scales, bits, group_size, checkpoint_format, dtype, pack_codes: as
        :func:`from_gptq`.
      g_idx: ``(K,)`` int, the group of each input row (the checkpoint's ``g_idx``).

    Returns:
      ``(kernel, perm)``: ``kernel.dequantize()[i]`` is the checkpoint's row ``perm[i]``
      (``scales[g] * (q - zeros[g])`` with ``g = g_idx[perm[i]]``); ``perm`` is int32 ``(K,)``.

    Raises:
      ValueError: as :func:`from_gptq`, or a ``g_idx`` whose groups do not each hold
        ``group_size`` rows (``K / groups``).

    Example:
      >>> kernel, perm = qjax.from_gptq_act_order(t[p + ".qweight"], t[p + ".qzeros"],
      ...                                         t[p + ".scales"], t[p + ".g_idx"], bits=4)
      >>> f = qjax.with_input_permutation(model.apply, {"params/down_proj/kernel": perm})
      >>> y = qjax.quantized(f, policy)(params, x)
    """
    qweight, qzeros, scales, k, n, group = _gptq_parts(
        qweight, qzeros, scales, bits, group_size, checkpoint_format
    )
    g = np.asarray(g_idx)
    if g.shape != (k,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"g_idx must be an integer array of shape (K,) = ({k},), got {g.dtype} {g.shape}")
    perm = np.argsort(g, kind="stable")
    if not np.array_equal(g[perm], np.arange(k) // group):
        counts = np.bincount(np.clip(g, 0, None), minlength=scales.shape[0])
        raise ValueError(
            f"g_idx does not give each of the {scales.shape[0]} groups {group} rows (counts "
            f"{counts[:8].tolist()}...; values in [{int(g.min())}, {int(g.max())}])"
        )
    q, z = _gptq_codes(qweight, qzeros, bits, k, n, checkpoint_format)
    return _qarray(q[perm], z, scales, bits, group, dtype, pack_codes), perm.astype(np.int32)


def from_awq(
    qweight, qzeros, scales, *, group_size: int | None = None, dtype=jnp.float32, pack_codes: bool = True
) -> QArray:
    """An AWQ-quantized (AutoAWQ ``"gemm"``, 4-bit) linear layer's tensors as a ``(K, N)``
    :class:`QArray`.

    Args:
      qweight: int32 ``(K, N / 8)``, codes packed along N in AWQ's interleaved order.
      qzeros: int32 ``(K / group_size, N / 8)``, zero points packed the same way.
      scales: float ``(K / group_size, N)``.
      group_size: the checkpoint's ``q_group_size`` (``None``: read from ``scales``).
      dtype, pack_codes: as :func:`from_gptq`.

    Returns:
      The int4 QArray whose ``dequantize()`` is ``scales * (q - zeros)``.

    Raises:
      ValueError, TypeError: as :func:`from_gptq`.
    """
    qweight, qzeros = _int32("qweight", qweight), _int32("qzeros", qzeros)
    scales = np.asarray(scales, np.float32)
    if scales.ndim != 2 or scales.shape[1] != 8 * qweight.shape[1]:
        raise ValueError(
            f"scales of shape {scales.shape} do not fit qweight of shape {qweight.shape} (N = 8 per word)"
        )
    k, n = qweight.shape[0], scales.shape[1]
    group = _groups(k, scales, group_size)
    if qzeros.shape != (scales.shape[0], n // 8):
        raise ValueError(f"qzeros has shape {qzeros.shape}, expected {(scales.shape[0], n // 8)}")
    logical = (np.arange(n).reshape(-1, 8)[:, list(_AWQ_ORDER)]).reshape(-1)  # stream position of column c
    q = _unpack_words(qweight, 4, 1, n)[:, logical]
    z = _unpack_words(qzeros, 4, 1, n)[:, logical]
    return _qarray(q, z, scales, 4, group, dtype, pack_codes)


def _pack_words(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``bits``-wide ``values`` as the little-endian bit stream of int32 words
    along ``axis`` (the inverse of :func:`_unpack_words`; a partial last word is
    zero-filled)."""
    v = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    per_word = 32 // bits
    if 32 % bits == 0:
        pad = -v.shape[-1] % per_word
        v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]).reshape(*v.shape[:-1], -1, per_word)
        words = np.bitwise_or.reduce(v << np.arange(0, 32, bits, dtype=np.uint32), axis=-1)
    else:
        bit_planes = ((v[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        stream = bit_planes.reshape(*v.shape[:-1], -1)
        stream = np.pad(stream, [(0, 0)] * (stream.ndim - 1) + [(0, -stream.shape[-1] % 32)])
        words = np.packbits(stream, axis=-1, bitorder="little").view("<u4")
    return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis)


def _exportable(
    w, bits_allowed: tuple[int, ...], what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The unsigned codes ``(K, N)``, zero points and float32 scales ``(K / group, N)`` of a
    2-D int QArray scaled per output channel and (optionally) per group along K, with its
    bits and group size."""
    if isinstance(w, TransposedQArray):
        raise ValueError(f"{what}: the weight is stored (N, K) (store_transposed); export the (K, N) QArray")
    if not isinstance(w, QArray):
        raise TypeError(f"{what} takes a QArray, got {type(w).__name__}")
    fmt = w.format
    if not isinstance(fmt, IntFormat) or not fmt.signed or fmt.bits not in bits_allowed:
        raise ValueError(f"{what} exports signed {bits_allowed}-bit integer weights, got {fmt.name}")
    k, n = w.shape if w.ndim == 2 else (None, None)
    grouped_ok = w.group_size is None or (w.group_axis == -2 and k % w.group_size == 0)
    if w.ndim != 2 or w.channel_axes != (-1,) or not grouped_ok:
        raise ValueError(
            f"{what} exports a (K, N) weight with scales per output channel (channel_axes=(-1,)) and "
            f"optionally per group along K; got shape {w.shape}, channel_axes={w.channel_axes}, "
            f"group_axis={w.group_axis}, group_size={w.group_size}"
        )
    mid = 1 << (fmt.bits - 1)
    q = np.asarray(w.unpacked_values(), np.int64) + mid
    scales = np.asarray(w.scale, np.float32).reshape(-1, n)
    z = (
        np.full(scales.shape, mid)
        if w.zero_point is None
        else np.asarray(w.zero_point, np.int64).reshape(-1, n) + mid
    )
    return q, z, scales, fmt.bits, w.group_size or k


def _fp16_scales(scales: np.ndarray, what: str) -> np.ndarray:
    """The scales as float16, the formats' dtype; refuses values it cannot hold."""
    with np.errstate(over="ignore"):  # refused below, by name
        out = scales.astype(np.float16)
    if not np.all(np.isfinite(out)) or np.any((out == 0) & (scales != 0)):
        raise ValueError(
            f"{what}: scales outside float16's range ({float(np.abs(scales).min()):.3g} to "
            f"{float(np.abs(scales).max()):.3g}) cannot be stored"
        )
    return out


def to_gptq(w: QArray, *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """A ``(K, N)`` integer :class:`QArray` as GPTQ tensors (the inverse of :func:`from_gptq`).

    Args:
      w: a signed 2/3/4/8-bit QArray of a ``(K, N)`` kernel, scales per output channel
        (``channel_axes=(-1,)``) and optionally per group along K (``group_axis=0``), with or
        without zero points (symmetric weights get the zero point ``2^(bits-1)``).
      checkpoint_format: ``"gptq"`` (v1: zero points stored minus one) or ``"gptq_v2"``.

    Returns:
      ``{"qweight", "qzeros", "scales", "g_idx"}``: int32, int32, float16 and int32 arrays
      in AutoGPTQ's shapes, and ``"bits"`` / ``"group_size"`` for ``quantize_config.json``
      (``-1``: per channel).

    Raises:
      ValueError: a format, granularity or layout the GPTQ format has no place for, scales
        float16 cannot hold, or (v1) a zero point of 0, which v1 cannot store.
      TypeError: not a QArray.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    q, z, scales, bits, group = _exportable(w, (2, 3, 4, 8), "to_gptq")
    if checkpoint_format == "gptq":
        if np.any(z == 0):
            raise ValueError("to_gptq: a zero point of 0 cannot be stored in the v1 format; use 'gptq_v2'")
        z = z - 1
    k = q.shape[0]
    return {
        "qweight": _pack_words(q, bits, 0),
        "qzeros": _pack_words(z, bits, 1),
        "scales": _fp16_scales(scales, "to_gptq"),
        "g_idx": (np.arange(k) // group).astype(np.int32),
        "bits": bits,
        "group_size": -1 if group == k else group,
    }


def to_awq(w: QArray) -> dict[str, np.ndarray]:
    """A ``(K, N)`` int4 :class:`QArray` as AutoAWQ ``"gemm"`` tensors (the inverse of
    :func:`from_awq`).

    Args:
      w: a signed 4-bit QArray of a ``(K, N)`` kernel (N a multiple of 8), scales per output
        channel and optionally per group along K.

    Returns:
      ``{"qweight", "qzeros", "scales"}`` (int32, int32, float16) and ``"group_size"``.

    Raises:
      ValueError, TypeError: as :func:`to_gptq`, and N not a multiple of 8.
    """
    q, z, scales, _, group = _exportable(w, (4,), "to_awq")
    n = q.shape[1]
    if n % 8:
        raise ValueError(f"to_awq: N={n} must be a multiple of 8 (eight columns per word)")
    stream = np.argsort(
        np.arange(n).reshape(-1, 8)[:, list(_AWQ_ORDER)].reshape(-1)
    )  # column of stream position
    return {
        "qweight": _pack_words(q[:, stream], 4, 1),
        "qzeros": _pack_words(z[:, stream], 4, 1),
        "scales": _fp16_scales(scales, "to_awq"),
        "group_size": group,
    }
