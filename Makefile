# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel; a GPU site overrides it: `make TORCH_SPEC="torch==2.13.0" ...`
# with its CUDA index configured for pip.
TORCH_SPEC ?= torch==2.13.0
# Hospitals are offline: Flower must never install app dependencies at run time.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast test-cicd bench-quality bench-privacy bench-robustness bench-aggregation bench-serving clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m simulation.demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench-quality: install
	$(PY) bench/quality.py

bench-privacy: install
	$(PY) bench/privacy_bench.py

bench-robustness: install
	$(PY) bench/robustness.py
	$(PY) bench/robustness.py --suite screen
	$(if $(wildcard ../shared/data/lgg-flair128),$(PY) bench/robustness.py --suite screen-lgg)

bench-aggregation: install
	$(PY) bench/aggregation_bench.py

bench-serving: install
	$(PY) bench/serving_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

test-cicd: install
	$(PY) -m pytest tests/test_cicd_files.py -q
