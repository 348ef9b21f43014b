"""Winograd F(4x4, 3x3) for float 3x3 convs on CPU: the convs that pay for it are rewritten, the others are not,
and the network computes what onnxruntime computes, untuned and tuned (through the transforms' own schedule
rules)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from pipeline.compiler.passes.fastmath import fast_math  # noqa: E402
from pipeline.compiler.passes.layout import channels_last  # noqa: E402
from pipeline.compiler.passes.winograd import (  # noqa: E402
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    count_winograd_convs,
    transform_matrices,
    winograd_convs,
)

TARGET = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}


def _convs(c: int, h: int, w: int, layers: list[dict], batch: int = 1) -> onnx.ModelProto:
    """x[batch, c, h, w] through each layer: Conv (its ``o`` outputs, ``k``, ``pads``, ``strides``, ``dilations``,
    ``group``) with a bias, then SiLU as x * Sigmoid(x) (as YOLOX exports it), then the layer's input added if
    ``residual`` (YOLOX's bottlenecks)."""
    rng = np.random.default_rng(7)
    nodes, inits, name, shape = [], [], "x", [batch, c, h, w]
    for i, layer in enumerate(layers):
        o, k, group = layer["o"], layer.get("k", 3), layer.get("group", 1)
        inits += [numpy_helper.from_array((rng.standard_normal((o, c // group, k, k)) / np.sqrt(k * k * c / group))
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(o).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("Conv", [name, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[k, k], group=group,
                                   pads=layer.get("pads", [k // 2] * 4), strides=layer.get("strides", [1, 1]),
                                   dilations=layer.get("dilations", [1, 1])),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"y{i}"])]
        if layer.get("residual"):
            nodes.append(helper.make_node("Add", [f"y{i}", name], [f"r{i}"]))
        name, c = f"r{i}" if layer.get("residual") else f"y{i}", o
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _model(c: int, h: int, w: int, layers: list[dict], batch: int = 1) -> tuple[onnx.ModelProto, np.ndarray,
                                                                                np.ndarray]:
    """The model, an input, and what onnxruntime computes from it."""
    model = _convs(c, h, w, layers, batch)
    x = np.random.default_rng(3).standard_normal((batch, c, h, w)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, x, session.run(None, {"x": x})[0]


def _relax(model: onnx.ModelProto, x: np.ndarray) -> tvm.IRModule:
    """The model as compile.relax_module lays it out for a CPU: channel-last, Winograd, vector sigmoid."""
    mod = winograd_convs(channels_last(from_onnx(model, shape_dict={"x": list(x.shape)}, keep_params_in_input=False)))
    return fast_math(mod)[0]


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    # F(4x4, 3x3) in float32: rounding of the transforms, a few 1e-6 of the largest output on these data
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()


def test_the_transform_matrices_compute_a_3_tap_correlation():
    a, b, g = transform_matrices()
    rng = np.random.default_rng(0)
    d, f = rng.standard_normal(6), rng.standard_normal(3)
    np.testing.assert_allclose(a.T @ ((g @ f) * (b.T @ d)), [d[i:i + 3] @ f for i in range(4)], atol=1e-12)


@pytest.mark.parametrize(("c", "h", "w", "layer"), [
    (96, 52, 52, {"o": 96}),                      # YOLOX's heaviest conv
    (48, 13, 13, {"o": 16}),                      # 16 tiles, the last row and column of each partly outside
    (16, 14, 19, {"o": 32, "pads": [0, 1, 2, 0]}),  # asymmetric padding, not square
])
def test_a_winograd_conv_computes_the_direct_conv(c, h, w, layer):
    model, x, expected = _model(c, h, w, [layer])
    mod = _relax(model, x)
    assert count_winograd_convs(mod) == 1
    got = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    _assert_close(got, expected)


@pytest.mark.parametrize(("c", "h", "w", "layer", "batch", "why"), [
    (32, 16, 16, {"o": 32, "group": 32}, 1, "depthwise"),
    (32, 32, 32, {"o": 32, "strides": [2, 2]}, 1, "stride 2"),
    (32, 20, 20, {"o": 32, "dilations": [2, 2], "pads": [2] * 4}, 1, "dilated"),
    (32, 16, 16, {"o": 32, "k": 1}, 1, "1x1"),
    (24, 20, 20, {"o": 32}, 1, "24 input channels: a vector part empty"),
    (32, 20, 20, {"o": 24}, 1, "24 output channels"),
    (32, 8, 8, {"o": 32}, 1, "4 tiles: matmuls of 4 rows (the digits CNN's 8x8 maps)"),
    (32, 16, 16, {"o": 32}, 2, "a batch of 2"),
])
def test_convs_winograd_would_not_pay_for_or_cannot_do_stay_direct(c, h, w, layer, batch, why):
    model, x, _ = _model(c, h, w, [layer], batch)
    assert count_winograd_convs(_relax(model, x)) == 0, why


@pytest.mark.slow
def test_tuned_winograd_kernels_use_their_rules_and_compute_the_direct_conv(tmp_path):
    """Two 3x3 convs back to back, the second with a residual add (a YOLOX bottleneck), on a map that leaves the
    last tiles partly outside, the first conv padded unevenly: each transform its own kernel, the bias,
    activation and residual inside the output transform, every kernel tuned, the result onnxruntime's."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    from pipeline.compiler.tuning.lowering import fused
    from pipeline.compiler.tuning.search import tune_and_compile

    model, x, expected = _model(16, 15, 15, [{"o": 32, "pads": [0, 1, 2, 0]}, {"o": 32, "residual": True}])
    mod = _relax(model, x)
    assert count_winograd_convs(mod) == 2
    kernels = [str(gv.name_hint) for gv, func in fused(mod, tvm.target.Target(TARGET)).functions.items()
               if not isinstance(func, relax.Function)]
    # Regression: FuseOps once fused the first output transform, its SiLU and the second input transform.
    assert not [k for k in kernels if INPUT_PREFIX in k and OUTPUT_PREFIX in k]
    # bias add, sigmoid, multiply and the residual add fused into the second output transform
    assert [k for k in kernels if OUTPUT_PREFIX in k and re.search(r"sigmoid\d*_multiply\d*_add", k)]

    executable, tuning = tune_and_compile(mod, TARGET, 2, tmp_path / "db")
    assert tuning.scheduled == tuning.tasks
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    _assert_close(got, expected)
    # The transforms were scheduled by their rules: one tile per parallel iteration, channels in vectors.
    database = JSONDatabase(str(tmp_path / "db" / "database_workload.json"),
                            str(tmp_path / "db" / "database_tuning_record.json"))
    traces = [str(record.trace) for record in database.get_all_tuning_records()]
    assert any("winograd_rows" in trace and "vectorize" in trace for trace in traces)
    assert any("winograd_columns" in trace and "reverse_compute_at" in trace for trace in traces)


def test_a_schedule_rule_that_fails_leaves_the_kernel_unscheduled_not_the_tuning_run_ended(caplog):
    """MetaSchedule calls the rules inside its search: an error there would end the whole tuning run."""
    from tvm.s_tir import Schedule

    from pipeline.compiler.passes.relax_util import falling_back
    from pipeline.compiler.passes.winograd import winograd_input

    def broken(sch, block):
        raise ValueError("a fused op the rule was not written for")

    sch = Schedule(winograd_input((1, 16, 16, 16), 1, 1, (16, 16)))
    with caplog.at_level("WARNING"):
        schedules = falling_back(broken, "Winograd")(sch, sch.get_sblock("winograd_input"))
    assert len(schedules) == 1 and schedules[0] is sch  # as it came: the rule worked on a copy
    assert "left unscheduled" in caplog.text and "a fused op the rule was not written for" in caplog.text
