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


def test_a_nul_byte_in_a_location_is_refused_not_a_traceback(tmp_path):
    """It used to end in `ValueError: embedded null byte` (exit 1) from the symlink probe."""
    path = _with_external(tmp_path, "weights.bin\x00../../etc/passwd")
    with pytest.raises(UnsafeModelError, match="outside the model's folder") as info:
        load_model_safely(path)
    assert "\\x00" in info.value.context["location"]


def test_a_hard_linked_data_file_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(108, np.float32).tobytes())
    path = _with_external(tmp_path, "weights.bin")
    os.link(secret, path.parent / "weights.bin")
    with pytest.raises(UnsafeModelError, match="hard link"):
        load_model_safely(path)


def test_a_model_functions_external_tensors_are_checked_too(tmp_path):
    """A model function's Constant node can carry an external tensor: the graph walk used to skip functions."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("c", TensorProto.FLOAT, [4], vals=[0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    function = helper.make_function("local", "AddC", ["x"], ["y"], [
        helper.make_node("Constant", [], ["k"], value=tensor), helper.make_node("Add", ["x", "k"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddC", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("local", 1)])
    path = tmp_path / "fn.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsafeModelError) as info:
        load_model_safely(path)
    assert info.value.context["location"] == "../../etc/passwd" and UnsafeModelError.exit_code == 2


def test_an_input_too_large_to_sample_is_refused_before_anything_is_drawn():
    from onnx import TensorProto, helper

    from edgedeploy.errors import OptionError
    from pipeline.ingest import resolve_input_shapes

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100000, 100000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100000, 100000])])
    with pytest.raises(OptionError, match="1e\\+10 elements") as info:
        resolve_input_shapes(helper.make_model(graph), {})
    assert "--input-shape x=" in info.value.fix
