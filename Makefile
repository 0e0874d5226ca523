# make test | make demo | make sanitize | make test-pressure | make test-vllm | make bench | make gpu
# Each target sets itself up: on a machine whose python3 already has torch, pybind11 and pytest (the GPU
# machines, which have no package registry) that Python is used as it is; elsewhere a virtual
# environment is made in .venv with the CPU build of torch.

PYTHON ?= python3
VENV := .venv
HAVE_DEPS := $(shell $(PYTHON) -c "import torch, pybind11, pytest" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_DEPS),yes)
PY := $(PYTHON)
DEPS :=
else
PY := $(VENV)/bin/python
DEPS := $(VENV)/.installed
endif
CORE := vllm_sleep_ext/.core-built

.PHONY: all build test test-pressure demo sanitize test-vllm bench soak gpu clean

all: test

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 pybind11 pytest hypothesis setuptools wheel numpy
	touch $@

$(CORE): $(DEPS) $(wildcard csrc/*.cpp csrc/*.h) CMakeLists.txt setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(CORE)

test: $(CORE)
	$(PY) -m pytest -q -rs tests

demo: $(CORE)
	$(PY) -m vllm_sleep_ext demo

# Host policy "reclaimable" under real memory pressure: fills the host's memory for a few seconds, so
# not part of `make test` (CI); run it on a machine of your own.
test-pressure: $(CORE)
	VSE_MEMORY_PRESSURE=1 $(PY) -m pytest -q -rs -s tests/test_host_policy_pressure.py

# The C++ core's own tests under ASan, UBSan and TSan (no Python involved).
sanitize:
	bash tests/cpp/run_sanitizers.sh

# Not in CI: installs vLLM in its own environment and checks that vLLM's plugin loader picks us up.
test-vllm:
	bash tests/vllm/run_vllm_plugin_check.sh

bench: $(CORE)
	$(PY) benchmarks/bench_sleep.py

soak: $(CORE)
	$(PY) benchmarks/soak.py

# The whole GPU job in one go (run on a GPU machine): build, cuda tests, demo, benchmarks.
gpu:
	bash tools/gpu_job.sh all

clean:
	rm -rf build vllm_sleep_ext/_core*.so $(CORE) .pytest_cache
