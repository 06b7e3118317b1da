"""Helpers shared by the quantized-execution tests."""

import jax
import jax.extend
import jax.numpy as jnp
import pytest


def _integer_ops(jaxpr, primitive: str) -> int:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive and eqn.params.get("preferred_element_type") == jnp.int32:
            n += 1
        n += sum(_integer_ops(sub, primitive) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return n


@pytest.fixture
def integer_ops():
    """``integer_ops(jaxpr, primitive="dot_general")``: the calls of ``primitive`` with int32
    accumulation in a (closed) jaxpr, the bodies of calls and loops counted per call."""
    return lambda jaxpr, primitive="dot_general": _integer_ops(jaxpr, primitive)


def _assert_integer_program(program, *args):
    """Everything computed from an integer matmul's result stays on integers until the
    output's dequantization: no float rescale, no transcendental function in float."""
    closed = jax.make_jaxpr(program)(*args)
    derived: set = set()
    live = lambda v: not isinstance(v, jax.extend.core.Literal) and v in derived
    matmuls = 0

    def walk(jaxpr):
        nonlocal matmuls
        for e in jaxpr.eqns:
            for sub in (v for v in e.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")):
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                inner = inner if hasattr(inner, "eqns") else inner.jaxpr
                derived.update(iv for iv, ov in zip(inner.invars, e.invars) if live(ov))
                walk(inner)
                derived.update(ov for ov, iv in zip(e.outvars, inner.outvars) if live(iv))
            is_int_matmul = e.primitive.name in ("dot_general", "conv_general_dilated") and jnp.issubdtype(
                e.outvars[0].aval.dtype, jnp.integer
            )
            matmuls += is_int_matmul
            if not (is_int_matmul or any(live(v) for v in e.invars)):
                continue
            for v in e.outvars:
                derived.add(v)
                if jnp.issubdtype(v.aval.dtype, jnp.floating):  # only the output's dequantization
                    assert e.primitive.name in ("convert_element_type", "mul"), e

    walk(closed.jaxpr)
    assert matmuls


@pytest.fixture
def integer_program():
    """``integer_program(program, *args)`` asserts that everything ``program`` computes from
    an integer matmul's result stays on integers until the output's dequantization (no float
    rescale, no transcendental function in float), and that it has an integer matmul."""
    return _assert_integer_program
