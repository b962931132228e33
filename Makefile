# On a fresh machine: `make demo` sets everything up and trains the demo; `make test` sets up and runs the tests.
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup  ## the small MambaVision on the bundled digits, CPU, a few minutes
	$(PY) train.py experiment=demo

# Tests on two workers (pytest-xdist), handed out one at a time, longest first, the Slurm tests together on one
# (tests/conftest.py). WORKERS=0 runs them in this process.
WORKERS ?= 2
XDIST = -n $(WORKERS)

test: setup
	$(PY) -m pytest -q $(XDIST)

test-fast: setup  ## everything but the slow tests
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: setup  ## CPU benchmarks; results go in docs/benchmarks.md
	cd benchmarks && ../$(PY) scan.py && ../$(PY) model_step.py && ../$(PY) data_pipeline.py && ../$(PY) augment.py && ../$(PY) throughput.py --model mambavision_demo --res 64 --batch 16 --amp fp32 --warmup 5 --iters 20 && ../$(PY) export.py --threads 1 && ../$(PY) trainer_overhead.py --epochs 8 --repeats 5

clean:
	rm -rf .venv .pytest_cache
