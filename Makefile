# The README's commands: `make pipeline` and `make test` (and `make lock`, `make env`), each run by
# tasks.py, which also runs them where there is no `make` (python tasks.py pipeline). Each first
# creates the virtual environment .venv with the exact versions (and hashes) of requirements.lock.
PYTHON ?= python3

.PHONY: pipeline test lock env

pipeline test lock env:
	$(PYTHON) tasks.py $@
