"""Batch N > 1 everywhere: the shape pinned, the data read as one sample per row, calibration and the device runner
fed N rows per inference, latency per batch and per sample, throughput in samples."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgedeploy.errors import DataError, OptionError
from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.data import load_samples, whole_batches
from pipeline.ingest import TensorSpec, batch_of, resolve_input_shapes
from pipeline.quantize import QuantConfig
from pipeline.workloads.base import Samples
from tests.conftest import conv_model


def test_batch_pins_a_dynamic_first_dimension_and_refuses_a_fixed_one():
    assert resolve_input_shapes(conv_model("N"), {}, 4) == {"x": (4, 3, 8, 8)}
    assert resolve_input_shapes(conv_model("N"), {}) == {"x": (1, 3, 8, 8)}
    assert resolve_input_shapes(conv_model(4), {}) == {"x": (4, 3, 8, 8)}  # the model's own batch
    with pytest.raises(OptionError, match="--batch 2 doesn't fit input 'x'") as caught:
        resolve_input_shapes(conv_model(4), {}, 2)
    assert "the model's batch is 4" in caught.value.fix


def test_batch_data_is_one_sample_per_row_and_fills_whole_batches(tmp_path):
    specs = [TensorSpec(name="x", shape=(4, 3, 8, 8), dtype="float32")]
    assert batch_of(specs) == 4
    assert batch_of([TensorSpec(name="x", shape=(-1, 3), dtype="float32")]) == 1  # dynamic, as a file declares it
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 3, 8, 8), np.float32), labels=np.arange(10))
    samples = load_samples(path, specs)  # rows, not batches: (N, 3, 8, 8)
    kept = whole_batches(samples, 4, "evaluation")
    assert len(kept) == 8 and list(kept.labels) == list(range(8)) and "2 left out" in kept.source
    assert [feeds["x"].shape for feeds in kept.batches(4)] == [(4, 3, 8, 8)] * 2
    with pytest.raises(DataError, match="fewer samples than one batch"):
        whole_batches(Samples({"x": np.zeros((3, 3, 8, 8), np.float32)}), 4, "calibration")
    np.savez(path, x=np.zeros((2, 4, 3, 8, 8), np.float32))  # batches stacked: the shape says what a row is
    with pytest.raises(DataError, match="wrong shape") as caught:
        load_samples(path, specs)
    assert "(N, 3, 8, 8)" in caught.value.expected


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_batch_4_int8_runs_valid_with_per_sample_latency(prefect_server, tmp_path, runtime):
    model = tmp_path / "conv.onnx"
    onnx.save(conv_model("N"), str(model))
    rows = np.random.default_rng(1).random((10, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "data.npz", x=rows)
    result = deploy_run(RunConfig(
        model_path=str(model), profile="local", runtime=runtime, quant=QuantConfig(scheme="int8"), batch=4,
        calib_data=str(tmp_path / "data.npz"), eval_data=str(tmp_path / "data.npz"),
        bench=BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.1, rounds=1)))
    assert result.valid
    assert result.model.inputs == {"x": (4, 3, 8, 8)} and result.model.batch == 4
    latency = result.latency_ms
    assert latency.batch == 4 and latency.per_sample_ms == pytest.approx(latency.mean / 4)
    assert latency.throughput_per_s == pytest.approx(4000 / latency.mean)
    assert result.agreement.samples == 8  # two whole batches of the ten rows, each row compared
    assert result.agreement.cosine > 0.99 and result.baseline.latency_ms.batch == 4
