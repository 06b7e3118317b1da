"""Quantization policies and transforms."""

from qjax.quant.act_delayed import ActHistory, DelayedScaling
from qjax.quant.awq import AWQSearch, awq, awq_factors
from qjax.quant.batchnorm import BatchNormFoldReport, fold_batchnorm
from qjax.quant.calibrate import ActStats, Calibrator, calibrate
from qjax.quant.dispatch_report import OpDispatch, dispatch_report
from qjax.quant.footprint import Footprint, LeafFootprint, footprint
from qjax.quant.gptq import gptq, gptq_quantize, input_hessians
from qjax.quant.input_permutation import with_input_permutation
from qjax.quant.int8_training import int8_dot_general
from qjax.quant.int8_training_conv import int8_conv_general_dilated
from qjax.quant.integer_only import integer_only
from qjax.quant.interop import from_awq, from_gptq, from_gptq_act_order, to_awq, to_gptq
from qjax.quant.interop_bnb import from_bnb_4bit, to_bnb_4bit
from qjax.quant.interop_fp8 import fp8_block_spec, from_fp8_blocks, to_fp8_blocks
from qjax.quant.kv_cache import KVCache
from qjax.quant.kv_calibration import kv_cache_scales
from qjax.quant.kv_paged import PagedKVCache
from qjax.quant.lsq_params import LSQParams
from qjax.quant.ops import quantized_conv_general_dilated, quantized_dot_general, quantized_ragged_dot
from qjax.quant.policy import GradSpecs, OpRule, Policy, Rule
from qjax.quant.qat import fake_quantized
from qjax.quant.serve import quantized
from qjax.quant.smoothing import smooth, with_input_scales
from qjax.quant.smoothquant import smoothquant, smoothquant_factors
from qjax.quant.transforms import (
    dequantize_params,
    fake_quant_params,
    lsq_params,
    lsq_scales,
    quantize_params,
    quantized_leaves,
    store_transposed,
)

__all__ = [
    "KVCache",
    "PagedKVCache",
    "kv_cache_scales",
    "AWQSearch",
    "BatchNormFoldReport",
    "fold_batchnorm",
    "integer_only",
    "awq",
    "awq_factors",
    "fp8_block_spec",
    "from_awq",
    "from_bnb_4bit",
    "from_fp8_blocks",
    "from_gptq",
    "from_gptq_act_order",
    "to_awq",
    "to_bnb_4bit",
    "to_fp8_blocks",
    "to_gptq",
    "gptq",
    "gptq_quantize",
    "input_hessians",
    "smooth",
    "smoothquant",
    "smoothquant_factors",
    "with_input_permutation",
    "with_input_scales",
    "ActStats",
    "ActHistory",
    "DelayedScaling",
    "Calibrator",
    "calibrate",
    "dispatch_report",
    "OpDispatch",
    "fake_quantized",
    "quantized",
    "Footprint",
    "LeafFootprint",
    "GradSpecs",
    "OpRule",
    "Policy",
    "Rule",
    "dequantize_params",
    "fake_quant_params",
    "footprint",
    "int8_conv_general_dilated",
    "int8_dot_general",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
    "quantized_ragged_dot",
    "LSQParams",
    "lsq_params",
    "lsq_scales",
    "quantize_params",
    "quantized_leaves",
    "store_transposed",
]
