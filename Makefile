# The two set-up commands: `make serve` and `make test`. Each creates or reuses .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODEL ?= models/default
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test bench install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[convert,test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m serving --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py
