# moon-rl: two commands for users (`make demo`, `make test`), plus install and lint.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed first, before the project, so that no dependency can pull a CUDA torch onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.moon-rl-installed
DEMO_DIR ?= runs/demo
# Test workers (pytest-xdist), one torch thread each: the suite's time is mostly a few long tests and subprocess start-
# ups, which two workers run side by side on two cores. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,quant,serve]"
	touch $(STAMP)

demo: install
	bash scripts/demo.sh $(DEMO_DIR) $(ARGS)

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
