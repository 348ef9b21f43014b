"""Integer conv2d/matmul for QDQ models in TVM: the rewrite happens, and it computes what the QDQ model defines
(tests.qdq_reference: exact, the same on every CPU; onnxruntime's own int8 kernels saturate on CPUs without VNNI)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from pipeline.workloads.base import Samples
from tests.qdq_reference import QdqReference

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend import onnx as onnx_frontend  # noqa: E402

from pipeline.compiler.passes.int8 import integerize  # noqa: E402

CALIBRATION_RANGE = (-1.0, 3.0)  # not centred on 0: uint8 activations get a zero point far from 0 and 128


class _Reader(CalibrationDataReader):
    def __init__(self, samples: Samples) -> None:
        self._rows = iter([{k: v[i : i + 1] for k, v in samples.inputs.items()} for i in range(len(samples))])

    def get_next(self):
        return next(self._rows, None)


def _int8_model(float_path, workdir, samples: Samples, activations: str, per_channel: bool = True) -> str:
    """QDQ model: uint8 asymmetric activations as the project quantizes today, or symmetric int8."""
    if activations == "uint8":
        config = QuantConfig(scheme="int8", per_channel=per_channel, activation_type="uint8")
        return quantize(float_path, workdir, config, samples).path
    out = str(workdir / "model.s8.onnx")
    quantize_static(str(float_path), out, _Reader(samples), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    return out


def _small_model() -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(8, 3x3, pad 1, no Relu so the next activation is signed) -> Flatten -> Gemm(16, transB)
    -> MatMul(10) -> y: a padded conv, a Gemm and a MatMul, all with biases or without."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w", rng.standard_normal((8, 3, 3, 3))), ("b", rng.standard_normal(8)),
        ("g", rng.standard_normal((16, 512)) / 16), ("gb", rng.standard_normal(16)),
        ("m", rng.standard_normal((16, 10)) / 4))]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "g", "gb"], ["h"], transB=1),
        helper.make_node("MatMul", ["h", "m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _heavy_ops(mod) -> list[tuple[str, tuple[str, ...], str]]:
    """(op, input dtypes, output dtype) of every conv2d/matmul in the module, read off the IR."""
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and \
                expr.op.name in ("relax.nn.conv2d", "relax.matmul"):
            found.append((expr.op.name, tuple(str(a.ty.dtype) for a in expr.args), str(expr.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _import(path, shape_dict):
    return onnx_frontend.from_onnx(onnx.load(str(path)), shape_dict=shape_dict, keep_params_in_input=False)


def _vm(mod):
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def _output_step(path) -> float:
    """The scale of the QuantizeLinear in front of the graph output: one quantization step of the result."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer[model.graph.output[0].name]
    assert dq.op_type == "DequantizeLinear"
    return float(inits[dq.input[1]])


def _zero_points(path, dtype) -> list[int]:
    model = onnx.load(str(path))
    return [int(numpy_helper.to_array(t).ravel()[0]) for t in model.graph.initializer
            if t.name.endswith("_zero_point") and numpy_helper.to_array(t).dtype == dtype]


def _assert_all_integer(mod, expected: int, activations: str) -> None:
    ops = _heavy_ops(mod)
    assert len(ops) == expected, ops
    for name, inputs, out in ops:
        assert inputs == (activations, "int8") and out == "int32", (name, inputs, out)


@pytest.mark.parametrize(("activations", "per_channel"), [("uint8", True), ("int8", True), ("uint8", False)])
def test_small_model_runs_in_integers_and_matches_the_qdq_arithmetic(tmp_path, activations, per_channel):
    float_path = tmp_path / "small.onnx"
    onnx.save(_small_model(), str(float_path))
    rng = np.random.default_rng(1)
    calibration = Samples({"x": rng.uniform(*CALIBRATION_RANGE, (16, 3, 8, 8)).astype(np.float32)})
    path = _int8_model(float_path, tmp_path, calibration, activations, per_channel)
    if activations == "uint8":
        # The case that needs the zero-point correction AND the zx padding of the conv's border.
        assert any(z not in (0, 128) for z in _zero_points(path, np.uint8))
    else:
        assert set(_zero_points(path, np.int8)) == {0}

    mod = _import(path, {"x": [1, 3, 8, 8]})
    assert {dt for _, (dt, _), _ in _heavy_ops(mod)} == {"float32"}  # the importer's fake quantization
    integer, count = integerize(mod)
    assert count == 3
    _assert_all_integer(integer, 3, activations)

    vm, reference = _vm(integer), QdqReference(path)
    step = _output_step(path)
    for x in rng.uniform(*CALIBRATION_RANGE, (4, 1, 3, 8, 8)).astype(np.float32):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        (exact,) = reference.run(None, {"x": x})
        assert np.abs(ours - exact).max() <= 2 * step + 1e-6


def test_fp32_model_is_left_alone(tmp_path):
    onnx.save(_small_model(), str(tmp_path / "small.onnx"))
    mod = _import(tmp_path / "small.onnx", {"x": [1, 3, 8, 8]})
    rewritten, count = integerize(mod)
    assert count == 0
    tvm.ir.assert_structural_equal(rewritten, mod)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    workload = WORKLOADS["digits-cnn"]
    workdir = tmp_path_factory.mktemp("digits")
    info = ingest(workload.model_path(), workdir)
    return workload, info, workdir / "model.static.onnx"


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_digits_cnn_integer_agrees_with_the_qdq_arithmetic(digits, tmp_path, activations):
    workload, info, static_path = digits
    path = _int8_model(static_path, tmp_path, workload.calibration(64), activations)
    name = info.inputs[0].name
    integer, count = integerize(_import(path, {name: list(info.inputs[0].shape)}))
    assert count == 4  # three Conv and the Gemm
    _assert_all_integer(integer, 4, activations)

    vm, reference = _vm(integer), QdqReference(path)
    samples = workload.evaluation(100)
    ours = np.concatenate([vm["main"](tvm.runtime.tensor(x[None])).numpy() for x in samples.inputs[name]])
    exact = np.concatenate([reference.run(None, {name: x[None]})[0] for x in samples.inputs[name]])
    assert (ours.argmax(1) == exact.argmax(1)).mean() >= 0.99
    assert np.abs(ours - exact).max() <= 2 * _output_step(path) + 1e-6
    # And the int8 model still classifies digits: a wrong rewrite shows up here even where both would agree.
    assert (ours.argmax(1) == samples.labels).mean() >= 0.9


def _chain_of_convs() -> onnx.ModelProto:
    """x[1,8,8,8] -> Conv -> Conv -> Conv (8 -> 8 channels, 3x3, pad 1): the first two differ only in their
    weights and the scales their activations get."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / (i + 1), f"w{i}")
             for i in range(3)]
    nodes = [helper.make_node("Conv", [src, f"w{i}"], [dst], pads=[1, 1, 1, 1])
             for i, (src, dst) in enumerate((("x", "a"), ("a", "b"), ("b", "y")))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_layers_that_differ_only_in_scales_share_one_tuning_task(tmp_path):
    """Each layer has its own quantization scales; written into the kernels as literals they made every layer a
    kernel of its own (PP-LCNet int8: 62 tuning tasks, 54 with the scales read from buffers)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.lowering import decompose, fuse

    onnx.save(_chain_of_convs(), str(tmp_path / "chain.onnx"))
    rng = np.random.default_rng(3)
    calibration = Samples({"x": rng.uniform(*CALIBRATION_RANGE, (8, 8, 8, 8)).astype(np.float32)})
    path = _int8_model(tmp_path / "chain.onnx", tmp_path, calibration, "uint8")
    integer, count = integerize(_import(path, {"x": [1, 8, 8, 8]}))
    assert count == 3
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    tasks = ms.relax_integration.extract_tasks(fuse(decompose(integer, target), target), target)
    convs = sorted(int(task.weight) for task in tasks if "conv2d" in task.task_name)
    # The first two convs (each requantized to the next layer's scale) are one kernel called twice; the last
    # one also dequantizes the output, a kernel of its own.
    assert convs == [1, 2], [(task.task_name, int(task.weight)) for task in tasks]

    vm, reference = _vm(integer), QdqReference(path)
    x = rng.uniform(*CALIBRATION_RANGE, (1, 8, 8, 8)).astype(np.float32)
    ours, (exact,) = vm["main"](tvm.runtime.tensor(x)).numpy(), reference.run(None, {"x": x})
    assert np.abs(ours - exact).max() <= 2 * _output_step(path) + 1e-6
