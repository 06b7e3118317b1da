"""Pallas kernels for low-bit matmul (GPU: Triton backend, plus Mosaic GPU ``wgmma`` kernels
for Hopper -- W8A8, and weight-only at a few rows; TPU: Mosaic), the XLA
formulation they reproduce, block-size tuning tables, and the dispatch that
``qjax.quantized`` uses (``backend=``).

* :func:`int8_matmul` -- W8A8, int8 x int8 -> int32 with the rescale fused.
* :func:`w4a16_matmul`, :func:`w8a16_matmul` -- weight-only int4 / int8 with per-channel
  or per-group scales, bfloat16 activations, float32 accumulation.
* :func:`pack_int4` -- int4 codes into the kernel-native ``"k_halves"`` layout.
"""

from qjax.kernels._common import LAYOUTS, BlockConfig, dequantize_weight, pack_int4, unpack_codes
from qjax.kernels.api import int8_matmul, w4a16_matmul, w8a16_matmul

__all__ = [
    "LAYOUTS",
    "BlockConfig",
    "dequantize_weight",
    "int8_matmul",
    "pack_int4",
    "unpack_codes",
    "w4a16_matmul",
    "w8a16_matmul",
]
