"""A model whose weights live in an external file: the cache key covers the weights (a changed weights.bin used to get
the stale quantized model), and the device gets the weights with the baseline (the .onnx used to go alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.ingest import ingest
from pipeline.onnx_safety import self_contained
from pipeline.quantize import QuantConfig
from tests.conftest import sensitive_model

QUICK = BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.1, rounds=1)


def _external(folder: Path, scale: float = 1.0) -> Path:
    """The sensitive model with every initializer in weights.bin (scaled by ``scale``), and its data files."""
    model = sensitive_model()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), tensor.name))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", x=rng.standard_normal((32, 4, 8, 8)).astype(np.float32))
    np.savez(folder / "eval.npz", x=rng.standard_normal((16, 4, 8, 8)).astype(np.float32))
    return path


def test_the_models_digest_covers_its_external_weights(tmp_path):
    path = _external(tmp_path / "a")
    before = ingest(path, tmp_path / "w1").sha256
    assert ingest(path, tmp_path / "w2").sha256 == before
    _external(tmp_path / "b", scale=2.0)
    (tmp_path / "b" / "model.onnx").replace(path)  # same .onnx bytes: only weights.bin differs
    (tmp_path / "b" / "weights.bin").replace(tmp_path / "a" / "weights.bin")
    assert ingest(path, tmp_path / "w3").sha256 != before
    inline = self_contained(path, tmp_path / "inline")
    assert inline != path and not any(t.data_location == onnx.TensorProto.EXTERNAL
                                      for t in onnx.load(str(inline), load_external_data=False).graph.initializer)


@pytest.mark.slow
def test_changed_weights_are_quantized_again_and_the_device_gets_them(prefect_server, tmp_path):
    path = _external(tmp_path / "model")

    def run() -> object:
        folder = path.parent
        return deploy_run(RunConfig(model_path=str(path), profile="local", quant=QuantConfig(scheme="int8"),
                                    runtime="onnxruntime", calib_data=str(folder / "calib.npz"),
                                    eval_data=str(folder / "eval.npz"), bench=QUICK))

    first = run()
    assert first.valid and first.agreement.cosine > 0.9  # the baseline ran on the device with its weights
    _external(tmp_path / "other", scale=-1.0)
    (tmp_path / "other" / "weights.bin").replace(path.parent / "weights.bin")
    second = run()
    assert second.model.sha256 != first.model.sha256 and "quantize" not in second.reused
    outputs = [np.load(Path(r.result_path).parent / "outputs.artifact.npz")["outputs"] for r in (first, second)]
    assert not np.allclose(outputs[0], outputs[1])  # computed with the new weights
    assert json.loads(Path(second.result_path).read_text())["valid"]
