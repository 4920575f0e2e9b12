# The two commands a new user needs:
#   make run    set up, import the demo model, and run the main job
#   make test   set up and run the tests (exactly what CI runs)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export BENTOML_DO_NOT_TRACK := 1

.PHONY: setup run test clean

setup: $(INSTALLED)

# Bytecode is compiled at install time: with PYTHONDONTWRITEBYTECODE set, every run
# would otherwise recompile torch from source (about 12 s).
$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==0.13.9
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode --editable '.[test]'
	touch $@

run: setup
	$(BIN)/python -m model_import demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) results
