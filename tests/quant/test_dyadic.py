"""Dyadic rescaling in 32-bit integers: exact against Python integers."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.quant.dyadic import MAX_SHIFT, dyadic, dyadic_mul, requantize


def _reference(acc: int, b: int, c: int) -> int:
    """round half up of acc · b / 2^c, in Python's unbounded integers."""
    return (acc * b + (1 << (c - 1) if c else 0)) >> c


@given(
    st.lists(
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(0, 2**15 - 1), st.integers(0, MAX_SHIFT)),
        min_size=1,
        max_size=64,
    )
)
def test_dyadic_mul_is_exact_wherever_the_result_fits(cases):
    acc, b, c = (np.array(v, np.int64) for v in zip(*cases))
    pad = lambda v: jnp.asarray(np.pad(v, (0, 64 - v.size)), jnp.int32)  # one shape: one compile
    got = np.asarray(dyadic_mul(pad(acc), pad(b), pad(c)))[: acc.size]
    for a, bb, cc, g in zip(acc.tolist(), b.tolist(), c.tolist(), got.tolist()):
        want = _reference(a, bb, cc)
        if -(2**31) <= want < 2**31:
            assert g == want, (a, bb, cc)


def test_dyadic_mul_edges():
    acc = jnp.asarray([0, -1, 1, 2**31 - 1, -(2**31), 3, -3, 65535, -65536], jnp.int32)
    for b, c in [(2**14, 14), (2**15 - 1, 46), (1, 0), (3, 1), (2**14 + 1, 16), (5, 17)]:
        got = np.asarray(dyadic_mul(acc, b, c)).tolist()
        want = [_reference(a, b, c) for a in np.asarray(acc).tolist()]
        assert [g for g, w in zip(got, want) if -(2**31) <= w < 2**31] == [
            w for w in want if -(2**31) <= w < 2**31
        ]


@given(st.floats(2.0**-30, 2.0**15 - 1, allow_nan=False))
def test_dyadic_has_fifteen_significant_bits(m):
    b, c = dyadic(m)
    assert 2**14 <= int(b) < 2**15 or int(c) == 0
    assert abs(int(b) / 2.0 ** int(c) - m) <= m * 2.0**-15


def test_dyadic_zero_tiny_and_refusals():
    b, c = dyadic(np.array([0.0, 1e-300, 1.0]))
    assert b.tolist()[0] == 0 and c.tolist()[1] == MAX_SHIFT and b.tolist()[2] / 2.0 ** c.tolist()[2] == 1.0
    with pytest.raises(ValueError, match="finite and >= 0"):
        dyadic(-1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        dyadic(np.nan)
    with pytest.raises(ValueError, match=r"2\^15"):
        dyadic(2.0**15)


def test_requantize_saturates_without_overflow():
    acc = jnp.asarray([2**31 - 1, -(2**31), 1000, -1000, 0], jnp.int32)
    got = np.asarray(requantize(acc, np.array(0.37), -128, 127)).tolist()
    b, c = dyadic(0.37)
    assert got == [127, -128, *[max(-128, min(127, _reference(a, int(b), int(c)))) for a in (1000, -1000, 0)]]
    # a multiplier above 1 (a finer target scale) still saturates rather than wrapping
    assert np.asarray(requantize(acc, np.array(300.0), 0, 255)).tolist() == [255, 0, 255, 0, 0]
