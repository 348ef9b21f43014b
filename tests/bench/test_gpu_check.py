"""bench/gpu_check: a one-library bundle built here (digits-cnn, fp32, Jetson Nano sm_53 device code) carries PTX and
cubin, and run_on_gpu.py, pointed at it on this machine (no GPU), says so in its first line and exits 2, no traceback.

The real check runs on an NVIDIA machine; this keeps its two halves working where the project's tests run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check"


def load_prepare():
    spec = importlib.util.spec_from_file_location("gpu_check_prepare", GPU_CHECK / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """This interpreter's tvm_ffi (no wheel download), no CPU-VM self-check: seconds, not a minute."""
    out = tmp_path_factory.mktemp("gpu-check") / "bundle"
    load_prepare().build_bundle(out, [("digits-cnn", "sm53", "fp32")], python=None, verify=False)
    return out


def test_the_bundle_holds_runtime_only_tvm_and_a_library_with_ptx_and_cubin(tiny_bundle):
    index = json.loads((tiny_bundle / "index.json").read_text())
    assert [entry["dir"] for entry in index["libraries"]] == ["libs/digits-cnn-sm53-fp32"]
    manifest = json.loads((tiny_bundle / "libs" / "digits-cnn-sm53-fp32" / "manifest.json").read_text())
    assert manifest["device_code"] == "ptx+cubin"
    assert {(e["kind"], e["arch"]) for e in manifest["gpu_code"]["fatbin"]} == {("ptx", 53), ("cubin", 53)}
    libraries = {path.name for path in (tiny_bundle / "site" / "tvm" / "lib").iterdir()}
    assert libraries == {"libtvm_runtime.so", "libtvm_runtime_cuda.so"}  # no 259 MB compiler library
    assert (tiny_bundle / "inputs" / "digits-cnn.npz").is_file() and (tiny_bundle / ".gitignore").is_file()


def test_without_a_gpu_the_check_says_so_first_and_exits_2(tiny_bundle):
    done = subprocess.run([sys.executable, str(GPU_CHECK / "run_on_gpu.py"), str(tiny_bundle)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("no CUDA device: ")
    assert "Traceback" not in done.stdout + done.stderr
    assert f"from {tiny_bundle / 'site' / 'tvm'}" in done.stdout  # the bundle's TVM, not this environment's
