"""An emulated Jetson in the test lab: the aarch64 board (arm64 Debian's Python under qemu, its own sshd) with a
profile that ``extends: jetson-nano``. It has no GPU, so what a user meets on a board without the GPU stack runs here
for real: the SSH path, the preflight finding no CUDA device, the messages, and the CPU runtime that still works."""

from __future__ import annotations

import pytest

from edgedeploy.errors import CheckRefused, PreflightError
from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.doctor import doctor
from pipeline.quantize import QuantConfig
from pipeline.workloads import WORKLOADS
from targets.profiles import load_profile

pytestmark = pytest.mark.slow

DIGITS = str(WORKLOADS["digits-cnn"].model_path())
QUICK = BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.2, rounds=1)


@pytest.fixture(scope="module")
def jetson(lab_pi4):
    """The emulated board as a Jetson Nano whose onnxruntime is the aarch64 CPU wheel (no GPU providers)."""
    device, python = lab_pi4
    return device.profile(extends="jetson-nano", python=python, python_version="3.11",
                          runtimes={"tvm": {"version": "0.27.0", "unit": "gpu"}, "onnxruntime": "1.27.0",
                                    "onnxruntime-cuda": "1.27.0",
                                    "onnxruntime-tensorrt": {"version": "1.27.0", "tensorrt": "8.2.1"}})


def _config(profile, scheme: str, **extra) -> RunConfig:
    return RunConfig(model_path=DIGITS, profile=str(profile), quant=QuantConfig(scheme=scheme), bench=QUICK, **extra)


def test_the_headline_command_on_a_board_without_a_gpu_says_so_before_uploading(prefect_server, jetson):
    """`deploy run --profile <jetson> MODEL`: the profile's preferred runtime (onnxruntime-tensorrt, fp16 on the GPU)
    passes every check, and the preflight on the board finds no CUDA device: one message naming the board."""
    profile = load_profile(str(jetson))
    assert profile.preferred_runtime == "onnxruntime-tensorrt"
    with pytest.raises(PreflightError) as caught:
        deploy_run(_config(jetson, "fp16"))
    message = caught.value.render()
    assert "lab-pi4" in message and "no CUDA device" in message and "nvhost-gpu" in message
    assert "--runtime onnxruntime" in message


def test_int8_on_the_nano_gpu_is_refused_before_any_work(prefect_server, jetson):
    with pytest.raises(CheckRefused) as caught:
        deploy_run(_config(jetson, "int8", runtime="onnxruntime-tensorrt"))
    assert "DP4A" in caught.value.render()


def test_onnxruntime_on_the_jetson_cpu_runs_over_ssh(prefect_server, jetson):
    """What the Nano's user had: onnxruntime on its Cortex-A57 (here the emulated aarch64), measured and named."""
    result = deploy_run(_config(jetson, "fp32", runtime="onnxruntime", eval_samples=20))
    assert result.valid, result.invalid_reasons
    assert result.unit == "CPU" and result.runtime.startswith("onnxruntime 1.")
    assert result.benchmark["artifact"]["device_machine"] == "aarch64"
    assert result.benchmark["artifact"]["versions"]["provider"] == "CPUExecutionProvider"
    assert set(result.board) == {"before", "after", "marks"}
    # a GPU board: its TVM is asked whether it reaches CUDA, and the board says why not
    (tvm_gpu,) = result.also
    assert tvm_gpu.label.startswith("tvm (GPU)") and tvm_gpu.p50_ms is None and "no CUDA device" in tvm_gpu.reason


def test_doctor_names_what_the_gpu_runtimes_lack(jetson):
    rows = {row.check: row for row in doctor(load_profile(str(jetson)))}
    assert rows["reachable"].ok and rows["architecture"].ok
    assert not rows["GPU"].ok and "no CUDA device nodes" in rows["GPU"].detail
    assert not rows["onnxruntime-tensorrt"].ok and "no CUDA device" in rows["onnxruntime-tensorrt"].detail
    assert not rows["onnxruntime-cuda"].ok and not rows["tvm"].ok
