# Self-sufficient targets: each creates .venv with the Python found on PATH and installs
# what it needs. Override the interpreter with `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: demo test fuzz lint bench clean precheck-gpu

# The GPU machines run jax 0.11.2 (Python >= 3.12), whose Pallas Triton lowering rejects
# things 0.10 accepts. Before spending device time: the kernel tests (interpret mode and
# CUDA lowering) under that version, in .venv-gpu (make precheck-gpu PYTHON_GPU=python3.12).
PYTHON_GPU ?= python3.12
GPU_JAX ?= 0.11.2

$(VENV)/.stamp-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.stamp-experiments
	$(PY) -m qjax.cli demo

test: $(VENV)/.stamp-test,experiments
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal tests

# The property tests with fresh random examples (`make test` replays fixed ones).
fuzz: $(VENV)/.stamp-test,experiments
	QJAX_HYPOTHESIS=fuzz $(PY) -m pytest -q -n $(JOBS) $$(grep -rl '@given' tests)

lint: $(VENV)/.stamp-test,experiments
	$(PY) -m ruff check qjax tests experiments
	$(PY) -m ruff format --check qjax tests experiments

bench: $(VENV)/.stamp-test,experiments
	$(PY) experiments/bench_numerics.py

precheck-gpu: pyproject.toml
	test -x .venv-gpu/bin/python || $(PYTHON_GPU) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q -e '.[test]' 'jax[cpu]==$(GPU_JAX)'
	QJAX_FULL_LOWERING=1 .venv-gpu/bin/python -m pytest -q -n $(JOBS) tests/kernels

clean:
	rm -rf $(VENV) .venv-gpu .pytest_cache .hypothesis .ruff_cache
