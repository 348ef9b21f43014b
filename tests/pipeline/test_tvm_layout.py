"""Channel-last networks for CPU targets: every conv becomes NHWC, no permute is left between layers, and the
network computes what it computed in NCHW (float: to rounding; integer: bit for bit)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.workloads.base import Samples
from tests.pipeline.test_tvm_int8 import (
    CALIBRATION_RANGE,
    _chain_of_convs,
    _heavy_ops,
    _import,
    _int8_model,
    _output_step,
    _vm,
)
from tests.qdq_reference import QdqReference

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from pipeline.compiler.passes.fastmath import multiply_by_reciprocal  # noqa: E402
from pipeline.compiler.passes.int8 import drop_float_round_trips, integerize  # noqa: E402
from pipeline.compiler.passes.layout import channels_last, count_permutes  # noqa: E402
from pipeline.compiler.passes.relax_util import count_calls, transposed_constants  # noqa: E402


def _mobilenet_block() -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv 3x3/2 -> HardSwish as x * HardSigmoid(x) (Clip inside, as PP-LCNet exports it) ->
    depthwise Conv 3x3 -> ReLU6 (Clip) -> 1x1 Conv -> GlobalAveragePool -> Flatten -> Gemm -> y[1,10]."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in (
        ("w0", rng.standard_normal((16, 3, 3, 3)) / 3), ("b0", rng.standard_normal(16)),
        ("wd", rng.standard_normal((16, 1, 3, 3)) / 3), ("w1", rng.standard_normal((32, 16, 1, 1)) / 4),
        ("g", rng.standard_normal((10, 32)) / 6), ("lo", 0.0), ("hi", 6.0))]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSigmoid", ["c0"], ["s0"], alpha=1 / 6),
        helper.make_node("Mul", ["c0", "s0"], ["h0"]),
        helper.make_node("Conv", ["h0", "wd"], ["d"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Clip", ["d", "lo", "hi"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["c1"]),
        helper.make_node("GlobalAveragePool", ["c1"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _conv_layouts(mod) -> set[tuple[str, str]]:
    found = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.conv2d":
            found.add((str(expr.attrs.data_layout), str(expr.attrs.kernel_layout)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _inputs(count: int) -> np.ndarray:
    return np.random.default_rng(5).uniform(*CALIBRATION_RANGE, (count, 1, 3, 16, 16)).astype(np.float32)


def _outputs(mod) -> list[np.ndarray]:
    vm = _vm(mod)
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in _inputs(3)]


def test_float_network_becomes_channel_last_and_computes_the_same(tmp_path):
    onnx.save(_mobilenet_block(), str(tmp_path / "block.onnx"))
    mod = _import(tmp_path / "block.onnx", {"x": [1, 3, 16, 16]})
    nhwc = channels_last(mod)
    assert _conv_layouts(nhwc) == {("NHWC", "HWIO")}
    # Into NHWC at the input, back before Flatten: nothing in between (Clip once needed a permute either side).
    assert count_permutes(nhwc) == 2
    for ours, expected in zip(_outputs(nhwc), _outputs(mod), strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_integer_network_becomes_channel_last_bit_for_bit(tmp_path):
    """uint8 activations with zero points far from 0: padded convs pad with the zero point explicitly, and
    every quantize/dequantize between the layers must cross into NHWC with them."""
    onnx.save(_mobilenet_block(), str(tmp_path / "block.onnx"))
    calibration = Samples({"x": _inputs(16)[:, 0]})
    path = _int8_model(tmp_path / "block.onnx", tmp_path, calibration, "uint8")
    integer, count = integerize(_import(path, {"x": [1, 3, 16, 16]}))
    assert count == 4
    nhwc = channels_last(integer)
    assert _conv_layouts(nhwc) == {("NHWC", "HWIO")}
    assert count_permutes(nhwc) == 2
    assert count_calls(nhwc, lambda call: call.op.name == "relax.nn.pad") == 2  # both 3x3 convs, inside no permute
    for ours, expected in zip(_outputs(nhwc), _outputs(integer), strict=True):
        np.testing.assert_array_equal(ours, expected)


def test_cpu_networks_keep_narrow_convs_in_float_and_still_match_the_qdq_arithmetic(tmp_path):
    """What compile.relax_module does for a CPU: the 3-channel stem and the depthwise conv have no channels for the
    8-bit dot products to sum, so they compute in float on the dequantized tensors; the 1x1 conv and the Gemm in
    integers. The result still agrees with what the QDQ model defines (tests.qdq_reference)."""
    onnx.save(_mobilenet_block(), str(tmp_path / "block.onnx"))
    calibration = Samples({"x": _inputs(16)[:, 0]})
    path = _int8_model(tmp_path / "block.onnx", tmp_path, calibration, "uint8")
    mixed, count = integerize(_import(path, {"x": [1, 3, 16, 16]}), narrow_convs_in_float=True)
    assert count == 2
    inputs_by_op = [(name, inputs) for name, inputs, _ in _heavy_ops(mixed)]
    assert inputs_by_op == [("relax.nn.conv2d", ("float32", "float32"))] * 2 + [
        ("relax.nn.conv2d", ("uint8", "int8")), ("relax.matmul", ("uint8", "int8"))]
    nhwc = channels_last(mixed)
    assert _conv_layouts(nhwc) == {("NHWC", "HWIO")} and count_permutes(nhwc) == 2
    # No zero-point pad is left: the float convs pad with 0.0 themselves, the 1x1 conv has no border.
    assert count_calls(nhwc, lambda call: call.op.name == "relax.nn.pad") == 0
    # Every quantize requantizes with a multiply (pipeline.compiler.passes.fastmath), no divide per element is left.
    divides = count_calls(nhwc, lambda call: call.op.name == "relax.divide")
    nhwc, rewritten = multiply_by_reciprocal(nhwc)
    assert rewritten == divides > 0 and count_calls(nhwc, lambda call: call.op.name == "relax.divide") == 0
    reference, step = QdqReference(path), _output_step(path)
    for ours, x in zip(_outputs(nhwc), _inputs(3), strict=True):
        (exact,) = reference.run(None, {"x": x})
        assert np.abs(ours - exact).max() <= 2 * step + 1e-6


def test_round_trips_into_float_ops_are_dropped_and_the_result_nears_fp32(tmp_path):
    """What compile.relax_module does next for a CPU: of the block's 9 quantize -> dequantize round trips, the 7
    that feed only float ops (the input into the float stem, both sides of the HardSigmoid, into and out of the
    depthwise conv, ...) are dropped; the two tensors the integer 1x1 conv and Gemm read are still rounded to uint8.
    With fewer roundings the output lies closer to the fp32 model's than the QDQ model's own output does."""
    import onnxruntime as ort

    onnx.save(_mobilenet_block(), str(tmp_path / "block.onnx"))
    path = _int8_model(tmp_path / "block.onnx", tmp_path, Samples({"x": _inputs(16)[:, 0]}), "uint8")
    mixed, _ = integerize(_import(path, {"x": [1, 3, 16, 16]}), narrow_convs_in_float=True)
    float_between, dropped = drop_float_round_trips(mixed)
    assert dropped == 7
    assert _heavy_ops(float_between) == _heavy_ops(mixed)  # same convs, the same two read uint8
    assert count_calls(float_between, lambda call: call.op.name == "relax.quantize") == 2
    # What dequantizes now is only constant weights (the float convs'), which constant folding turns into floats.
    assert count_calls(float_between, lambda call: call.op.name == "relax.dequantize"
                       and not isinstance(call.args[0], tvm.ir.GenericConst)) == 0
    fp32 = ort.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])
    int8 = QdqReference(path)
    ours_off = int8_off = 0.0
    for ours, x in zip(_outputs(channels_last(float_between)), _inputs(3), strict=True):
        (reference,), (exact,) = fp32.run(None, {"x": x}), int8.run(None, {"x": x})
        ours_off += np.abs(ours - reference).mean()
        int8_off += np.abs(exact - reference).mean()
        assert np.abs(ours - exact).max() <= 3 * _output_step(path)  # still an int8 network
    assert ours_off < int8_off


def test_a_round_trip_keeps_its_clamp_where_onnxruntime_removed_a_relu(tmp_path):
    """onnxruntime's quantizer drops a Relu in front of a QuantizeLinear whose range starts at 0: the pair's clamp is
    the ReLU. Regression: dropping the whole round trip lost it before a float op (here the pooling; the digits CNN
    fell from 99 % to 71 % top-1)."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in (
        ("w0", rng.standard_normal((16, 3, 3, 3)) / 3), ("w1", rng.standard_normal((16, 16, 1, 1)) / 4))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(tmp_path / "relu.onnx"))
    path = _int8_model(tmp_path / "relu.onnx", tmp_path, Samples({"x": _inputs(16)[:, 0]}), "uint8")
    assert "Relu" not in {node.op_type for node in onnx.load(path).graph.node}  # folded into the quantize's range
    mixed, count = integerize(_import(path, {"x": [1, 3, 16, 16]}), narrow_convs_in_float=True)
    float_between, dropped = drop_float_round_trips(mixed)
    # The 1x1 conv is integer; the input, the ReLU'd tensor the float pooling reads and the output lose their rounding.
    assert (count, dropped) == (1, 3)
    reference = QdqReference(path)
    for ours, x in zip(_outputs(channels_last(float_between)), _inputs(3), strict=True):
        (exact,) = reference.run(None, {"x": x})
        assert np.abs(ours - exact).max() <= 3 * _output_step(path)


def test_channel_last_layers_that_differ_only_in_scales_still_share_a_kernel(tmp_path):
    """The rewritten quantize/dequantize read their scales from one-element tensors, as before the layout pass
    (pipeline.compiler.passes.int8): written in as literals, every layer would be its own tuning task."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.lowering import decompose, fuse

    onnx.save(_chain_of_convs(), str(tmp_path / "chain.onnx"))
    calibration = Samples({"x": np.random.default_rng(3).uniform(*CALIBRATION_RANGE, (8, 8, 8, 8)).astype(np.float32)})
    path = _int8_model(tmp_path / "chain.onnx", tmp_path, calibration, "uint8")
    nhwc, _ = multiply_by_reciprocal(channels_last(integerize(_import(path, {"x": [1, 8, 8, 8]}))[0]))
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    tasks = ms.relax_integration.extract_tasks(fuse(decompose(nhwc, target), target), target)
    convs = sorted(int(task.weight) for task in tasks if "conv2d" in task.task_name)
    assert convs == [1, 2], [(task.task_name, int(task.weight)) for task in tasks]


def test_transposed_weights_are_folded_in_numpy_to_the_same_constants():
    """ConvertLayout leaves each weight as permute_dims(constant); folding them with Relax's FoldConstant compiled a
    kernel per weight (20 s of YOLOX int8's 25 s import). Folded in numpy: the same values, no permute_dims left."""
    w = np.arange(2 * 3 * 4 * 5, dtype=np.int8).reshape(2, 3, 4, 5)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 5, 3, 2), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(x, relax.op.permute_dims(relax.const(w), [2, 3, 1, 0])))
        bb.emit_func_output(out)
    before = bb.get()
    after = transposed_constants(before)
    assert count_calls(before, lambda c: c.op.name == "relax.permute_dims") == 1
    assert count_calls(after, lambda c: c.op.name == "relax.permute_dims") == 0
    feed = np.ones((4, 5, 3, 2), np.int8)
    assert np.array_equal(_vm(after)["main"](tvm.runtime.tensor(feed)).numpy(), np.transpose(w, [2, 3, 1, 0]) + 1)
