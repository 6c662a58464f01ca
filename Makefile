# Set-up on a fresh machine (Python 3.11, gcc): `make test` or `make serve`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install test serve bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Builds the Cython kernels into cnnserve/_ext and installs the package in editable mode.
install: $(PY)
	$(PIP) install -e .

test: $(PY)
	$(PIP) install -e ".[test]"
	$(PY) -m pytest

# The service on the shipped model(s), http://127.0.0.1:8000 (HOST=0.0.0.0 PORT=... to change).
HOST ?= 127.0.0.1
PORT ?= 8000
serve: install
	$(VENV)/bin/cnnserve serve --models models --host $(HOST) --port $(PORT)

bench: $(PY)
	$(PIP) install -e ".[bench]"
	$(PY) bench/layers.py
	$(PY) bench/train.py
	$(PY) bench/dense.py
	$(PY) bench/service.py

lint: $(PY)
	$(PIP) install -e ".[test]"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info cython_ext/*.c cython_ext/*.html cnnserve/_ext/*.so
