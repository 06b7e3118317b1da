"""Quantized primitive operations: ``dot_general`` and ``conv_general_dilated`` whose
operands are :class:`qjax.QArray` s (typically weights) or float arrays quantized on the
fly by a :class:`qjax.QuantSpec` (typically activations, dynamically or with a static
calibrated scale). The graph layer calls these when it rewrites an op that reads a
quantized parameter.

* :func:`quantized_dot_general` (``qjax.quant.ops_dot``, machinery in
  ``qjax.quant.ops_dot_core``)
* :func:`quantized_conv_general_dilated` (``qjax.quant.ops_conv``)
* :func:`quantized_ragged_dot` (``qjax.quant.ops_ragged``: ``lax.ragged_dot`` of
  mixture-of-experts layers with a quantized expert weight; XLA only)

Both are pure, jitted (the op's static configuration is hashed), work under ``jax.jit``,
``jax.vmap`` (including over stacked QArrays) and ``jax.grad``/``jax.jvp`` w.r.t. float
operands: the derivative is straight-through the on-the-fly quantizer, exactly as
``qjax.fake_quant`` with the spec's ``ste`` (so clipped values get no gradient), times
the other operand's dequantized (or fake-quantized) value. QArray operands, scales and
zero points get no derivative (QAT uses ``fake_quant`` separately).

Scales must factor out of the sum: an operand's scale may vary along a contracting axis
only per group (``group_axis`` on that axis); anything else raises ``ValueError``.
Unsigned formats are shifted to signed codes (``u - 2**(bits-1)``) with the shift moved
into the zero point, so every integer contraction runs on int8 (int16 for 16-bit).

Formulations (``method=``)
--------------------------

``"int"``: ``lax.dot_general(qa, qb, preferred_element_type=int32)`` on int8 codes;
  zero points by ``(qa - za)(qb - zb) = qa.qb - za.Sum(qb) - zb.Sum(qa) + K.za.zb`` in
  int32; then ``acc * sa * sb`` in float32 with both scales broadcast onto the output.
  Per-group scales along the contraction and int32 overflow (``max|q_a| * max|q_b| * K
  >= 2**31``, checked statically from the formats, zero points included) both cut the
  contraction into blocks; the scaled float32 partials are summed. Blocks run as one
  plain dot each (unrolled, up to 64; a batched dot with the blocks as batch axis was
  1.3x slower at batch 16 and 2.6x at batch 256 on XLA:CPU), beyond that as a batch
  axis. A single row is padded with a zero row: XLA:CPU runs a one-row int8 dot through
  a path that first widens the whole weight to int32 (0.22 ms vs 0.09 ms with two rows
  for 1024x1024).
``"split"`` (float activation x integer weight, few rows): the activation is cut into
  three int8 pieces with per-token scales ``s, s/254, s/254**2`` (piece 0 is
  ``quantize(x, int8 per token)``, each next piece quantizes the remaining error with a
  static scale), which reconstructs ``x`` to ~2**-24 of each token's absmax; the pieces
  run as extra rows of the integer path. Measured error 1-2e-7 relative (the float32
  dequantize path: 6-8e-7). Not for float64 activations.
``"convert"``: codes (minus zero points) converted to a float dtype in which they are
  exact (bfloat16 for <= 8-bit codes and fp8 when the other operand is bfloat16 or
  quantized too, else float32), one float dot with float32 accumulation, scales applied
  to the output, blocks as above. With two integer operands the blocks are capped so
  every partial sum stays below 2**24, so the integer part is exact here too.
``"dequant"``: ``QArray.dequantize()`` then a float dot.

Packed int4/int2 weights are never interleave-unpacked (``qjax.numerics.unpack`` costs
more than the whole float32 matvec for a 1024x1024 int4 weight): each bit field is
sign-extended by two int8 shifts (packed axis free: outputs interleaved, which is cheap;
packed axis contracted: the other operand is strided). The fields are concatenated and
contracted as one dot, unless the contraction is cut into group blocks anyway, where
each field runs on its own (the concatenated copy then costs more than the dots it
saves).

fp8: XLA:CPU accepts an fp8 x fp8 ``dot_general`` with float32 accumulation but converts
both operands to float32 internally (2.7 ms vs 1.4 ms through bfloat16 for 256x1024 @
1024x1024); fp8 codes are exact in bfloat16, so fp8 uses ``"convert"``.

Conv: the weight scale may vary along the output-feature dimension (per channel, or
groups along it), the input's along the batch dimension (``PER_TOKEN``) only. XLA:CPU
supports ``conv_general_dilated`` on int8 with int32 accumulation (checked: exact, and
0.84x float32 for a 3x3 64->64 conv on 8x32x32); depthwise / grouped convs work
(``feature_group_count``), at 1.1-1.2x float32 for all formulations (XLA:CPU's depthwise
conv is slow in every dtype). Zero points: ``conv(qx, qw) - zx.conv(1, qw)`` (the ones
input has batch 1; zero padding makes padded positions count as real zeros) and
``- zw.conv(qx, 1)``. Overflow: input features cut into chunks (``feature_group_count
== 1``), else float32 accumulation. A pointwise conv (1x1 kernel, no padding, no input
dilation, no groups) runs as a ``quantized_dot_general`` instead
(``qjax.quant.ops_conv_pointwise``): the same sums, the dot's formulations and kernels,
and a kernel grouped along its input features (which no conv form can factor) is
accepted there (``experiments/bench_pointwise_conv.py``).

``method="auto"`` (measured by ``experiments/bench_ops.py``, results in
``experiments/results/bench_ops.md``: x (batch, 1024) @ w (1024, 1024) on a 2-core
AVX-512 x86 CPU, XLA:CPU, jax 0.10.2, 2026-11-26 03:13, load 2.4-3.1; time / float32 ``x @ w``
time, paired; +-15% run to run, and up to 1.5x on one-row calls between runs minutes
apart on this shared machine; W8 = int8 per channel, W4 = int4 per channel packed,
g128 = groups of 128 along K):

=========================  =======  =======  =======  =======
batch                       1        4        16       256
=========================  =======  =======  =======  =======
float32 x @ w (ms)          0.097    0.097    0.171    1.268
W8A8 int8 per token: int    0.98     0.90     0.74     0.72
W4A8: int                   2.18     1.67     1.22     0.76
W4 g128 A8: int             1.78     1.70     1.85     0.97
W8, f32 activation          1.01 s   1.31 s   1.55 d   1.14 d
W4, f32 activation          2.43 s   1.94 s   1.96 c   1.12 c
W4 g128, f32 activation     2.10 s   1.71 c   1.53 c   1.19 d
W8, bf16 activation         1.07 s   1.54 s   1.46 c   0.66 c
W4, bf16 activation         2.32 s   2.00 s   1.32 c   0.64 c
W4 g128, bf16 activation    2.16 s   1.72 c   1.15 c   1.15 d
naive dequantize, then dot  3.22 (W8) / 4.24 (W4) / 3.78 (W4 g128) at batch 1
=========================  =======  =======  =======  =======

(s = split, c = convert, d = dequant.) Hence: two integer operands -> ``"int"``; a float
activation (no spec) x integer weight -> ``"split"`` up to 4 rows (1 row for packed
weights with groups), else ``"dequant"`` for a float32 activation and an unpacked weight (the
converted float32 weight is materialized either way and XLA:CPU does not fuse the
convert into the dot), else ``"convert"`` (bfloat16 activations use XLA:CPU's bfloat16
kernel: exact products, float32 sums); fp8 or mixed float/fp8 -> ``"convert"``. With two
integer operands at batch >= 16, ``"convert"`` is 5-20% faster still on this CPU and
equally exact, but ``"int"`` stays the default: the serving path runs integer matmuls
(and int8 is the fast path on accelerators).
"""

from qjax.quant.ops_conv import quantized_conv_general_dilated
from qjax.quant.ops_dot import quantized_dot_general
from qjax.quant.ops_ragged import quantized_ragged_dot

__all__ = ["quantized_conv_general_dilated", "quantized_dot_general", "quantized_ragged_dot"]
