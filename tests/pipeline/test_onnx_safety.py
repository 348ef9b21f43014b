"""Bad model files: each gives one clear error naming the file (or tensor and location)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgedeploy.errors import ModelLoadError, UnsafeModelError
from pipeline.onnx_safety import load_model_safely
from tests.conftest import conv_model


def test_valid_model_loads(conv_onnx):
    model = load_model_safely(conv_onnx)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten"]


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_safely(tmp_path / "nope.onnx")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model_safely(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match=str(path)):
        load_model_safely(path)


def test_text_file(tmp_path):
    path = tmp_path / "readme.onnx"
    path.write_text("this is not a model\n" * 50)
    with pytest.raises(ModelLoadError):
        load_model_safely(path)


def test_truncated_file(tmp_path, conv_onnx):
    data = conv_onnx.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model_safely(path)


def test_size_cap(conv_onnx):
    with pytest.raises(ModelLoadError, match="size cap") as info:
        load_model_safely(conv_onnx, max_bytes=100)
    assert "--max-model-mb" in str(info.value)


def _with_external(tmp_path, location: str):
    model = conv_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "model" / "ext.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "sub/../../x", "/etc/passwd", ""])
def test_external_data_outside_folder_is_rejected(tmp_path, location):
    path = _with_external(tmp_path, location)
    with pytest.raises(UnsafeModelError) as info:
        load_model_safely(path)
    assert info.value.context["tensor"] == "w"
    assert info.value.context["location"] == location


def test_external_data_through_symlink_is_rejected(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(108, np.float32).tobytes())
    path = _with_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").symlink_to(secret)
    with pytest.raises(UnsafeModelError, match="symbolic link"):
        load_model_safely(path)


def test_external_data_inside_folder_loads(tmp_path):
    model = conv_model()
    expected = numpy_helper.to_array(model.graph.initializer[0])  # onnx.save below mutates the model
    path = tmp_path / "ok" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = load_model_safely(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), expected)
