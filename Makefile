# Set-up and entry points. `make demo` and `make test` each create the virtual
# environment on first use (torch pinned and installed first: a CPU build here).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/offline-rlhf demo

# OFFLINE_RLHF_REQUIRE_RAY: the Ray executor tests fail, not skip, if Ray is missing
test: $(STAMP)
	OFFLINE_RLHF_REQUIRE_RAY=1 $(PY) -m pytest $(PYTEST_ARGS)

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
