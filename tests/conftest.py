"""Test configuration: 8 host devices for sharding tests, float32 defaults."""

import os

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from hypothesis import HealthCheck, settings
from hypothesis_budget import DEFAULT_EXAMPLES, FUZZ, FUZZ_EXAMPLES

_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# `make test` (and CI) replays the same examples every run, so a verdict depends on the code only;
# `make fuzz` (QJAX_HYPOTHESIS=fuzz) searches fresh random examples, many more per property.
settings.register_profile("qjax", max_examples=DEFAULT_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, **_COMMON)
settings.load_profile("fuzz" if FUZZ else "qjax")

assert jax.device_count() == 8, "tests/conftest.py must run before JAX is imported"
