"""Fixed-point arithmetic with ``ap_fixed<W, I, Q, O>`` semantics.

* formats and casts: :class:`Format` (7 deterministic rounding modes plus stochastic,
  WRAP/SAT/SAT_ZERO/SAT_SYM overflow), :class:`FixedArray` (integer mantissas, static
  format), :func:`from_float`, :func:`to_float`, :func:`cast` (integer shifts and masks);
* arithmetic: exact :func:`add`/:func:`sub`/:func:`mul` then a cast, :func:`requantize`
  (integer multiplier and shift per channel), :func:`dot_general`/:func:`matmul`/
  :func:`conv_general_dilated` with a derived, checked accumulator;
* activations (:mod:`qjax.fixed.activations`): table-based sigmoid/tanh/softmax as
  hls4ml builds them, hard sigmoid/tanh, ReLU, clip;
* networks: :func:`fixed_point` (inference of any ``f(params, *args)`` with the
  matmuls/convs of matched params in fixed point, and with ``ops=`` rules of
  :class:`OpFormats` its merges and sigmoid/tanh as hls4ml types them), :func:`fake_fixed_point` and
  :func:`fixed_updates` (training), :func:`collect_ranges`/:func:`calibrate_formats`
  (formats from calibration statistics).

Example:
  >>> fmt = qjax.fixed.Format(width=16, integer=6, rounding="RND_CONV", overflow="SAT")
  >>> fx = qjax.fixed.from_float(x, fmt)
  >>> fy = qjax.fixed.cast(fx, qjax.fixed.Format(8, 3, rounding="TRN", overflow="WRAP"))
"""

from qjax.fixed import activations
from qjax.fixed.activations import Table, clip, hard_sigmoid, hard_tanh, relu, sigmoid, softmax, tanh
from qjax.fixed.arith import add, constant, mul, neg, quantize_multiplier, requantize, sub, where
from qjax.fixed.array import FixedArray, is_fixed, to_float
from qjax.fixed.calibration import (
    OpRange,
    calibrate_formats,
    collect_grad_ranges,
    collect_ranges,
    format_for_range,
    integer_bits,
)
from qjax.fixed.cast import cast, cast_mantissa, from_float, shift_right_round
from qjax.fixed.elementwise import OpFormats
from qjax.fixed.format import (
    DETERMINISTIC_ROUNDING,
    MAX_EXPONENT,
    MAX_WIDTH,
    OVERFLOW_MODES,
    ROUNDING_MODES,
    Format,
    exact_add_format,
    exact_mul_format,
    exact_sub_format,
)
from qjax.fixed.linalg import accumulator_format, conv_general_dilated, dot_general, matmul
from qjax.fixed.network import LayerFormats, fixed_params, fixed_point, unused_rules
from qjax.fixed.training import (
    FixedUpdatesState,
    fake_fixed,
    fake_fixed_point,
    fixed_updates,
    quantize_grad,
)

__all__ = [
    "DETERMINISTIC_ROUNDING",
    "MAX_EXPONENT",
    "MAX_WIDTH",
    "OVERFLOW_MODES",
    "ROUNDING_MODES",
    "FixedArray",
    "FixedUpdatesState",
    "Format",
    "LayerFormats",
    "OpFormats",
    "OpRange",
    "Table",
    "accumulator_format",
    "activations",
    "add",
    "calibrate_formats",
    "cast",
    "cast_mantissa",
    "clip",
    "collect_grad_ranges",
    "collect_ranges",
    "constant",
    "conv_general_dilated",
    "dot_general",
    "exact_add_format",
    "exact_mul_format",
    "exact_sub_format",
    "fake_fixed",
    "fake_fixed_point",
    "fixed_params",
    "fixed_point",
    "fixed_updates",
    "format_for_range",
    "from_float",
    "hard_sigmoid",
    "hard_tanh",
    "integer_bits",
    "is_fixed",
    "matmul",
    "mul",
    "neg",
    "quantize_grad",
    "quantize_multiplier",
    "relu",
    "requantize",
    "shift_right_round",
    "sigmoid",
    "softmax",
    "sub",
    "tanh",
    "to_float",
    "unused_rules",
    "where",
]
