# moon-rl: two commands for users (`make demo`, `make test`), plus install and lint.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed first, before the project, so that no dependency can pull a CUDA torch onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.moon-rl-installed
DEMO_DIR ?= runs/demo

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
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
