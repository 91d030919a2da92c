# `make test` sets up everything from nothing: a virtual environment with the pinned
# dependencies (torch first, by exact pin: a loose torch pulls a multi-GB CUDA build),
# the project installed editable, then the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench family eval clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_engine.py

family: $(STAMP)
	$(VENV)/bin/eft family build

eval: $(STAMP)
	$(VENV)/bin/eft eval --out docs/eval

clean:
	rm -rf $(VENV) build *.egg-info
