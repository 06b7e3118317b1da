# Self-sufficient targets: each creates .venv with the Python found on PATH and installs
# what it needs. Override the interpreter with `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: demo test lint bench clean

$(VENV)/.stamp-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.stamp-experiments
	$(PY) -m qjax.cli demo

test: $(VENV)/.stamp-test,experiments
	$(PY) -m pytest -q -n $(JOBS) tests

lint: $(VENV)/.stamp-test,experiments
	$(PY) -m ruff check qjax tests experiments
	$(PY) -m ruff format --check qjax tests experiments

bench: $(VENV)/.stamp-test,experiments
	$(PY) experiments/bench_numerics.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
