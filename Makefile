# The two commands of the README: `make pipeline` and `make test`.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: pipeline test

$(BIN)/dvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

pipeline: $(BIN)/dvc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(BIN)/dvc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest
