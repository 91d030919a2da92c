# `make test` sets up everything from nothing: a virtual environment with the pinned
# dependencies (torch first, by exact pin: a loose torch pulls a multi-GB CUDA build),
# the project installed editable, then the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo serve bench family eval clean

$(STAMP): requirements.lock pyproject.toml setup.py proto/eft/v1/eft.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The embedded family (trained on first use, about 5 minutes on 2 cores, then cached), a
# private local Ray with every role as a Serve deployment, the gRPC router, example requests
# through the gRPC client; everything is stopped before it exits.
demo: $(STAMP)
	$(VENV)/bin/eft demo

# The same ensemble and router, serving on localhost:50051 until Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/eft serve --local

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_fronts.py
	$(PY) bench/bench_serve.py

family: $(STAMP)
	$(VENV)/bin/eft family build

eval: $(STAMP)
	$(VENV)/bin/eft eval --out docs/eval

clean:
	rm -rf $(VENV) build *.egg-info eft_router/api/eft_pb2*
