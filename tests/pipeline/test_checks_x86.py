"""A model that comes QDQ int8 brings its own weights: on x86 without VNNI, 8-bit ones may saturate onnxruntime's
VPMADDUBSW kernels, whether onnxruntime is measured or is the baseline TVM's agreement is measured against."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.checks import run_checks
from pipeline.compiler.frontend import tvm_importable_ops
from pipeline.graph_stats import widest_int8_weight
from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig
from targets.host import Toolchain
from targets.profiles import load_profile

NAME = "prequantized weights on x86 without VNNI"


def qdq_conv(widest: int) -> onnx.ModelProto:
    """x[1,8,8,8] -> Conv whose int8 weight (|w| up to ``widest``) a DequantizeLinear reads -> y."""
    rng = np.random.default_rng(0)
    w = rng.integers(-widest, widest + 1, (4, 8, 3, 3)).astype(np.int8)
    w.flat[0] = widest
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "qdq_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.array(0.01, np.float32), "w_scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    out = {}
    for widest in (64, 127):
        folder = tmp_path_factory.mktemp(f"qdq{widest}")
        onnx.save(qdq_conv(widest), str(folder / "m.onnx"))
        out[widest] = ingest(folder / "m.onnx", folder)
    return out


def _check(info, profile: str, runtime: str, reference: str | None = None):
    info = info.model_copy(update={"reference_path": reference})
    report = run_checks(onnx.load(info.prepared_path), info, load_profile(profile), QuantConfig(scheme="int8"),
                        runtime=runtime, importable=tvm_importable_ops(),
                        toolchain=Toolchain(arch="x86_64", compilers=frozenset({"gcc"}), cuda=None))
    return next(r for r in report.results if r.check == NAME)


def test_the_widest_weight_is_read_from_the_dequantized_int8_constants():
    assert widest_int8_weight(qdq_conv(64)) == 64 and widest_int8_weight(qdq_conv(127)) == 127
    assert widest_int8_weight(onnx.ModelProto()) == 0


@pytest.mark.parametrize(("widest", "profile", "runtime", "reference", "verdict", "words"), [
    (127, "x86-server", "tvm", None, "warn", "the baseline, onnxruntime on this QDQ model, may saturate"),
    (127, "x86-server", "onnxruntime", None, "warn", "its measured accuracy decides"),
    (127, "x86-server", "tvm", "fp32.onnx", "pass", "the baseline is the fp32 --reference"),
    (64, "x86-server", "tvm", None, "pass", "7-bit weights"),
    (127, "x86-server-vnni", "tvm", None, "pass", "not applicable"),
    (127, "raspberry-pi-4", "onnxruntime", None, "pass", "not applicable"),
])
def test_eight_bit_qdq_weights_are_flagged_where_onnxruntime_may_saturate(infos, widest, profile, runtime, reference,
                                                                           verdict, words):
    assert infos[widest].prequantized
    result = _check(infos[widest], profile, runtime, reference)
    assert result.verdict == verdict and words in result.reason, result.reason
    if verdict == "warn":
        assert "VPMADDUBSW" in result.fact and "--reference" in result.reason + result.fix
