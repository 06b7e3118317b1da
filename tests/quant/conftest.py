"""Helpers shared by the quantized-execution tests."""

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
