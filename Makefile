# The two set-up commands of the README. Each creates .venv on first use and installs what it needs:
# the package for the demo; the package with its test and HF-parity extras (torch, transformers) for tests.
PY ?= python3
VENV := .venv

$(VENV)/.venv:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.venv
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.venv
	$(VENV)/bin/pip install --quiet -e ".[test,parity]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/sparse-index demo

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -n 2 -q tests
