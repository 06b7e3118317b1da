"""Bit-exactness against ap_fixed casts computed by an independent implementation
(``tests/data/fixed_point_golden.npz``, copied from the shared reference data)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import fixed as qf

GOLDEN = pathlib.Path(__file__).parent.parent / "data" / "fixed_point_golden.npz"
ROUNDINGS = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
OVERFLOWS = ("WRAP", "SAT")


def _cases():
    with np.load(GOLDEN) as d:
        keys = sorted(d.keys())
    return sorted({k.split("/")[0] for k in keys})


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as d:
        return {k: d[k] for k in d.keys()}


def _formats(case):
    ws, is_, w, i = map(int, re.fullmatch(r"src(\d+)_(-?\d+)_dst(\d+)_(-?\d+)", case).groups())
    return qf.Format(ws, is_), (w, i)


def test_golden_file_holds_every_mode_pair(golden):
    cases = _cases()
    assert len(cases) >= 5
    for case in cases:
        for r in ROUNDINGS:
            for o in OVERFLOWS:
                assert f"{case}/{r}/{o}" in golden


@pytest.mark.parametrize("case", _cases())
def test_integer_cast_is_bit_exact(golden, case):
    src, (w, i) = _formats(case)
    fx = qf.FixedArray(jnp.asarray(golden[f"{case}/in"], jnp.int32), src)
    cast = jax.jit(qf.cast, static_argnums=1)
    for r in ROUNDINGS:
        for o in OVERFLOWS:
            got = np.asarray(cast(fx, qf.Format(w, i, rounding=r, overflow=o)).mantissa)
            np.testing.assert_array_equal(got, golden[f"{case}/{r}/{o}"], err_msg=f"{case} {r} {o}")


@pytest.mark.parametrize("case", _cases())
def test_from_float_is_bit_exact(golden, case):
    """The source values are exact in float32 (<= 24 bits), so rounding them from float
    must give the same mantissas."""
    src, (w, i) = _formats(case)
    x = qf.FixedArray(jnp.asarray(golden[f"{case}/in"], jnp.int32), src).to_float()
    for r in ROUNDINGS:
        for o in OVERFLOWS:
            got = np.asarray(qf.from_float(x, qf.Format(w, i, rounding=r, overflow=o)).mantissa)
            np.testing.assert_array_equal(got, golden[f"{case}/{r}/{o}"], err_msg=f"{case} {r} {o}")
