"""The device-side runner, run as it runs on a board: a separate Python process."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from targets.hashing import sha256_file
from tests.conftest import conv_model, tvm_build

RUNNER = Path(__file__).resolve().parents[2] / "targets" / "device_runner.py"


def test_runner_is_python36_syntax():
    tree = ast.parse(RUNNER.read_text(), feature_version=(3, 6))
    futures = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "__future__"
               for a in n.names]
    assert "annotations" not in futures  # 3.7+


PY36 = Path("/root/.pyenv/versions/3.6.15/bin/python")


@pytest.mark.skipif(not PY36.exists(), reason="no Python 3.6 interpreter on this machine")
def test_runner_compiles_under_a_real_python36(tmp_path):
    # compile() rather than py_compile: Python 3.6 has no PYTHONPYCACHEPREFIX and would write a .pyc beside it.
    check = f"compile(open({str(RUNNER)!r}).read(), {str(RUNNER)!r}, 'exec')"
    proc = subprocess.run([str(PY36), "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Python 3.6 with numpy 1.19 and onnxruntime 1.10 (scripts/make_py36_env.sh, run by `make setup`): a JetPack 4.x
# board's Python, with the newest onnxruntime wheel 3.6 has on x86-64 (the Nano's Jetson Zoo wheel is 1.11).
JETPACK_PYTHON = Path(__file__).resolve().parents[2] / ".lab" / "py36" / "bin" / "python"


@pytest.mark.skipif(not JETPACK_PYTHON.exists(), reason="no Python 3.6 environment (.lab/py36: make setup builds it "
                    "where pyenv's 3.6.15 exists)")
def test_the_runner_measures_on_python36_with_onnxruntime_1_10_and_names_a_missing_gpu_provider(tmp_path):
    from onnx import helper

    model = tmp_path / "m13.onnx"  # onnxruntime 1.10 runs up to opset 15
    onnx.save(helper.make_model(conv_model().graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7),
              str(model))
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32))
    reports = {}
    for runtime in ("onnxruntime", "onnxruntime-tensorrt"):
        proc = subprocess.run(
            [str(JETPACK_PYTHON), str(RUNNER), "--runtime", runtime, "--artifact", str(model), "--sha256",
             sha256_file(model), "--inputs", str(inputs), "--input-order", "x", "--outputs",
             str(tmp_path / "out.npz"), "--min-iterations", "5", "--min-seconds", "0"],
            capture_output=True, text=True, timeout=120)
        reports[runtime] = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu, trt = reports["onnxruntime"], reports["onnxruntime-tensorrt"]
    assert cpu["ok"] and cpu["valid"] and cpu["python"].startswith("3.6") and cpu["samples_covered"] == 3
    assert cpu["versions"] == {"onnxruntime": "1.10.0", "provider": "CPUExecutionProvider"}
    assert trt["error"] == "missing" and "TensorrtExecutionProvider" in trt["message"]
    # and the preflight's GPU probe, on the same Python: what it reports of the board's GPU stack
    from targets.gpu_probe import GPU_PROBE

    probe = subprocess.run([str(JETPACK_PYTHON), "-c", GPU_PROBE], capture_output=True, text=True, timeout=60)
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    assert facts["onnxruntime"] == "1.10.0" and facts["providers"] == ["CPUExecutionProvider"]


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(model))
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32))
    return model, inputs


def _run(model, inputs, tmp_path, *extra):
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--runtime", "onnxruntime", "--artifact", str(model), "--inputs", str(inputs),
         "--input-order", "x", "--outputs", str(tmp_path / "out.npz"), *extra],
        capture_output=True, text=True, timeout=120,
    )
    # Its private copy goes beside the outputs (the run's directory on the board), and is gone when it is done.
    assert not list(tmp_path.glob("edgedeploy-run-*")), "the runner left its private copy behind"
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_measures_and_covers_every_sample(setup, tmp_path):
    model, inputs = setup
    code, report = _run(model, inputs, tmp_path, "--sha256", sha256_file(model), "--min-iterations", "30",
                        "--min-seconds", "0.2", "--warmup", "3")
    assert code == 0 and report["valid"] and report["invalid_reason"] is None
    assert len(report["latency_ms"]) >= 30 and report["timed_seconds"] >= 0.2 and report["warmup"] == 3
    with np.load(tmp_path / "out.npz") as npz:
        assert npz["outputs"].shape == (4, 4)


def test_tampered_artifact_is_never_loaded(setup, tmp_path):
    model, inputs = setup
    code, report = _run(model, inputs, tmp_path, "--sha256", "0" * 64)
    assert code == 3 and report["error"] == "tampered" and report["actual"] == sha256_file(model)
    assert not (tmp_path / "out.npz").exists()


def test_what_is_hashed_is_what_is_loaded(setup, tmp_path, monkeypatch):
    """A board user who swaps the file between the runner's hash and its load gets nothing: the runner hashes a
    private copy (a fresh mode-700 directory) and loads that same copy, never the path again."""
    import targets.device_runner as runner

    model, inputs = setup
    loaded = {}

    def load(path, *args):
        loaded["path"], loaded["mode"] = path, os.stat(os.path.dirname(path)).st_mode & 0o777
        loaded["sha256"] = sha256_file(path)
        model.write_bytes(b"swapped after the hash")  # too late: the copy is what runs
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner, "load_onnxruntime", load)
    with pytest.raises(SystemExit):
        runner.main(["--runtime", "onnxruntime", "--artifact", str(model), "--sha256", sha256_file(model),
                     "--inputs", str(inputs), "--input-order", "x", "--outputs", str(tmp_path / "out.npz")])
    assert loaded["path"] != str(model) and loaded["mode"] == 0o700
    assert loaded["sha256"] != sha256_file(model)  # the copy kept the bytes that were checked


def test_a_manifest_that_names_another_artifact_is_refused(setup, tmp_path):
    model, inputs = setup
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"artifact": {"sha256": "1" * 64}}))
    code, report = _run(model, inputs, tmp_path, "--manifest", str(manifest), "--sha256", sha256_file(model))
    assert code == 3 and report["error"] == "tampered" and "manifest" in report["message"]


def test_missed_minimums_are_marked_invalid(setup, tmp_path):
    model, inputs = setup
    code, report = _run(model, inputs, tmp_path, "--sha256", sha256_file(model), "--min-iterations", "100000000",
                        "--min-seconds", "0", "--max-seconds", "1")
    assert code == 0 and not report["valid"]
    assert "timed iterations < minimum 100000000" in report["invalid_reason"]
    assert "time limit" in report["invalid_reason"]


def test_peak_rss_is_the_runner_own_not_its_parent(setup, tmp_path):
    """Regression: ru_maxrss carries the parent's peak across fork+exec; a runner started by a 600 MB
    process reported 600+ MB for a model that needs a few dozen."""
    model, inputs = setup
    argv = [sys.executable, str(RUNNER), "--runtime", "onnxruntime", "--artifact", str(model), "--sha256",
            sha256_file(model), "--inputs", str(inputs), "--input-order", "x", "--outputs",
            str(tmp_path / "out.npz"), "--min-iterations", "5", "--min-seconds", "0"]
    parent = (
        "import json, subprocess, sys\n"
        "ballast = bytearray(600 * 1024 * 1024)\n"
        "for i in range(0, len(ballast), 4096): ballast[i] = 1\n"
        f"out = subprocess.run({argv!r}, capture_output=True, text=True).stdout\n"
        "print(out.strip().splitlines()[-1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 10 < report["peak_rss_mb"] < 400


def test_a_tvm_library_reports_where_its_time_goes(setup, tmp_path):
    """After the timed loop, the runner times every call the Relax VM makes for a few more runs: the kernels the
    library really runs on the device, heaviest first (what a database estimate can't tell)."""
    model, inputs = setup
    artifact = tvm_build(model, tmp_path)
    argv = [sys.executable, str(RUNNER), "--runtime", "tvm", "--artifact", artifact.library_path,
            "--manifest", artifact.manifest_path, "--inputs", str(inputs), "--input-order", "x",
            "--outputs", str(tmp_path / "out.npz"), "--min-iterations", "5", "--min-seconds", "0"]
    report = json.loads(subprocess.run([*argv, "--kernel-runs", "4"], capture_output=True, text=True,
                                       timeout=300).stdout.strip().splitlines()[-1])
    assert report["valid"] and report["kernel_runs"] == 4 and report["kernel_error"] is None
    kernels = report["kernels"]
    assert any("conv2d" in k["name"] for k in kernels), kernels
    assert all(k["calls"] >= 1 and k["us"] > 0 for k in kernels)
    assert [k["us"] for k in kernels] == sorted((k["us"] for k in kernels), reverse=True)
    assert sum(k["us"] for k in kernels) <= report["kernels_total_us"] + 1e-6
    # The kernels of one run take part of one run's time (the hook adds microseconds, not milliseconds).
    assert report["kernels_total_us"] / 1000 < max(report["latency_ms"]) * 3 + 1.0

    off = json.loads(subprocess.run([*argv, "--kernel-runs", "0"], capture_output=True, text=True,
                                    timeout=300).stdout.strip().splitlines()[-1])
    assert off["kernels"] == [] and off["kernel_runs"] == 0


def test_onnxruntime_reports_no_kernels(setup, tmp_path):
    model, inputs = setup
    code, report = _run(model, inputs, tmp_path, "--sha256", sha256_file(model), "--min-iterations", "3",
                        "--min-seconds", "0")
    assert code == 0 and report["kernels"] == [] and report["kernel_runs"] == 0 and report["kernel_error"] is None


@pytest.mark.parametrize("runtime, provider", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                               ("onnxruntime-tensorrt", "TensorrtExecutionProvider")])
def test_a_gpu_provider_this_onnxruntime_lacks_is_named_with_how_to_get_it(setup, tmp_path, runtime, provider):
    """This machine's onnxruntime is the CPU build: the runner says which provider is missing, never falls back to
    the CPU and reports that as the GPU's time."""
    model, inputs = setup
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--runtime", runtime, "--artifact", str(model), "--sha256", sha256_file(model),
         "--inputs", str(inputs), "--input-order", "x", "--outputs", str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and report["error"] == "missing"
    assert provider in report["message"] and "CPUExecutionProvider" in report["message"]
    assert "onnxruntime-gpu" in report["fix"]


def test_a_gpu_library_on_a_tvm_without_cuda_is_refused_before_loading(setup, tmp_path):
    """A library whose manifest says it carries GPU code, on a TVM that reaches no CUDA device (this machine): one
    clear refusal, not a loader error about a missing 'cuda' module."""
    model, inputs = setup
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"artifact": {"sha256": sha256_file(model)}, "device_code": "ptx+cubin",
                                    "compiled_model": {"scheme": {"scheme": "fp16"}}}))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--runtime", "tvm", "--artifact", str(model), "--manifest", str(manifest),
         "--inputs", str(inputs), "--input-order", "x", "--outputs", str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and report["error"] == "missing"
    assert "tvm.cuda(0).exist is False" in report["message"] and "USE_CUDA=ON" in report["fix"]
    # why: the wheel's CUDA runtime was tried (runtime-only TVM never loads it by itself) and its CUDA is missing
    assert "libtvm_runtime_cuda.so did not load" in report["message"], report["message"]


def test_the_first_run_is_reported_apart_from_the_timed_ones(setup, tmp_path):
    model, inputs = setup
    code, report = _run(model, inputs, tmp_path, "--sha256", sha256_file(model), "--min-iterations", "3",
                        "--min-seconds", "0", "--warmup", "1")
    assert code == 0 and report["first_run_seconds"] > 0 and len(report["latency_ms"]) >= 3
