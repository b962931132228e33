# `make test` on a fresh machine: installs everything (.venv, system libraries) and runs the tests.
PY := .venv/bin/python

.PHONY: setup test test-fast bench clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup  ## everything but the slow tests
	$(PY) -m pytest -q -m "not slow"

bench: setup  ## CPU benchmarks; results go in docs/benchmarks.md
	cd benchmarks && ../$(PY) scan.py && ../$(PY) model_step.py && ../$(PY) data_pipeline.py

clean:
	rm -rf .venv .pytest_cache
