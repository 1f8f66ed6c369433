# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs; torch==2.13.0 is the CPU wheel on the project's machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: setup.py | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$*]"
	touch $@

.PHONY: demo test bench bench-pytest
demo: $(VENV)/.installed-demo
	$(BIN)/loldu-triton demo

# Two invocations: the kernels are defined either for a GPU or for the Triton interpreter, once per process.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/interpreted

bench: $(VENV)/.installed-bench
	$(BIN)/loldu-triton bench

bench-pytest: $(VENV)/.installed-bench
	$(BIN)/python -m pytest -q benchmarks --benchmark-columns=min,median,mean --benchmark-sort=name
