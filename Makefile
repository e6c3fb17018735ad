# raphael_ext developer commands. `make test` is what CI runs (.ci/run): it creates .venv, installs the
# pinned dependencies, builds the extension against that torch and runs the tests and the benchmarks once.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# -P: never put the repository root on sys.path, so tests import the installed package, not ./raphael_ext.
PYTEST := $(PY) -P -m pytest
MAX_JOBS ?= $(shell nproc)
# pytest-xdist workers for the unit tests: one per core, at most 4 (each holds models and a torch of its own).
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
RAPHAEL_EXT_CUDA ?= auto
# Extra flags of `pip install .`: CI passes --no-build-isolation to build against .venv's torch instead of installing
# the same torch a second time (pyproject.toml's build pins equal requirements-dev.txt's: python_tests/test_build.py).
PIP_INSTALL_FLAGS ?=
export MAX_JOBS RAPHAEL_EXT_CUDA
DATE := $(shell date +%Y-%m-%d)

.PHONY: all deps install install-incremental develop test test-cuda bench demo ablation demo-lora demo-controlnet info cmake clean

all: install

$(VENV)/.deps-installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps-installed

## install: `pip install .` as users type it (isolated build against pyproject.toml's torch), into .venv
install: deps
	@mkdir -p build
	@echo "building raphael_ext with pip install . (log: build/pip-install.log)"
	@start=$$(date +%s); RAPHAEL_EXT_BUILD_QUIET=1 $(PY) -m pip install -v $(PIP_INSTALL_FLAGS) . > build/pip-install.log 2>&1 \
		|| { tail -n 60 build/pip-install.log; echo "raphael_ext build failed, see build/pip-install.log"; exit 1; }; \
		echo "pip install . took $$(( $$(date +%s) - start )) s"
	@grep "\[raphael_ext build\]" build/pip-install.log | awk '!seen[$$0]++' || true

## install-incremental: rebuild against .venv's own torch, recompiling only what changed (kernel work)
install-incremental: deps
	@mkdir -p build
	@RAPHAEL_EXT_BUILD_QUIET=1 $(PY) -m pip install -v --no-build-isolation --no-deps . > build/pip-install.log 2>&1 \
		|| { tail -n 60 build/pip-install.log; echo "raphael_ext build failed, see build/pip-install.log"; exit 1; }
	@grep "\[raphael_ext build\]" build/pip-install.log | awk '!seen[$$0]++' || true

## develop: build _C in place (raphael_ext/_C*.so) for editing and debugging
develop: deps
	$(PY) setup.py build_ext --inplace

## test: unit tests (in parallel, TEST_WORKERS), then every benchmark once without timing (so they never rot)
test: install
	$(PYTEST) python_tests -q -n $(TEST_WORKERS) --durations=15
	$(PYTEST) benchmarks -q --benchmark-disable --durations=5

## test-cuda: only the tests that need a GPU
test-cuda: install
	$(PYTEST) python_tests -q -m cuda

## bench: time the benchmarks; JSON + table + PNG under benchmarks/results/
bench: install
	$(PYTEST) benchmarks -q --benchmark-json=benchmarks/results/$(DATE)-$(shell hostname)-bench.json
	$(PY) benchmarks/report.py benchmarks/results/$(DATE)-$(shell hostname)-bench.json

## demo: train the tiny preset on shapes (2 CPU cores, < 10 min); samples, paths, attention, metrics in runs/demo
demo: install
	$(PY) -P -m raphael_ext demo --out runs/demo $(if $(STEPS),--steps $(STEPS))

## ablation: the demo's budget with and without space-MoE, alignment scores side by side (runs/ablation)
ablation: install
	$(PY) -P -m raphael_ext ablation --out runs/ablation $(if $(STEPS),--steps $(STEPS))

## demo-lora / demo-controlnet: the paper's extensions on the demo's pipeline (after make demo)
demo-lora: install
	$(PY) -P -m raphael_ext demo-lora --pipeline runs/demo/pipeline --out runs/lora_demo

demo-controlnet: install
	$(PY) -P -m raphael_ext demo-controlnet --pipeline runs/demo/pipeline --out runs/controlnet_demo

info: install
	$(PY) -P -m raphael_ext.info

## cmake: development build with CMake (compile_commands.json; SANITIZE=address,undefined for sanitizers)
cmake: deps
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DRAPHAEL_EXT_SANITIZE=$(SANITIZE)
	$(VENV)/bin/cmake --build build/cmake

clean:
	rm -rf build dist *.egg-info raphael_ext/_C*.so .pytest_cache .benchmarks
