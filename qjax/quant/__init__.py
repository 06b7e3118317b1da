"""Quantization policies and transforms."""

from qjax.quant.footprint import Footprint, LeafFootprint, footprint
from qjax.quant.policy import Policy, Rule
from qjax.quant.transforms import (
    dequantize_params,
    fake_quant_params,
    lsq_scales,
    quantize_params,
    quantized_leaves,
)

__all__ = [
    "Footprint",
    "LeafFootprint",
    "Policy",
    "Rule",
    "dequantize_params",
    "fake_quant_params",
    "footprint",
    "lsq_scales",
    "quantize_params",
    "quantized_leaves",
]
