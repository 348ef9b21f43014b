"""Ingest: static rewrite checked against the original, counts, and input-shape errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgedeploy.errors import OptionError
from pipeline.ingest import ingest, needs_static_rewrite, parse_input_shapes, sample_inputs
from tests.conftest import conv_model, dynamic_reshape_model


def test_counts_of_a_known_model(conv_onnx, tmp_path):
    info = ingest(conv_onnx, tmp_path / "run")
    assert info.op_census == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1}
    assert info.parameters == 4 * 3 * 3 * 3 + 4
    # Conv: 2 * (4*8*8 outputs) * (3*3*3 MACs each); Relu 256, GAP 4, Flatten 4 elements.
    assert info.flops == 2 * 256 * 27 + 256 + 4 + 4
    assert info.inputs[0].shape == (1, 3, 8, 8)
    assert not info.static_rewrite


def test_dynamic_shapes_are_folded_and_checked(dynamic_onnx, tmp_path):
    assert needs_static_rewrite(dynamic_reshape_model())
    info = ingest(dynamic_onnx, tmp_path / "run", input_shapes={"x": (2, 3, 4, 4)})
    assert info.static_rewrite
    assert info.static_max_abs_diff is not None and info.static_max_abs_diff < 1e-5
    static = onnx.load(info.prepared_path)
    assert not {"Shape", "Range"} & {n.op_type for n in static.graph.node}
    feeds = sample_inputs(info.inputs, seed=7)
    original = ort.InferenceSession(str(dynamic_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    rewritten = ort.InferenceSession(info.prepared_path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(rewritten, original, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_defaults_to_one(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_model(batch="N"), str(path))
    assert ingest(path, tmp_path / "run").inputs[0].shape == (1, 3, 8, 8)


@pytest.mark.parametrize("spec", ["x", "x=", "x=1,a", "=1,2", "x=0,3"])
def test_bad_input_shape_syntax(spec):
    with pytest.raises(OptionError, match="--input-shape"):
        parse_input_shapes([spec])


def test_input_shape_for_unknown_input(conv_onnx, tmp_path):
    with pytest.raises(OptionError, match="doesn't have") as info:
        ingest(conv_onnx, tmp_path, input_shapes={"images": (1, 3, 8, 8)})
    assert "x" in info.value.expected


def test_input_shape_that_clashes_with_the_model(conv_onnx, tmp_path):
    with pytest.raises(OptionError, match="doesn't fit"):
        ingest(conv_onnx, tmp_path, input_shapes={"x": (1, 3, 16, 16)})
