"""Number formats: ranges, storage, names; QuantSpec validation and serialisation."""

import pickle

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax.numerics import (
    PER_TOKEN,
    FloatFormat,
    IntFormat,
    QuantSpec,
    as_format,
    format_from_name,
    spec_from_dict,
)

INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@pytest.mark.parametrize("bits", INT_BITS)
def test_signed_int_ranges_and_storage(bits):
    fmt = getattr(qjax, f"int{bits}")
    assert fmt == IntFormat(bits)
    # two's complement: [-2^(b-1), 2^(b-1) - 1]
    assert (fmt.qmin, fmt.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert fmt.qmax - fmt.qmin + 1 == 2**bits
    assert fmt.bits == bits and fmt.signed and not fmt.narrow and not fmt.is_float
    assert fmt.storage_dtype == (np.int8 if bits <= 8 else np.int16)
    info = np.iinfo(fmt.storage_dtype)
    assert info.min <= fmt.qmin and fmt.qmax <= info.max
    assert fmt.name == f"int{bits}"
    assert format_from_name(fmt.name) == fmt
    assert repr(fmt) == f"qjax.int{bits}"


@pytest.mark.parametrize("bits", INT_BITS)
def test_unsigned_int_ranges_and_storage(bits):
    fmt = getattr(qjax, f"uint{bits}")
    assert (fmt.qmin, fmt.qmax) == (0, 2**bits - 1)
    assert fmt.storage_dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert np.iinfo(fmt.storage_dtype).max >= fmt.qmax
    assert fmt.name == f"uint{bits}" and format_from_name(fmt.name) == fmt


@pytest.mark.parametrize("bits", INT_BITS)
def test_narrow_range_is_symmetric(bits):
    fmt = IntFormat(bits, narrow=True)
    assert fmt.qmin == -fmt.qmax == -(2 ** (bits - 1) - 1)
    assert fmt.name == f"int{bits}_narrow"
    assert format_from_name(fmt.name) == fmt
    assert getattr(qjax, f"int{bits}").with_narrow() == fmt
    assert fmt.with_narrow(False) == IntFormat(bits)


def test_int8_narrow_is_minus127_to_127():
    fmt = format_from_name("int8_narrow")
    assert (fmt.qmin, fmt.qmax) == (-127, 127)
    # quantizing -max|x| must land on -127, never -128
    x = jnp.array([-3.0, 1.0, 3.0])
    q = qjax.quantize(x, QuantSpec(fmt))
    assert np.asarray(q.values).tolist() == [-127, 42, 127]


def test_narrow_unsigned_rejected():
    with pytest.raises(ValueError, match="narrow"):
        IntFormat(8, signed=False, narrow=True)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 15, 17, 32, 64, -4])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        IntFormat(bits)


@pytest.mark.parametrize("bits", [4.0, True, "4", None])
def test_non_int_bits_rejected(bits):
    with pytest.raises(TypeError, match="bits"):
        IntFormat(bits)


def test_numpy_int_bits_accepted():
    assert IntFormat(np.int64(4)).qmax == 7


@pytest.mark.parametrize(
    "fmt,e,m,dtype",
    [(qjax.fp8_e4m3, 4, 3, ml_dtypes.float8_e4m3fn), (qjax.fp8_e5m2, 5, 2, ml_dtypes.float8_e5m2)],
)
def test_fp8_formats(fmt, e, m, dtype):
    assert fmt.is_float and fmt.bits == 8 == 1 + e + m
    assert fmt.storage_dtype == np.dtype(dtype)
    # largest finite: e4m3fn reserves only S.1111.111 for NaN -> 1.75 * 2^8;
    # e5m2 is IEEE-like (top exponent is Inf/NaN) -> 1.75 * 2^15.
    expected = 1.75 * 2.0**8 if e == 4 else 1.75 * 2.0**15
    assert fmt.max_value == expected == float(ml_dtypes.finfo(dtype).max)
    assert (fmt.qmin, fmt.qmax) == (-expected, expected)
    assert fmt.name == f"fp8_e{e}m{m}"
    assert format_from_name(fmt.name) is fmt or format_from_name(fmt.name) == fmt
    assert fmt.pack_bits is None


@pytest.mark.parametrize("e,m", [(3, 4), (4, 4), (2, 5), (8, 7)])
def test_bad_float_format(e, m):
    with pytest.raises(ValueError, match=f"e{e}m{m}"):
        FloatFormat(e, m)


@pytest.mark.parametrize(
    "name,expected",
    [("e4m3", qjax.fp8_e4m3), ("fp8_e4m3fn", qjax.fp8_e4m3), ("e5m2", qjax.fp8_e5m2), ("uint3", qjax.uint3)],
)
def test_format_aliases(name, expected):
    assert format_from_name(name) == expected


@pytest.mark.parametrize(
    "name", ["int9", "int", "float8", "uint8_narrow", "INT8", " int8", "int8 ", "fp16", ""]
)
def test_unknown_format_names(name):
    with pytest.raises(ValueError):
        format_from_name(name)


def test_as_format():
    assert as_format(qjax.int4) is qjax.int4
    assert as_format("int4") == qjax.int4
    with pytest.raises(TypeError, match="format"):
        as_format(4)
    with pytest.raises(ValueError):
        as_format("int1")


@pytest.mark.parametrize(
    "fmt,pack_bits",
    [
        (qjax.int2, 2),
        (qjax.uint2, 2),
        (qjax.int3, 4),
        (qjax.int4, 4),
        (qjax.uint4, 4),
        (qjax.int5, None),
        (qjax.int8, None),
        (qjax.int16, None),
    ],
)
def test_pack_bits(fmt, pack_bits):
    assert fmt.pack_bits == pack_bits


def test_formats_hashable_and_frozen():
    d = {qjax.int4: 1, qjax.fp8_e4m3: 2}
    assert d[IntFormat(4)] == 1 and d[FloatFormat(4, 3)] == 2
    assert IntFormat(4) != IntFormat(4, signed=False) != IntFormat(4, narrow=True)
    with pytest.raises(Exception):  # noqa: B017  (dataclasses.FrozenInstanceError)
        qjax.int4.bits = 8


# ---------------------------------------------------------------------------------
# QuantSpec validation


def test_spec_accepts_format_name_and_defaults():
    s = QuantSpec("int4")
    assert s.format == qjax.int4 and s.bits == 4
    assert isinstance(s.calibration, qjax.calib.AbsMax)
    assert isinstance(QuantSpec(qjax.int8, symmetric=False).calibration, qjax.calib.MinMax)
    assert QuantSpec(qjax.int8, channel_axes=1).channel_axes == (1,)
    assert QuantSpec(qjax.int4).packed and not QuantSpec(qjax.int4, pack=False).packed
    assert not QuantSpec(qjax.int8).packed


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(rounding="floor"), ValueError, "rounding"),
        (dict(rounding="Nearest"), ValueError, "rounding"),
        (dict(ste="straight"), ValueError, "ste"),
        (dict(calibration="absmax"), TypeError, "calibration"),
        (dict(calibration=qjax.calib.AbsMax), TypeError, "calibration"),
        (dict(group_size=4), ValueError, "group_axis"),
        (dict(group_axis=0), ValueError, "group_size"),
        (dict(group_size=0, group_axis=0), ValueError, "group_size"),
        (dict(group_size=-2, group_axis=0), ValueError, "group_size"),
        (dict(group_size=2.0, group_axis=0), ValueError, "group_size"),
        (dict(group_size=2, group_axis=0.0), TypeError, "group_axis"),
        (dict(group_size=2, group_axis=1, channel_axes=(1,)), ValueError, "group_axis"),
        (dict(group_size=2, group_axis=0, channel_axes=PER_TOKEN), ValueError, "PER_TOKEN"),
        (dict(channel_axes=(0, 0)), ValueError, "channel_axes"),
        (dict(channel_axes=(0.0,)), TypeError, "channel_axes"),
        (dict(channel_axes="0"), TypeError, "channel_axes"),
        (dict(channel_axes=(True,)), TypeError, "channel_axes"),
        (dict(ste="lsq", symmetric=False), ValueError, "lsq"),
        (dict(pack_axis=None), TypeError, "pack_axis"),
    ],
)
def test_spec_invalid_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantSpec(qjax.int8, **kwargs)


@pytest.mark.parametrize("fmt", [qjax.fp8_e4m3, qjax.fp8_e5m2])
def test_fp8_spec_restrictions(fmt):
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(fmt, symmetric=False)
    assert QuantSpec(fmt, rounding="stochastic").rounding == "stochastic"  # supported since 2026-11-26


def test_spec_unknown_format():
    with pytest.raises(ValueError, match="bits=9"):
        QuantSpec("int9")
    with pytest.raises(TypeError):
        QuantSpec(8)


def test_spec_replace_revalidates():
    s = QuantSpec(qjax.int8, ste="lsq")
    with pytest.raises(ValueError, match="lsq"):
        s.replace(symmetric=False)
    assert s.replace(format="int4").format == qjax.int4


def test_spec_replace_symmetric_redefaults_calibration():
    # the absmax default of a symmetric spec must not survive a switch to asymmetric: it
    # would spend half of uint8's codes on [-max|x|, 0) for post-ReLU data
    assert QuantSpec(qjax.uint8).replace(symmetric=False) == QuantSpec(qjax.uint8, symmetric=False)
    assert QuantSpec(qjax.int8, symmetric=False).replace(symmetric=True) == QuantSpec(qjax.int8)
    kept = QuantSpec(qjax.uint8, calibration=qjax.calib.percentile(99.0)).replace(symmetric=False)
    assert kept.calibration == qjax.calib.percentile(99.0)
    given = QuantSpec(qjax.uint8).replace(symmetric=False, calibration=qjax.calib.absmax())
    assert given.calibration == qjax.calib.absmax()
    x = np.linspace(0.0, 1.0, 256)
    spec = QuantSpec(qjax.uint8).replace(symmetric=False)
    y = np.asarray(qjax.fake_quant(jnp.asarray(x, jnp.float32), spec), np.float64)
    s = (x.max() - x.min()) / 255  # float64 minmax reference: every code used, error <= s / 2
    assert abs(float(qjax.quantize(jnp.asarray(x, jnp.float32), spec).scale[0]) - s) <= 1e-6 * s
    assert np.max(np.abs(y - x)) <= 0.5 * s * (1 + 1e-5)


SPECS_FOR_DICT = [
    QuantSpec(qjax.int8),
    QuantSpec(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0, pad_groups=True),
    QuantSpec(qjax.uint8, symmetric=False, calibration=qjax.calib.percentile(99.5), rounding="stochastic"),
    QuantSpec(qjax.int8.with_narrow(), calibration=qjax.calib.mse(16, 0.5, 2.4), ste="lsq"),
    QuantSpec(qjax.int2, calibration=qjax.calib.fixed(-2, 3), ste="plain", pack=False, pack_axis=0),
    QuantSpec(qjax.fp8_e5m2, channel_axes=PER_TOKEN),
]


@pytest.mark.parametrize("spec", SPECS_FOR_DICT, ids=str)
def test_spec_dict_round_trip(spec):
    import json

    d = json.loads(json.dumps(spec.to_dict()))
    assert spec_from_dict(d) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_per_token_is_singleton_and_pickles():
    assert pickle.loads(pickle.dumps(PER_TOKEN)) is PER_TOKEN
    assert type(PER_TOKEN)() is PER_TOKEN
    assert QuantSpec(qjax.int8, channel_axes=PER_TOKEN).layout((2, 3, 4)).channel_axes == (-3, -2)


def test_spec_from_dict_errors():
    with pytest.raises(ValueError, match="bogus"):
        spec_from_dict({"format": "int8", "bogus": 1})
    with pytest.raises(ValueError, match="calibration"):
        spec_from_dict({"format": "int8", "calibration": {"name": "nope"}})
    with pytest.raises(ValueError, match="percentile"):
        spec_from_dict({"format": "int8", "calibration": {"name": "percentile", "q": 3}})


def test_fp4_e2m1_format():
    """OCP MX E2M1: 16 codes, values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf/NaN; the 4-bit
    pattern of each value round-trips through to_codes / from_codes (the packed fields)."""
    fmt = qjax.fp4_e2m1
    assert fmt == FloatFormat(2, 1) and fmt.is_float and fmt.bits == 4 and fmt.pack_bits == 4
    assert fmt.storage_dtype == np.dtype(ml_dtypes.float4_e2m1fn) and fmt.max_value == 6.0
    assert (fmt.name, repr(fmt)) == ("fp4_e2m1", "qjax.fp4_e2m1")
    assert format_from_name("fp4_e2m1") is fmt and format_from_name("e2m1") is fmt
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # sign | e1 e0 | m: the pattern is the index
    codes = np.arange(16, dtype=np.uint8)
    values = fmt.from_codes(jnp.asarray(codes))
    want = np.array(mags + [-m for m in mags])
    np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)), want)
    np.testing.assert_array_equal(np.asarray(fmt.to_codes(values)), codes)


def test_nf4_codebook_is_qloras_table():
    """The 16 NF4 values (QLoRA, Dettmers et al. 2023, App. E / bitsandbytes): sorted,
    -1 and 1 at the ends, 0 at code 7, 7 negative and 8 positive values."""
    v = np.asarray(qjax.nf4.values)
    assert v.shape == (16,) and np.all(np.diff(v) > 0)
    assert v[0] == -1.0 and v[-1] == 1.0 and v[7] == 0.0
    assert (v < 0).sum() == 7 and (v > 0).sum() == 8
    fmt = qjax.nf4
    assert fmt.bits == 4 and fmt.pack_bits == 4 and fmt.storage_dtype == np.uint8 and fmt.max_value == 1.0
    assert format_from_name("nf4") is fmt and as_format("nf4") is fmt and repr(fmt) == "qjax.nf4"
    with pytest.raises(ValueError, match="strictly increasing"):
        qjax.CodebookFormat("bad", (0.0, 0.0, 1.0))


@pytest.mark.parametrize("kw", [{"rounding": "stochastic"}, {"ste": "lsq"}, {"symmetric": False}])
def test_nf4_spec_refuses_what_a_codebook_cannot_do(kw):
    with pytest.raises(ValueError, match="nf4"):
        QuantSpec(qjax.nf4, **kw)


def test_new_formats_and_e8m0_scales_serialise():
    for spec in [
        qjax.mx_spec(qjax.fp4_e2m1),
        qjax.mx_spec("fp8_e4m3", block_axis=-1, channel_axes=(0,)),
        QuantSpec("nf4", channel_axes=(-1,), group_size=64, group_axis=0),
        QuantSpec(qjax.int8, scale_dtype="e8m0", calibration=qjax.calib.absmax(clip=0.8)),
    ]:
        d = spec.to_dict()
        assert spec_from_dict(d) == spec
        assert pickle.loads(pickle.dumps(spec)) == spec
    assert qjax.mx_spec(qjax.fp4_e2m1).scale_dtype == "float8_e8m0fnu"
    assert qjax.mx_spec(qjax.fp4_e2m1).group_size == 32
    with pytest.raises(ValueError, match="mx_spec"):
        QuantSpec("mxfp4")
