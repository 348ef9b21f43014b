"""Partial quantization: layers ranked by the error they add in int8, the fewest kept in float until the
accuracy budget is met, and the report naming them."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from rich.console import Console

from edgedeploy.errors import QuantizationError
from pipeline.compile import build
from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.ingest import ingest
from pipeline.partial import float_counts, plan_partial
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads.base import Samples
from targets.profiles import load_profile


def _data(folder: Path) -> PreparedData:
    return PreparedData(workload=None, kind="classifier", calibration_path=str(folder / "calib.npz"),
                        calibration_samples=64, calibration_source="random", eval_path=str(folder / "eval.npz"),
                        eval_samples=40, eval_source="random", has_labels=False)


def test_sensitive_layers_are_found_and_kept_in_float(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    plan = plan_partial(info, _data(tmp_path), QuantConfig(scheme="int8"), budget=0.02, workdir=tmp_path / "p")
    assert plan.full_int8_quality < 0.9  # the model really loses answers in full int8 ...
    assert plan.within_budget and plan.steps[-1].quality >= 0.98  # ... and gets them back
    # conv_a's output, whose per-tensor range the offset channel stretched, has the worst SQNR by far; keeping it float
    # takes conv_a (onnxruntime would quantize its output for a float reader too) and conv_b, its reader
    assert plan.ranking[0].name == "a" and plan.ranking[0].sqnr_db < plan.ranking[1].sqnr_db - 20
    assert plan.ranking[0].layers == ("conv_a", "conv_b")
    assert {t.name for t in plan.ranking} >= {"x", "a", "r", "g", "f", "wa", "wb", "wfc"}  # not only weighted layers
    assert set(plan.keep_float) == {"conv_a", "conv_b"}
    assert [s.kept_float for s in plan.steps] == [1]  # stops once within budget
    text = _render(plan)
    assert "conv_a, conv_b" in text and "2 of 5 layers kept in float" in text


def test_float_counts_grow_one_at_a_time_then_by_half():
    assert float_counts(3) == [1, 2, 3]
    assert float_counts(0) == []
    counts = float_counts(500)
    assert counts[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and counts[8:11] == [12, 18, 27] and counts[-1] == 500
    assert len(counts) < 25 and counts == sorted(set(counts))


def test_full_int8_within_budget_needs_no_float_layer(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    plan = plan_partial(info, _data(tmp_path), QuantConfig(scheme="int8"), budget=0.5, workdir=tmp_path / "p")
    assert plan.keep_float == () and plan.ranking == [] and plan.within_budget
    assert "no layer needs float" in plan.reason


def test_kept_layers_have_float_weights(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    calibration = Samples.load(tmp_path / "calib.npz", ["x"])
    q = quantize(Path(info.prepared_path), tmp_path, QuantConfig(scheme="int8", keep_float=("conv_b",)), calibration)
    model = onnx.load(q.path)
    produced_by = {out: node for node in model.graph.node for out in node.output}
    conv_a, conv_b = (next(n for n in model.graph.node if n.name == name) for name in ("conv_a", "conv_b"))
    assert produced_by[conv_a.input[1]].op_type == "DequantizeLinear"  # int8 weights
    assert conv_b.input[1] in {t.name for t in model.graph.initializer}  # float weights, as asked
    assert "(1 layers float)" in q.config.label()


def test_unnamed_layers_get_names_for_exclusion(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    model = onnx.load(info.prepared_path)
    assert all(node.name for node in model.graph.node)
    assert len({node.name for node in model.graph.node}) == len(model.graph.node)
    assert [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")] == ["conv_a", "conv_b", "fc"]


def test_partial_is_only_for_int8(sensitive_onnx, tmp_path):
    info = ingest(sensitive_onnx, tmp_path / "ingest")
    with pytest.raises(QuantizationError, match="for int8"):
        plan_partial(info, _data(tmp_path), QuantConfig(scheme="fp16"), budget=0.01, workdir=tmp_path)


def test_compile_with_partial_builds_the_kept_layers_in_float(sensitive_onnx, tmp_path):
    config = RunConfig(model_path=str(sensitive_onnx), quant=QuantConfig(scheme="int8"), partial=True,
                       calib_data=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "eval.npz"),
                       accuracy_budget=0.02)
    result = build(config, load_profile("local"), tmp_path / "out")
    assert set(result.quantized.config.keep_float) == {"conv_a", "conv_b"}
    assert Path(result.artifact.library_path).exists()


def _render(renderable) -> str:
    console = Console(width=160, record=True)
    console.print(renderable)
    return console.export_text()
