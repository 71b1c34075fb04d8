# Every target sets up what it needs: a .venv with the pinned CPU build of torch (2.13.0 lies on this
# machine's disk; an unpinned torch would pull a multi-GB CUDA build) and the package with its extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test lint bench bench-quick demo demo-lm clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check torch_pretrain_update tests benchmarks examples
	$(VENV)/bin/mypy

# Two pytest workers (pytest-xdist) on CI's two cores, each module on one worker (its module-scoped fixtures, e.g.
# the quick demo runs, are built once); the 15 slowest tests are listed at the end of every run.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15

bench: $(VENV)/.installed
	$(PY) -m benchmarks

bench-quick: $(VENV)/.installed
	$(PY) -m benchmarks --quick

demo: $(VENV)/.installed
	$(VENV)/bin/pretrain-update demo --out demo_out

demo-lm: $(VENV)/.installed
	$(VENV)/bin/pretrain-update demo lm --out demo_lm_out

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
