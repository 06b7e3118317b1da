"""Test configuration: 8 host devices for sharding tests, float32 defaults."""

import glob
import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere.
# The LLVM backend at -O0: the suite is dominated by compiling many small programs, and the
# optimization level changes speed, not semantics (XLA:CPU runs without fast-math either way).
# ~10-25% of the suite's time on 2 cores. QJAX_TEST_XLA_OPT=1 keeps XLA's default level.
_FAST_COMPILE = "" if os.environ.get("QJAX_TEST_XLA_OPT") == "1" else " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache per test worker and run: tests that build the same program
# (the same model, op and shapes under different function objects) compile it once. Not
# shared between the xdist workers: JAX writes entries in place, and a worker reading an
# entry another one was writing got a truncated stream (a warning, then a recompile).
# About 10% of the suite's time on 2 cores. QJAX_TEST_XLA_CACHE=0 turns it off; the
# controller process deletes the run's caches at the end.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_RUN = f"qjax-tests-xla-cache-{os.getppid() if _WORKER else os.getpid()}"
_XLA_CACHE = os.path.join(tempfile.gettempdir(), f"{_RUN}-{_WORKER or 'main'}")
if os.environ.get("QJAX_TEST_XLA_CACHE", "1") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after the environment above)
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis_budget import DEFAULT_EXAMPLES, FUZZ, FUZZ_EXAMPLES  # noqa: E402

_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# `make test` (and CI) replays the same examples every run, so a verdict depends on the code only;
# `make fuzz` (QJAX_HYPOTHESIS=fuzz) searches fresh random examples, many more per property.
settings.register_profile("qjax", max_examples=DEFAULT_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, **_COMMON)
settings.load_profile("fuzz" if FUZZ else "qjax")

assert jax.device_count() == 8, "tests/conftest.py must run before JAX is imported"


def pytest_unconfigure(config):
    if not _WORKER and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _XLA_CACHE:
        for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_RUN}-*")):
            shutil.rmtree(path, ignore_errors=True)


# The longest tests (tens of seconds each: the demo, end-to-end scripts) run first, so no
# worker is left running one alone at the end of `make test -n 2` (longest first keeps the
# two workers' finishing times close).
_LONGEST_FIRST = (
    "tests/test_cli.py::test_demo_runs_and_writes_results",
    "tests/kernels/test_bench_dry_run.py::",
    "tests/parallel/test_loop.py::test_killed_and_restarted_run_is_bit_identical",
    "tests/test_cli_compress.py::test_example_fast_config_end_to_end",
)


def pytest_collection_modifyitems(config, items):
    rank = lambda item: next((i for i, p in enumerate(_LONGEST_FIRST) if item.nodeid.startswith(p)), None)
    first = sorted((it for it in items if rank(it) is not None), key=rank)
    items[:] = first + [it for it in items if rank(it) is None]
