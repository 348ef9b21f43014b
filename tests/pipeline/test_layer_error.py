"""The per-layer int8 error report (pipeline/layer_error.py, `deploy inspect`): every quantized tensor, its SQNR
alone and against fp32, worst first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from pipeline.ingest import ingest
from pipeline.layer_error import layer_errors
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from pipeline.workloads.base import Samples
from tests.conftest import conv_model


def _calibration() -> Samples:
    return Samples({"x": np.random.default_rng(0).standard_normal((32, 4, 8, 8)).astype(np.float32)})


def test_the_stretched_tensor_is_worst_and_weights_are_listed(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    q = quantize(Path(info.prepared_path), tmp_path, QuantConfig(scheme="int8"), _calibration())
    report = layer_errors(Path(info.prepared_path), Path(q.path), _calibration(), batch=1, workdir=tmp_path / "l")
    worst = report.tensors[0]
    # conv_a's output: channel 0 carries +500, so its per-tensor scale leaves the other channels a few levels. Its
    # energy-weighted SQNR would look fine (channel 0 dominates); per channel it is by far the worst.
    assert (worst.tensor, worst.kind, worst.layer, worst.float_layers) == ("a", "activation", "conv_b",
                                                                           ("conv_a", "conv_b"))
    assert worst.sqnr_db < 20 < 35 < report.tensors[1].sqnr_db
    assert [t.sqnr_db for t in report.tensors] == sorted(t.sqnr_db for t in report.tensors)
    assert {t.tensor for t in report.tensors if t.kind == "weight"} >= {"wa", "wb", "wfc"}
    assert report.samples == 32 and all(t.cosine is None or 0.9 < t.cosine <= 1.0 + 1e-9 for t in report.tensors)


def test_per_tensor_weights_lose_more_than_per_channel(tmp_path):
    model = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(model))
    rows = Samples({"x": np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)})
    sqnr = {}
    for per_channel in (True, False):
        q = quantize(model, tmp_path, QuantConfig(scheme="int8", per_channel=per_channel), rows,
                     out_name=f"q{per_channel}.onnx")
        report = layer_errors(model, Path(q.path), rows, batch=1, workdir=tmp_path / str(per_channel))
        sqnr[per_channel] = next(t.sqnr_db for t in report.tensors if t.tensor == "w")
    assert sqnr[True] > sqnr[False]


def test_an_int8_model_without_its_fp32_is_measured_against_itself(tmp_path):
    digits = WORKLOADS["digits-cnn"]
    q = quantize(digits.model_path(), tmp_path, QuantConfig(scheme="int8"), digits.calibration(20))
    report = layer_errors(None, Path(q.path), digits.calibration(8), batch=1, workdir=tmp_path / "l")
    assert report.tensors and all(t.kind == "activation" and t.model_sqnr_db is None for t in report.tensors)


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedeploy", "inspect", *args], capture_output=True, text=True,
                          timeout=300)


def test_deploy_inspect_prints_every_tensor_as_json_and_the_worst_as_a_table(sensitive_onnx, tmp_path):
    proc = _inspect(str(sensitive_onnx), "--calib-data", str(tmp_path / "calib.npz"), "--per-tensor", "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["scheme"] == "int8 QDQ U8S8 minmax per-tensor" and answer["tensors"][0]["tensor"] == "a"
    proc = _inspect(str(sensitive_onnx), "--calib-data", str(tmp_path / "calib.npz"), "--top", "2")
    assert proc.returncode == 0 and "int8 quantization error per tensor" in proc.stdout and "more (--top" in proc.stdout


def test_deploy_inspect_of_a_qdq_model_compares_with_its_reference(tmp_path):
    digits = WORKLOADS["digits-cnn"]
    q = quantize(digits.model_path(), tmp_path, QuantConfig(scheme="int8"), digits.calibration(20))
    proc = _inspect(q.path, "--reference", str(digits.model_path()), "--json")
    assert proc.returncode == 0, proc.stderr
    tensors = json.loads(proc.stdout)["tensors"]
    assert any(t["kind"] == "weight" for t in tensors) and any(t["model_sqnr_db"] for t in tensors)
    other = tmp_path / "other.onnx"
    onnx.save(conv_model(), str(other))
    proc = _inspect(q.path, "--reference", str(other))
    assert proc.returncode == 2 and "--reference has other inputs than the model" in proc.stderr
    assert "Traceback" not in proc.stderr
