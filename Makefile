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
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev,plot,qdrant]"
	touch $(STAMP)

# The browser test drives Debian's Chromium with Playwright (no browser download: playwright install is
# never run). Installed here when missing and apt-get can run as root; otherwise that one test skips.
BROWSER := /usr/bin/chromium
$(BROWSER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will skip"; \
	else echo "note: chromium not installed (needs root apt-get); the browser test will skip"; fi

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vsekit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vsekit tests benchmarks

test: $(STAMP) $(BROWSER)
	$(VENV)/bin/ruff check vsekit tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
