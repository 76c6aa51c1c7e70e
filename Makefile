# The two set-up commands of the README. Each creates .venv on first use and installs what it needs.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

.PHONY: demo test
demo: $(STAMP)
	$(VENV)/bin/sparse-index demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q tests
