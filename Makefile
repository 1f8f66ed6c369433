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

.PHONY: demo test test-numerics bench bench-pytest
demo: $(VENV)/.installed-demo
	$(BIN)/loldu-triton demo

# Separate invocations: the kernels are defined either for a GPU or for the Triton interpreter, once per
# process (tests/interpreted runs only under TRITON_INTERPRET=1). -rs prints why a test skipped.
PYTEST := $(BIN)/python -m pytest -q -rs
test: $(VENV)/.installed-test
	$(PYTEST) tests
	TRITON_INTERPRET=1 $(PYTEST) tests/interpreted
	$(MAKE) --no-print-directory test-numerics

# The tests that compare floating-point results with float64 (and all of tests/interpreted), again under a second
# CPU capability: PyTorch's kernels for it round differently, as another machine's would, and every tolerance
# must hold there too. `make test-numerics NUMERICS_CPU=default` tries the slowest, plainest kernels.
NUMERICS := tests/test_kernels.py tests/test_functional.py tests/test_layer.py tests/test_routes.py \
	tests/test_properties.py tests/test_factorize.py tests/test_inference_cache.py tests/test_quant.py \
	tests/test_conv_embedding.py tests/test_adapter_batch.py tests/test_dropout.py \
	tests/test_quantized_bases.py
NUMERICS_CPU ?= avx2
test-numerics: $(VENV)/.installed-test
	ATEN_CPU_CAPABILITY=$(NUMERICS_CPU) $(PYTEST) $(NUMERICS)
	ATEN_CPU_CAPABILITY=$(NUMERICS_CPU) TRITON_INTERPRET=1 $(PYTEST) tests/interpreted

bench: $(VENV)/.installed-bench
	$(BIN)/loldu-triton bench

bench-pytest: $(VENV)/.installed-bench
	$(BIN)/python -m pytest -q benchmarks --benchmark-columns=min,median,mean --benchmark-sort=name
