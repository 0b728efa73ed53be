# The two set-up commands of vsekit: `make demo` and `make test`.
# Each creates .venv with `python3 -m venv` when missing and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.vsekit-installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vsekit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vsekit tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check vsekit tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
