# The two commands of the README: `make pipeline` and `make test`.
# Both create the virtual environment .venv on first use, with the exact versions (and hashes)
# of requirements.lock; `make lock` refreshes that file after a change to pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: pipeline test lock

$(BIN)/dvc: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

pipeline: $(BIN)/dvc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(BIN)/dvc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder

lock: $(BIN)/dvc
	$(BIN)/uv pip compile pyproject.toml --extra test --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --quiet -o requirements.lock
