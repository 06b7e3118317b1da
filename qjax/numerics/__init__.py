"""Number formats, scales, calibration, rounding, ``quantize``/``dequantize``,
``QArray``, packing and ``fake_quant``."""

from qjax.numerics import calibration
from qjax.numerics.fake_quant import fake_quant, lsq_init_scale
from qjax.numerics.formats import (
    FloatFormat,
    Format,
    IntFormat,
    as_format,
    format_from_name,
    fp8_e4m3,
    fp8_e5m2,
    int2,
    int3,
    int4,
    int5,
    int6,
    int7,
    int8,
    int16,
    uint2,
    uint3,
    uint4,
    uint5,
    uint6,
    uint7,
    uint8,
    uint16,
)
from qjax.numerics.granularity import Layout
from qjax.numerics.packing import pack, unpack
from qjax.numerics.qarray import QArray, is_qarray
from qjax.numerics.quantize import compute_scale, dequantize, quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec, spec_from_dict
from qjax.numerics.transposed import TransposedQArray, is_quantized, transpose_storage

__all__ = [
    "PER_TOKEN",
    "FloatFormat",
    "Format",
    "IntFormat",
    "Layout",
    "QArray",
    "QuantSpec",
    "TransposedQArray",
    "as_format",
    "calibration",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "format_from_name",
    "fp8_e4m3",
    "fp8_e5m2",
    "int16",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "int8",
    "is_qarray",
    "is_quantized",
    "lsq_init_scale",
    "pack",
    "quantize",
    "spec_from_dict",
    "transpose_storage",
    "uint16",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "uint8",
    "unpack",
]
