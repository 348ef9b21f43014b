"""A model that comes QDQ int8 already (a QAT export, another tool's output): recognised at ingest, never quantized
twice, no calibration data asked for, compiled with TVM's integer kernels."""

from __future__ import annotations

import onnx
import pytest

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.graph_stats import is_prequantized
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from tests.conftest import int8_on_this_host

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qdq_digits(tmp_path_factory):
    digits = WORKLOADS["digits-cnn"]
    folder = tmp_path_factory.mktemp("qdq")
    # quantized as the checks would for onnxruntime here (7-bit weights where the CPU has no VNNI), so that
    # onnxruntime, the reference, runs it exactly: 8-bit weights saturate its kernels there (cosine 0.988)
    quantized = quantize(digits.model_path(), folder, int8_on_this_host(), digits.calibration(50),
                         out_name="digits.qdq.onnx")
    return quantized.path


def test_qdq_is_told_apart_from_float(qdq_digits):
    assert is_prequantized(onnx.load(qdq_digits))
    assert not is_prequantized(onnx.load(str(WORKLOADS["digits-cnn"].model_path())))


def test_a_qdq_model_runs_with_integer_kernels_without_calibration_data(prefect_server, qdq_digits):
    result = deploy_run(RunConfig(model_path=qdq_digits, profile="local", quant=QuantConfig(scheme="int8"),
                                  bench=BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.2, rounds=1)))
    assert result.valid and result.model.prequantized
    assert result.scheme == "int8 QDQ (prequantized)" and result.artifact.integer_ops > 0
    # measured against onnxruntime running the same QDQ model
    assert result.agreement.cosine > 0.999
    assert not [c for c in result.checks if c.verdict == "refuse"]
