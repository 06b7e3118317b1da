"""``qjax.from_gptq`` / ``qjax.from_awq``: checkpoints quantized by AutoGPTQ / GPTQModel /
AutoAWQ, packed here by an independent reference (Python integers as bit streams, AWQ's
nibble order written out), against float64 ``scales * (q - zeros)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qjax

AWQ_NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # logical column j of a word sits in nibble [j]


def _stream_words(values, bits: int) -> list[int]:
    """Values as one little-endian bit stream, cut into unsigned 32-bit words."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (bits * i)
    n_words = -(-len(values) * bits // 32)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]


def _as_int32(words) -> np.ndarray:
    return np.asarray(words, np.uint32).view(np.int32)


def pack_gptq(q, z, bits, v1=True):
    """AutoGPTQ layout: qweight ``(K bits / 32, N)`` (a stream down each column), qzeros
    ``(groups, N bits / 32)`` (a stream along each row), zero points minus one in v1."""
    n = q.shape[1]
    qweight = np.stack([_stream_words(q[:, c], bits) for c in range(n)], axis=1)
    stored = z - 1 if v1 else z
    qzeros = np.stack([_stream_words(stored[g] & ((1 << bits) - 1), bits) for g in range(z.shape[0])])
    return _as_int32(qweight), _as_int32(qzeros)


def pack_awq(q):
    """AutoAWQ "gemm": 8 columns per word along N, column j of a word in nibble ORDER[j]."""
    rows = []
    for r in q:
        words = []
        for b in range(0, len(r), 8):
            word = 0
            for j in range(8):
                word |= int(r[b + j]) << (4 * AWQ_NIBBLE_OF_COLUMN[j])
            words.append(word)
        rows.append(words)
    return _as_int32(rows)


def _data(bits, k=64, n=32, group=16, seed=0, symmetric=False):
    r = np.random.default_rng(seed)
    q = r.integers(0, 1 << bits, (k, n))
    groups = k // group
    z = np.full((groups, n), 1 << (bits - 1)) if symmetric else r.integers(0, 1 << bits, (groups, n))
    s = r.uniform(0.001, 0.02, (groups, n)).astype(np.float16)
    ref = np.repeat(s.astype(np.float64), group, 0) * (q - np.repeat(z, group, 0))
    return q, z, s, ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group", [16, 64], ids=["g16", "per-channel"])
def test_gptq_tensors_dequantize_exactly(bits, fmt, group):
    q, z, s, ref = _data(bits, group=group)
    z = np.maximum(z, 1) if fmt == "gptq" else z  # v1 stores z - 1: a zero point of 0 cannot be stored
    ref = np.repeat(s.astype(np.float64), group, 0) * (q - np.repeat(z, group, 0))
    qweight, qzeros = pack_gptq(q, z, bits, v1=fmt == "gptq")
    g_idx = np.arange(64) // group
    w = qjax.from_gptq(qweight, qzeros, s, bits=bits, group_size=group, g_idx=g_idx, checkpoint_format=fmt)
    assert w.shape == (64, 32) and w.format == qjax.IntFormat(bits)
    assert w.group_size == (None if group == 64 else group) and w.zero_point is not None
    np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float64), ref)
    again = qjax.from_gptq(qweight, qzeros, s, bits=bits, checkpoint_format=fmt)  # group read from scales
    np.testing.assert_array_equal(again.dequantize(), w.dequantize())


@pytest.mark.parametrize("bits", [4, 8])
def test_a_symmetric_checkpoint_has_no_zero_point(bits):
    q, z, s, ref = _data(bits, symmetric=True)
    w = qjax.from_gptq(*pack_gptq(q, z, bits), s, bits=bits, group_size=16)
    assert w.zero_point is None
    np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float64), ref)


@pytest.mark.parametrize("group", [16, 64])
def test_awq_tensors_dequantize_exactly(group):
    q, z, s, ref = _data(4, group=group, seed=3)
    w = qjax.from_awq(pack_awq(q), pack_awq(z), s, group_size=group)
    np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float64), ref)
    unpacked = qjax.from_awq(pack_awq(q), pack_awq(z), s, pack_codes=False)
    assert unpacked.packed_axis is None and unpacked.values.dtype == jnp.int8
    np.testing.assert_array_equal(unpacked.dequantize(), w.dequantize())


def test_an_imported_kernel_serves_like_a_quantized_one():
    """A Flax ``Dense`` kernel replaced by the imported QArray: ``qjax.quantized`` serves it
    (grouped weight-only int4 with zero points) equal to ``x @ dequantize()``."""
    q, z, s, _ = _data(4, k=64, n=32, group=16, seed=5)
    z = np.maximum(z, 1)  # v1 cannot store a zero point of 0
    ref = np.repeat(s.astype(np.float64), 16, 0) * (q - np.repeat(z, 16, 0))
    model = nn.Dense(32, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (3, 64))
    v = model.init(jax.random.key(1), x)
    v["params"]["kernel"] = qjax.from_gptq(*pack_gptq(q, z, 4), s, bits=4, group_size=16)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=16, group_axis=0, symmetric=False)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=spec)])
    y = jax.jit(qjax.quantized(model.apply, policy))(v, x)
    want = np.asarray(x, np.float64) @ ref
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bad_tensors_are_refused_by_name():
    q, z, s, _ = _data(4)
    qweight, qzeros = pack_gptq(q, np.maximum(z, 1), 4)
    with pytest.raises(ValueError, match="act-order"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, g_idx=np.random.default_rng(0).permutation(64) // 16)
    with pytest.raises(ValueError, match="2, 3, 4 or 8 bits"):
        qjax.from_gptq(qweight, qzeros, s, bits=5)
    with pytest.raises(ValueError, match="qweight of shape"):
        qjax.from_gptq(qweight, qzeros, s[:, :16], bits=4)
    with pytest.raises(ValueError, match="group_size=32 does not fit"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, group_size=32)
    with pytest.raises(ValueError, match="qzeros has shape"):
        qjax.from_gptq(qweight, qzeros[:, :2], s, bits=4)
    with pytest.raises(TypeError, match="qweight must hold int32"):
        qjax.from_gptq(qweight.astype(np.int64), qzeros, s, bits=4)
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v2'"):  # a v2 checkpoint read as v1: 15 + 1
        qjax.from_gptq(*pack_gptq(q, np.full_like(z, 15), 4, v1=False), s, bits=4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, checkpoint_format="exllama")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qjax.from_awq(pack_awq(q), pack_awq(z), np.full_like(s, np.inf))
    with pytest.raises(ValueError, match="do not fit qweight"):
        qjax.from_awq(pack_awq(q), pack_awq(z), s[:, :8])


def test_the_v1_zero_point_of_zero_is_refused_at_8_bits_too():
    """Stored 255 + 1 = 256 must not wrap to 0 in 8-bit arithmetic."""
    q, z, s, _ = _data(8)
    z[0, 0] = 0  # stored as -1 & 0xFF = 255
    with pytest.raises(ValueError, match="read back as 256"):
        qjax.from_gptq(*pack_gptq(q, z, 8), s, bits=8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_to_gptq_writes_what_the_reference_packer_writes_and_reads_back(bits, fmt):
    q, z, s, _ = _data(bits, seed=7)
    z = np.maximum(z, 1)
    w = qjax.from_gptq(*pack_gptq(q, z, bits, v1=fmt == "gptq"), s, bits=bits, checkpoint_format=fmt)
    out = qjax.to_gptq(w, checkpoint_format=fmt)
    qweight, qzeros = pack_gptq(q, z, bits, v1=fmt == "gptq")
    np.testing.assert_array_equal(out["qweight"], qweight)
    np.testing.assert_array_equal(out["qzeros"], qzeros)
    np.testing.assert_array_equal(out["scales"], s)
    assert out["bits"] == bits and out["group_size"] == 16 and out["scales"].dtype == np.float16
    np.testing.assert_array_equal(out["g_idx"], np.arange(64) // 16)


@pytest.mark.parametrize(
    "spec",
    [
        qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0, symmetric=False),
        qjax.QuantSpec(qjax.int4, channel_axes=(-1,)),
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,), group_size=32, group_axis=0),
        qjax.QuantSpec(qjax.int3, channel_axes=(-1,), group_size=32, group_axis=0, symmetric=False),
    ],
    ids=["int4-g32-asym", "int4-channel", "int8-g32", "int3-g32-asym"],
)
def test_a_qjax_quantized_kernel_exports_and_imports_unchanged(spec):
    """``quantize`` -> ``to_gptq`` -> ``from_gptq`` keeps the codes and zero points; the
    scales come back rounded to float16 (the format's dtype)."""
    w = jax.random.normal(jax.random.key(0), (96, 40)) * 0.05
    qa = qjax.quantize(w, spec)
    back = qjax.from_gptq(
        **{k: v for k, v in qjax.to_gptq(qa, checkpoint_format="gptq_v2").items() if k != "g_idx"},
        checkpoint_format="gptq_v2",
    )
    np.testing.assert_array_equal(back.unpacked_values(), qa.unpacked_values())
    if qa.zero_point is not None:
        np.testing.assert_array_equal(back.zero_point, qa.zero_point)
    np.testing.assert_array_equal(back.scale, np.asarray(qa.scale).astype(np.float16).astype(np.float32))
    if spec.format == qjax.int4 and spec.group_size:
        awq = qjax.to_awq(qa)
        again = qjax.from_awq(awq["qweight"], awq["qzeros"], awq["scales"], group_size=awq["group_size"])
        np.testing.assert_array_equal(again.dequantize(), back.dequantize())
        np.testing.assert_array_equal(
            awq["qweight"], pack_awq(np.asarray(qa.unpacked_values(), np.int64) + 8)
        )


def test_exports_refuse_what_the_formats_cannot_hold():
    w = jax.random.normal(jax.random.key(0), (64, 16))
    with pytest.raises(ValueError, match="signed"):
        qjax.to_gptq(qjax.quantize(w, qjax.QuantSpec(qjax.uint4, channel_axes=(-1,), symmetric=False)))
    with pytest.raises(ValueError, match="channel_axes"):
        qjax.to_gptq(qjax.quantize(w, qjax.QuantSpec(qjax.int4, channel_axes=(0,))))
    with pytest.raises(ValueError, match=r"fp8|integer"):
        qjax.to_gptq(qjax.quantize(w, qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,))))
    with pytest.raises(TypeError, match="takes a QArray"):
        qjax.to_awq(w)
    with pytest.raises(ValueError, match="stored \\(N, K\\)"):
        qjax.to_gptq(
            qjax.store_transposed(
                {"kernel": qjax.quantize(w, qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))}, "kernel"
            )["kernel"]
        )
    with pytest.raises(ValueError, match="float16"):
        qjax.to_gptq(qjax.quantize(w * 1e9, qjax.QuantSpec(qjax.int8, channel_axes=(-1,))))
    with pytest.raises(ValueError, match="multiple of 8"):
        qjax.to_awq(qjax.quantize(w[:, :12], qjax.QuantSpec(qjax.int4, channel_axes=(-1,))))


def test_review_edge_cases():
    """A layer narrower than one group (AutoGPTQ writes one row of scales), big-endian words,
    and clear errors for a misshapen g_idx or non-integer arguments."""
    q, z, s, _ = _data(4, k=64, group=64)
    z = np.maximum(z, 1)
    qweight, qzeros = pack_gptq(q, z, 4)
    narrow = qjax.from_gptq(qweight, qzeros, s, bits=4, group_size=128, g_idx=np.zeros(64, np.int32))
    np.testing.assert_array_equal(
        narrow.dequantize(), qjax.from_gptq(qweight, qzeros, s, bits=4).dequantize()
    )
    swapped = qjax.from_gptq(qweight.astype(">i4"), qzeros.astype(">i4"), s, bits=4)
    np.testing.assert_array_equal(swapped.dequantize(), narrow.dequantize())
    with pytest.raises(ValueError, match=r"g_idx must have shape \(K,\)"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, g_idx=np.zeros(32, np.int32))
    with pytest.raises(TypeError, match="group_size must be an int"):
        qjax.from_gptq(qweight, qzeros, s, bits=4, group_size=64.0)
    with pytest.raises(TypeError, match="bits must be an int"):
        qjax.from_gptq(qweight, qzeros, s, bits=4.0)
    with pytest.raises(ValueError, match="non-empty"):
        qjax.from_gptq(qweight[:0], qzeros, s[:0], bits=4)
