"""Every output measured: a two-output model reports one agreement row per output (the headline is the first's)."""

from __future__ import annotations

import onnx
import pytest

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.quantize import QuantConfig
from tests.conftest import two_output_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_a_two_output_model_reports_two_per_output_rows(prefect_server, tmp_path, runtime):
    model = tmp_path / "two.onnx"
    onnx.save(two_output_model(), str(model))
    result = deploy_run(RunConfig(model_path=str(model), profile="local", quant=QuantConfig(scheme="fp32"),
                                  runtime=runtime,
                                  bench=BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.1, rounds=1)))
    assert result.valid
    rows = result.agreement.per_output
    assert [row.name for row in rows] == ["scores", "features"]
    assert rows[0].top1 is not None and rows[1].top1 is None  # a classifier's scores, then a feature map
    assert all(row.cosine > 0.9999 for row in rows)
    assert rows[0].cosine == result.agreement.cosine  # the headline is the first output's
