"""Integer codes to floats without conversion instructions, for the GPU kernels.

On Ampere and Hopper an int -> float conversion (``I2F``) or a float -> bfloat16 one
(``F2F``) runs at a quarter or less of the FMA rate, so a kernel that converts every weight
code is bound by the conversion unit, not by memory: the first W4A16 kernel streamed its
int4 weight at ~1 TB/s on an H200 for that reason. The "magic number" conversion builds the
float's bits with integer logic instead: a code biased to unsigned (``u = s + 2^(b-1)``) is
OR-ed into the mantissa of a float whose unit in the last place is 1 (``2^23`` in float32,
``128`` in bfloat16), and subtracting that float plus the bias gives ``s`` exactly.

Both helpers are plain ``jax.numpy`` bit operations: the Triton lowering turns them into
``LOP3`` / shift / one ``FFMA`` (or bfloat16 ``FMA``) per code, and the Pallas interpreter
runs them as they are, so the interpreted tests check the same arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32_MAGIC = 0x4B000000  # bits of 2.0**23: mantissa bit i is worth 2**i
_BF16_MAGIC = 0x4300  # bits of bfloat16 128.0: mantissa bit i is worth 2**i


def magic_bits(pos: int, bits: int) -> int:
    """The int32 that :func:`codes_f32` XORs into a code masked in place at bit ``pos``."""
    return ((1 << (bits - 1)) << pos) | _F32_MAGIC


def codes_f32(word: jax.Array, pos: int, bits: int, magic: jax.Array | None = None) -> jax.Array:
    """The signed ``bits``-bit code at bit ``pos`` of each int32 ``word``, as exact float32.

    Args:
      word: int32 array (for codes at bits 16 and up, pass the word shifted right by 16).
      pos: the code's lowest bit, with ``pos + bits <= 16`` (the code must land inside the
        23-bit mantissa).
      bits: 4 or 8 (two's-complement codes ``-2^(bits-1) .. 2^(bits-1) - 1``).

      magic: :func:`magic_bits` ``(pos, bits)`` as a runtime value (say, loaded from memory)
        rather than a constant: ``ptxas`` then fuses the mask and this XOR into one ``LOP3``
        (an instruction takes one immediate; with two it emits two ``LOP3``).

    Returns:
      float32 array of the codes (exact).

    The code is masked in place (no shift): the float is ``2^23 + (u << pos)``, and one
    multiply-add by ``2^-pos`` (exact: a power of two) less ``2^(23-pos) + 2^(bits-1)``
    returns the code.
    """
    if pos + bits > 16:
        raise ValueError(f"code at bit {pos} of {bits} bits: shift the word right by 16 first")
    half = 1 << (bits - 1)
    mask = ((1 << bits) - 1) << pos
    biased = (word & jnp.int32(mask)) ^ (jnp.int32(magic_bits(pos, bits)) if magic is None else magic)
    f = lax.bitcast_convert_type(biased, jnp.float32)
    return f * jnp.float32(2.0**-pos) - jnp.float32(2.0 ** (23 - pos) + half)


def nibbles_bf16(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The signed low and high nibbles of int8 bytes ``p``, as exact bfloat16.

    Each nibble, biased to unsigned, is OR-ed into the mantissa of bfloat16 128.0 and 136.0
    subtracted in bfloat16 (exact: every value involved has at most 8 significant bits).
    """
    q = p.astype(jnp.int16)
    lo = (q & jnp.int16(0xF)) ^ jnp.int16(_BF16_MAGIC | 0x8)
    hi = (lax.shift_right_logical(q, jnp.int16(4)) & jnp.int16(0xF)) ^ jnp.int16(_BF16_MAGIC | 0x8)
    bias = jnp.bfloat16(128 + 8)
    return (
        lax.bitcast_convert_type(lo, jnp.bfloat16) - bias,
        lax.bitcast_convert_type(hi, jnp.bfloat16) - bias,
    )
