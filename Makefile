# Set-up on a fresh machine (Python 3.11, gcc): `make test` or `make serve`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install test serve bench lint clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Builds the Cython kernels into cnnserve/_ext and installs the package in editable mode;
# again only when the build inputs change (a stamp file per set of extras).
BUILD_INPUTS := pyproject.toml setup.py $(wildcard cython_ext/*.pyx cython_ext/*.pxd cython_ext/*.pxi cython_ext/*.h)

$(VENV)/.installed: $(PY) $(BUILD_INPUTS)
	$(PIP) install -e ".[docs]"
	touch $@

$(VENV)/.installed-test: $(PY) $(BUILD_INPUTS)
	$(PIP) install -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The web page's tests drive headless Chromium through Debian's chromedriver: installed here
# (apt-get) when they are missing and make runs as root; otherwise one line says what to do.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the browser tests"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make test: the browser tests need Chromium: run 'sudo apt-get install chromium chromium-driver' (Debian), then make test again" >&2; \
		exit 1; \
	fi

test: browser $(VENV)/.installed-test
	$(PY) -m pytest

# The service on the shipped model(s), http://127.0.0.1:8000 (HOST=0.0.0.0 PORT=... to change).
HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(VENV)/.installed
	$(VENV)/bin/cnnserve serve --models models --host $(HOST) --port $(PORT)

bench: $(PY)
	$(PIP) install -e ".[bench]"
	$(PY) bench/layers.py
	$(PY) bench/train.py
	$(PY) bench/dense.py
	$(PY) bench/service.py

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info cython_ext/*.c cython_ext/*.html cnnserve/_ext/*.so
	rm -f $(VENV)/.installed $(VENV)/.installed-test
