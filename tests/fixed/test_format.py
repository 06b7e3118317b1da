"""``Format``: validation, derived quantities, hashing, parsing, and clear errors."""

import jax
import jax.numpy as jnp
import pytest

from qjax import fixed as qf


def test_fields_and_derived_quantities():
    f = qf.Format(width=16, integer=6, rounding="RND_CONV", overflow="SAT")
    assert (f.fraction, f.lsb) == (10, 2.0**-10)
    assert (f.min_mantissa, f.max_mantissa) == (-(2**15), 2**15 - 1)
    assert f.min_value == -32.0 and f.max_value == 32.0 - 2.0**-10
    u = qf.Format(8, 2, signed=False)
    assert (u.min_mantissa, u.max_mantissa, u.max_value) == (0, 255, 255 / 64)
    assert (u.rounding, u.overflow) == ("TRN", "WRAP")  # ap_fixed defaults


def test_negative_and_large_integer_bits():
    assert qf.Format(8, -2).fraction == 10 and qf.Format(8, -2).max_value == 127 / 1024
    assert qf.Format(4, 10).fraction == -6 and qf.Format(4, 10).lsb == 64.0


def test_hashable_static_and_mode_aliases():
    a = qf.Format(8, 3, rounding="ap_rnd_conv", overflow="AP_SAT")
    b = qf.Format(8, 3, rounding="RND_CONV", overflow="SAT")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    fx = qf.from_float(jnp.ones(3), a)
    leaves, treedef = jax.tree.flatten(fx)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.int32
    assert jax.tree.unflatten(treedef, leaves).format == a
    out = jax.jit(lambda f: qf.cast(f, qf.Format(6, 2)))(fx)
    assert out.format == qf.Format(6, 2)


def test_parse_and_str_round_trip():
    f = qf.Format(12, 4, signed=False, rounding="RND", overflow="SAT_SYM")
    assert str(f) == "ap_ufixed<12,4,AP_RND,AP_SAT_SYM>"
    assert qf.Format.parse(str(f)) == f
    assert qf.Format.parse("ap_fixed<16,6>") == qf.Format(16, 6)
    with pytest.raises(ValueError, match="cannot parse"):
        qf.Format.parse("int8")


@pytest.mark.parametrize("width", [0, -3, 64, 100])
def test_bad_width(width):
    with pytest.raises(ValueError, match=f"width must be between 1 and 63 bits, got width={width}"):
        qf.Format(width, 1)


def test_integer_larger_than_allowed():
    with pytest.raises(ValueError, match="integer=200 is larger than the allowed 126"):
        qf.Format(8, 200)
    with pytest.raises(ValueError, match="fraction bits; at most 126"):
        qf.Format(8, -130)


def test_non_integer_fields():
    with pytest.raises(TypeError, match="width must be an int"):
        qf.Format(8.0, 2)
    with pytest.raises(TypeError, match="integer must be an int"):
        qf.Format(8, True)


@pytest.mark.parametrize("field", ["rounding", "overflow"])
def test_unknown_mode_names_the_mode(field):
    with pytest.raises(ValueError, match=f"unknown {field} mode 'RND_BANANA'"):
        qf.Format(8, 2, **{field: "RND_BANANA"})


def test_wide_format_without_x64_is_a_clear_error():
    f = qf.Format(40, 10)
    with pytest.raises(ValueError, match="needs 64-bit integers, but jax_enable_x64 is off"):
        qf.from_float(jnp.ones(2), f)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        qf.cast(qf.from_float(jnp.ones(2), qf.Format(8, 2)), f)


def test_wide_format_with_x64():
    with jax.enable_x64(True):
        f = qf.Format(48, 24, rounding="RND_CONV", overflow="SAT")
        fx = qf.from_float(jnp.asarray([1.5, -1e6, 1e9], jnp.float64), f)
        assert fx.mantissa.dtype == jnp.int64
        assert fx.to_float(jnp.float64).tolist() == [1.5, -1e6, f.max_value]
