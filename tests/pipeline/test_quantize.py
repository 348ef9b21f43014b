"""Quantization with onnxruntime: QDQ int8 as configured, fp16 in an order TVM can import."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgedeploy.errors import QuantizationError
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads.base import Samples
from tests.conftest import int8_on_this_host


def _calibration(n=16):
    return Samples({"x": np.random.default_rng(0).random((n, 3, 8, 8), dtype=np.float32)}, None, "random")


def _produced_before_use(graph: onnx.GraphProto) -> bool:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if not all(i in available for i in node.input):
            return False
        available.update(node.output)
    return True


def test_int8_is_qdq_u8s8_per_channel(conv_onnx, tmp_path):
    q = quantize(conv_onnx, tmp_path, QuantConfig(scheme="int8"), _calibration())
    model = onnx.load(q.path)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "QLinearConv" not in ops
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [v for k, v in inits.items() if k.endswith("_zero_point")]
    assert any(z.dtype == np.uint8 for z in zero_points) and any(z.dtype == np.int8 for z in zero_points)
    weight_scales = [v for k, v in inits.items() if k.startswith("w") and k.endswith("_scale")]
    assert weight_scales and weight_scales[0].shape == (4,)  # one scale per output channel
    assert q.calibration_samples == 16


def test_per_tensor_has_one_weight_scale(conv_onnx, tmp_path):
    q = quantize(conv_onnx, tmp_path, QuantConfig(scheme="int8", per_channel=False), _calibration())
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(q.path).graph.initializer}
    assert all(v.size == 1 for k, v in inits.items() if k.startswith("w") and k.endswith("_scale"))


def test_percentile_calibration_clips_differently_from_minmax(conv_onnx, tmp_path):
    scales = {}
    for method in ("minmax", "percentile"):
        (tmp_path / method).mkdir()
        q = quantize(conv_onnx, tmp_path / method, QuantConfig(scheme="int8", calibration=method), _calibration(64))
        scales[method] = {t.name: numpy_helper.to_array(t) for t in onnx.load(q.path).graph.initializer
                          if t.name.endswith("_scale")}
    assert any(not np.allclose(scales["minmax"][k], scales["percentile"][k]) for k in scales["minmax"])


def test_fp16_keeps_fp32_io_and_is_topologically_sorted(conv_onnx, tmp_path):
    q = quantize(conv_onnx, tmp_path, QuantConfig(scheme="fp16"), None)
    model = onnx.load(q.path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _produced_before_use(model.graph)  # regression: the converter appended input Casts last
    x = _calibration(1).inputs["x"]
    half = ort.InferenceSession(q.path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    full = ort.InferenceSession(str(conv_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(half, full, rtol=1e-2, atol=1e-2)


def test_int8_without_calibration_is_refused(conv_onnx, tmp_path):
    with pytest.raises(QuantizationError, match="calibration"):
        quantize(conv_onnx, tmp_path, QuantConfig(scheme="int8"), None)


def test_int8_of_an_opset11_model_is_valid_onnx(tmp_path):
    """Regression: per-channel DequantizeLinear(axis=...) inside an opset-11 model failed onnx.checker in TVM."""
    from tests.conftest import conv_model

    model = conv_model()
    model.opset_import[0].version = 11
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    q = quantize(path, tmp_path, QuantConfig(scheme="int8"), _calibration())
    quantized = onnx.load(q.path)
    onnx.checker.check_model(quantized)
    assert quantized.opset_import[0].version >= 13


def test_dynamic_quantization_of_a_transformer_needs_no_calibration_and_keeps_its_outputs(tmp_path):
    """onnxruntime's dynamic int8: weights int8, activations quantized on every run (DynamicQuantizeLinear ->
    MatMulInteger); no calibration data; the logits stay close to fp32's."""
    from tests.conftest import tiny_vit

    path = tmp_path / "vit.onnx"
    onnx.save(tiny_vit(), str(path))
    # the checks' config for onnxruntime here: 7-bit weights where the CPU has no VNNI (8-bit ones saturate
    # its MatMulInteger there: cosine 0.96 on an AVX2 EPYC)
    config = int8_on_this_host("dynamic")
    dynamic = quantize(path, tmp_path, config, None)
    assert dynamic.config.label() == "dynamic int8 per-channel" + (" reduce-range" if config.reduce_range else "")
    assert dynamic.calibration_samples == 0
    ops = {n.op_type for n in onnx.load(dynamic.path).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    x = np.random.default_rng(0).standard_normal((1, 16, 48)).astype(np.float32)
    fp32, int8 = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                  for p in (str(path), dynamic.path))
    cosine = float((fp32 * int8).sum() / np.linalg.norm(fp32) / np.linalg.norm(int8))
    assert cosine > 0.99 and int8.argmax() == fp32.argmax()


def test_mse_calibration_clips_outliers_and_keeps_the_model_close(tmp_path):
    """--calibration mse: each tensor's clipping range by least squared quantization error on the calibration data;
    the ranges it writes are at most min/max's, and narrower for some tensor; the int8 model stays close to fp32."""
    import json

    from pipeline.workloads import WORKLOADS

    digits = WORKLOADS["digits-cnn"]
    calibration = digits.calibration(64)
    mse = quantize(digits.model_path(), tmp_path, QuantConfig(scheme="int8", calibration="mse"), calibration,
                   out_name="mse.onnx")
    minmax = quantize(digits.model_path(), tmp_path, QuantConfig(scheme="int8"), calibration, out_name="minmax.onnx",
                      calibration_cache=tmp_path / "minmax-ranges.json")
    assert mse.config.label() == "int8 QDQ U8S8 mse per-channel" and minmax.config.calibration == "minmax"
    chosen = json.loads((tmp_path / "mse.mse-ranges.json").read_text())
    observed = json.loads((tmp_path / "minmax-ranges.json").read_text())
    widths = {name: _width(chosen, name) / max(_width(observed, name), 1e-12) for name in _tensors(chosen)
              if name in _tensors(observed)}
    assert widths and max(widths.values()) <= 1.0 + 1e-5 and min(widths.values()) < 0.99
    x = digits.evaluation(32).inputs
    name = next(iter(x))
    fp32, int8 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {name: x[name]})[0]
                  for p in (digits.model_path(), mse.path))
    assert (fp32.argmax(1) == int8.argmax(1)).mean() > 0.9


def _tensors(cache: dict) -> dict:
    return cache.get("data") or cache.get("tensors") or {}


def _width(cache: dict, name: str) -> float:
    """highest - lowest of a tensor in onnxruntime's calibration cache (values as {"data": [v], ...} arrays)."""
    entry = _tensors(cache)[name]

    def value(v) -> float:
        v = v["data"] if isinstance(v, dict) else v
        return float(v[0] if isinstance(v, list) else v)

    return value(entry["highest"]) - value(entry["lowest"])


def test_the_calibration_options_are_in_the_label():
    config = QuantConfig(scheme="int8", calibration="percentile", percentile=99.9, activation_type="int8",
                         symmetric_activations=True)
    assert config.label() == "int8 QDQ S8S8 percentile 99.9 per-channel symmetric"
