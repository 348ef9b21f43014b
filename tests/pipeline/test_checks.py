"""Table-driven: profile x scheme x model kind -> the verdict and the reason each check gives."""

from __future__ import annotations

import onnx
import pytest

from pipeline.checks import run_checks
from pipeline.compiler.frontend import tvm_importable_ops
from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig
from targets.host import CudaTools, Toolchain, detect_toolchain
from targets.profiles import load_profile
from tests.conftest import conv_integer_model, conv_model, lstm_model, qoperator_model

MODELS = {"cnn": conv_model, "qoperator": qoperator_model, "convinteger": conv_integer_model, "lstm": lstm_model}
# This machine as the checks see it, fixed so the table doesn't depend on where the tests run: the cross linker, and
# no CUDA wheels (the GPU builds' toolchain is its own test below).
X86_WITH_CROSS_AND_CUDA13 = Toolchain(arch="x86_64", compilers=frozenset({"gcc", "aarch64-linux-gnu-gcc"}), cuda=None)
IMPORTABLE = tvm_importable_ops()

# profile, scheme, model kind, runtime, check, verdict, words the reason must contain
TABLE = [
    ("jetson-nano", "int8", "cnn", "tvm", "precision vs arithmetic", "refuse", "DP4A"),
    ("jetson-nano", "int8", "cnn", "onnxruntime-tensorrt", "precision vs arithmetic", "refuse", "DP4A"),
    ("jetson-nano", "int8", "cnn", "onnxruntime-cuda", "precision vs arithmetic", "refuse", "DP4A"),
    ("jetson-nano", "fp16", "cnn", "tvm", "precision vs arithmetic", "pass", "native fp16"),
    ("jetson-nano", "fp16", "cnn", "onnxruntime-tensorrt", "precision vs arithmetic", "pass", "GPU"),
    # onnxruntime runs on the CPU: the Cortex-A57 has no fp16, and int8 there is not the GPU's DP4A question
    ("jetson-nano", "fp16", "cnn", "onnxruntime", "precision vs arithmetic", "refuse", "CPU (cortex-a57)"),
    ("jetson-nano", "int8", "cnn", "onnxruntime", "precision vs arithmetic", "warn", "no int8 dot-product"),
    ("jetson-nano", "fp32", "cnn", "tvm", "runtime on the device", "refuse", "Python >= 3.10"),
    ("jetson-nano", "fp32", "cnn", "onnxruntime", "runtime on the device", "pass", "onnxruntime 1.11.0"),
    ("jetson-nano", "fp16", "cnn", "onnxruntime-tensorrt", "runtime on the device", "pass", "TensorRT 8.2.1"),
    ("jetson-nano", "fp16", "cnn", "tvm", "build toolchain", "refuse", "libdevice"),
    ("jetson-nano", "fp32", "cnn", "tvm", "memory fit", "pass", "of 4096 MB"),
    ("jetson-nano", "fp32", "cnn", "onnxruntime-tensorrt", "memory fit", "pass", "overhead ~900 MB"),
    ("jetson-orin-nano", "int8", "cnn", "onnxruntime-tensorrt", "precision vs arithmetic", "pass", "DP4A"),
    ("jetson-orin-nano", "int8", "cnn", "onnxruntime-cuda", "precision vs arithmetic", "warn", "TensorRT"),
    ("jetson-orin-nano", "int8", "cnn", "onnxruntime-tensorrt", "int8 format for TensorRT", "warn", "symmetric"),
    ("jetson-orin-nano", "int8", "cnn", "onnxruntime", "precision vs arithmetic", "pass", "int8 dot-product"),
    ("jetson-orin-nano", "fp16", "cnn", "onnxruntime", "precision vs arithmetic", "pass", "native fp16"),
    ("raspberry-pi-4", "fp32", "cnn", "onnxruntime-cuda", "runtime on the device", "refuse", "has none"),
    ("raspberry-pi-4", "fp16", "cnn", "tvm", "precision vs arithmetic", "refuse", "fp16 arithmetic"),
    ("raspberry-pi-4", "int8", "cnn", "tvm", "precision vs arithmetic", "warn", "speed-up will be small"),
    ("raspberry-pi-4", "fp32", "cnn", "tvm", "build toolchain", "pass", "aarch64-linux-gnu-gcc"),
    ("raspberry-pi-4", "fp32", "lstm", "tvm", "op coverage", "refuse", "LSTM"),
    ("raspberry-pi-4", "fp32", "lstm", "onnxruntime", "op coverage", "pass", "onnxruntime"),
    ("raspberry-pi-5", "fp16", "cnn", "tvm", "precision vs arithmetic", "pass", "native fp16"),
    ("raspberry-pi-5", "int8", "cnn", "tvm", "precision vs arithmetic", "pass", "int8 dot-product"),
    ("x86-server", "fp16", "cnn", "tvm", "precision vs arithmetic", "refuse", "F16C only converts"),
    ("x86-server", "int8", "cnn", "tvm", "precision vs arithmetic", "pass", "VPMADDUBSW"),
    ("x86-server", "int8", "cnn", "onnxruntime", "precision vs arithmetic", "warn", "no int8 dot-product"),
    ("x86-server", "int8", "cnn", "onnxruntime", "int8 format on x86 without VNNI", "warn", "reduce_range"),
    ("x86-server", "int8", "cnn", "tvm", "int8 format on x86 without VNNI", "pass", "7-bit weights"),
    ("x86-server-vnni", "int8", "cnn", "tvm", "precision vs arithmetic", "pass", "int8 dot-product"),
    ("x86-server-vnni", "int8", "cnn", "tvm", "int8 format on x86 without VNNI", "pass", "not applicable"),
    ("x86-server", "fp32", "qoperator", "tvm", "quantized format vs compiler", "refuse", "QLinearConv"),
    ("x86-server", "fp32", "convinteger", "tvm", "quantized format vs compiler", "refuse", "ConvInteger"),
    ("x86-server", "fp32", "qoperator", "onnxruntime", "quantized format vs compiler", "pass", "onnxruntime runs"),
    ("x86-server", "fp32", "cnn", "tvm", "build toolchain", "pass", "native build"),
    # dynamic quantization: onnxruntime on the CPU only, refused for TVM naming it
    ("x86-server-vnni", "dynamic", "cnn", "tvm", "precision vs arithmetic", "refuse", "dynamic quantization"),
    ("x86-server-vnni", "dynamic", "cnn", "onnxruntime", "precision vs arithmetic", "pass", "int8 dot-product"),
    ("x86-server", "dynamic", "cnn", "onnxruntime", "int8 format on x86 without VNNI", "warn", "reduce_range"),
    ("jetson-orin-nano", "dynamic", "cnn", "onnxruntime-tensorrt", "precision vs arithmetic", "refuse", "CPU scheme"),
]


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    out = {}
    for kind, build in MODELS.items():
        folder = tmp_path_factory.mktemp(kind)
        onnx.save(build(), str(folder / "m.onnx"))
        out[kind] = ingest(folder / "m.onnx", folder)
    return out


def _checks(infos, profile, scheme, kind, runtime, toolchain=X86_WITH_CROSS_AND_CUDA13):
    info = infos[kind]
    return run_checks(onnx.load(info.prepared_path), info, load_profile(profile), QuantConfig(scheme=scheme),
                      runtime=runtime, importable=IMPORTABLE, toolchain=toolchain)


@pytest.mark.parametrize(("profile", "scheme", "kind", "runtime", "check", "verdict", "words"), TABLE,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[3]}-{r[4].split()[0]}" for r in TABLE])
def test_verdict_table(infos, profile, scheme, kind, runtime, check, verdict, words):
    report = _checks(infos, profile, scheme, kind, runtime)
    result = next(r for r in report.results if r.check == check)
    assert result.verdict == verdict, result.reason
    assert words in result.reason + result.fact + (result.fix or "")
    if verdict == "refuse":
        assert result.fact and result.fix  # every refusal cites its fact and says what to do


def test_refusals_name_the_nodes(infos):
    report = _checks(infos, "x86-server", "fp32", "qoperator", "tvm")
    (fmt,) = [r for r in report.refused if r.check == "quantized format vs compiler"]
    assert fmt.nodes == ["conv_q (QLinearConv)"] and "onnxruntime" in fmt.fix
    lstm = _checks(infos, "raspberry-pi-4", "fp32", "lstm", "tvm").refused[0]
    assert lstm.nodes == ["lstm_0 (LSTM)"]


def test_avx2_int8_for_onnxruntime_is_switched_to_u8s8_reduce_range(infos):
    report = _checks(infos, "x86-server", "int8", "cnn", "onnxruntime")
    assert report.quant.activation_type == "uint8" and report.quant.reduce_range
    assert _checks(infos, "x86-server-vnni", "int8", "cnn", "onnxruntime").quant.reduce_range is False
    # TVM's int8 kernels use VPMADDUBSW there too (passes.dot's AVX2 layout), exact with 7-bit weights only.
    assert _checks(infos, "x86-server", "int8", "cnn", "tvm").quant.reduce_range is True
    assert _checks(infos, "x86-server-vnni", "int8", "cnn", "tvm").quant.reduce_range is False


@pytest.mark.parametrize(("profile", "runtime", "quant", "saturates"), [
    ("x86-server", "onnxruntime", QuantConfig(scheme="int8"), True),
    ("x86-server", "onnxruntime", QuantConfig(scheme="int8", format="qoperator"), True),
    ("x86-server", "onnxruntime", QuantConfig(scheme="int8", reduce_range=True), False),
    ("x86-server", "onnxruntime", QuantConfig(scheme="int8", activation_type="int8"), True),
    ("x86-server", "tvm", QuantConfig(scheme="int8"), False),
    ("x86-server-vnni", "onnxruntime", QuantConfig(scheme="int8"), False),
    ("raspberry-pi-4", "onnxruntime", QuantConfig(scheme="int8"), False),
])
def test_onnxruntime_int8_without_vnni_is_marked_as_possibly_saturating(profile, runtime, quant, saturates):
    from pipeline.checks_x86 import ort_int8_may_saturate

    caveat = ort_int8_may_saturate(load_profile(profile), quant, runtime)
    assert (caveat is not None) == saturates
    assert caveat is None or "VPMADDUBSW" in caveat


def test_memory_that_does_not_fit_is_refused(infos, tmp_path):
    small = tmp_path / "tiny-board.yaml"
    small.write_text("extends: raspberry-pi-4\nname: tiny-board\nmemory_mb: 64\n")
    info = infos["cnn"]
    report = run_checks(onnx.load(info.prepared_path), info, load_profile(str(small)), QuantConfig(),
                        importable=IMPORTABLE, toolchain=X86_WITH_CROSS_AND_CUDA13)
    (memory,) = [r for r in report.refused if r.check == "memory fit"]
    assert "of 64 MB" in memory.reason and memory.blocks == "run"


def test_missing_cross_toolchain_is_refused(infos):
    bare = Toolchain(arch="x86_64", compilers=frozenset({"gcc"}), cuda=None)
    report = _checks(infos, "raspberry-pi-4", "fp32", "cnn", "tvm", toolchain=bare)
    (tool,) = [r for r in report.refused if r.check == "build toolchain"]
    assert "gcc-aarch64-linux-gnu" in tool.fix and tool.blocks == "build"


def test_the_cuda_wheels_build_for_the_nano(infos, tmp_path):
    """libdevice + ptxas + nvFatbin: PTX and the sm_53 cubin; libdevice alone: PTX only (warned)."""
    libdevice = tmp_path / "nvvm" / "libdevice" / "libdevice.10.bc"
    libdevice.parent.mkdir(parents=True)
    libdevice.write_bytes(b"BC")
    cross = frozenset({"gcc", "aarch64-linux-gnu-gcc"})
    only_libdevice = _checks(infos, "jetson-nano", "fp16", "cnn", "tvm",
                             toolchain=Toolchain(arch="x86_64", compilers=cross, cuda=CudaTools(tmp_path)))
    tool = next(r for r in only_libdevice.results if r.check == "build toolchain")
    assert tool.verdict == "warn" and "PTX only" in tool.reason
    installed = detect_toolchain()
    if installed.cuda is None or installed.cuda.ptxas is None or installed.cuda.nvfatbin is None:
        pytest.skip("the CUDA 12 wheels are not installed here (make setup installs them)")
    full = _checks(infos, "jetson-nano", "fp16", "cnn", "tvm", toolchain=installed)
    tool = next(r for r in full.results if r.check == "build toolchain")
    assert tool.verdict == "pass" and "sm_53 cubin" in tool.reason


def test_a_gpu_runtime_on_a_machine_without_a_gpu_is_refused_before_any_build(infos):
    """`--runtime onnxruntime-cuda --profile local` here (no NVIDIA GPU): refused, the alternatives named."""
    report = _checks(infos, "local", "fp32", "cnn", "onnxruntime-cuda")
    (refusal,) = report.refused_for("build")
    assert refusal.check == "runtime on the device" and "nvidia-smi found none" in refusal.reason
    assert "--runtime onnxruntime" in refusal.fix


def test_tensorrt_int8_is_quantized_symmetric(infos):
    report = _checks(infos, "jetson-orin-nano", "int8", "cnn", "onnxruntime-tensorrt")
    assert report.quant.activation_type == "int8" and report.quant.symmetric_activations
    assert report.quant.format == "qdq" and not report.refused


def _vad_like() -> onnx.ModelProto:
    """A real VAD model's shape: the LSTM sits inside an If's branch; the main graph holds only If."""
    from onnx import TensorProto, helper

    inner = lstm_model().graph
    then_body = helper.make_graph(list(inner.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                             [5, 1, 1, 8])],
                                  list(inner.initializer))
    else_body = helper.make_graph([helper.make_node("Identity", ["zeros"], ["y"], name="nothing")], "else", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])],
                                  [helper.make_tensor("zeros", TensorProto.FLOAT, [5, 1, 1, 8], [0.0] * 40)])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="speech", then_branch=then_body, else_branch=else_body)], "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 6]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_an_lstm_inside_an_if_is_refused_as_lstm_and_named_where_it_is(infos):
    from pipeline.checks import check_op_coverage

    result = check_op_coverage(_vad_like(), "tvm", IMPORTABLE)
    assert result.verdict == "refuse" and "LSTM" in result.reason  # not only "If": TVM 0.27's table lacks both
    assert "lstm_0 (LSTM) in If 'speech' then_branch" in result.nodes


def test_ops_inside_a_models_function_are_checked_and_the_call_is_not_an_op():
    from onnx import TensorProto, helper

    from pipeline.checks import check_op_coverage

    block = helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node("LSTM", ["a", "W", "R"], ["b"],
                                                                                   name="inner_lstm")],
                                 [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Block", ["x"], ["y"], domain="local", name="call")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[block],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    result = check_op_coverage(model, "tvm", IMPORTABLE)
    assert result.verdict == "refuse" and result.nodes == ["inner_lstm (LSTM) in function 'Block'"]


def test_an_ir_version_the_devices_onnxruntime_cant_read_is_lowered_where_nothing_needs_it(tmp_path):
    """onnx 1.23's helper stamps IR 14; onnxruntime 1.31 reads up to 13: the model goes there as IR 13 and loads."""
    import onnxruntime as ort

    from pipeline.checks import check_ir_version
    from pipeline.opset import for_onnxruntime

    model = conv_model()
    model.ir_version = 14
    path = tmp_path / "ir14.onnx"
    onnx.save(model, str(path))
    result = check_ir_version(model, load_profile("local"), "onnxruntime")
    assert result.verdict == "warn" and "as IR 13" in result.reason
    sent = for_onnxruntime(path, "1.31.1", tmp_path / "out")
    assert onnx.load(str(sent)).ir_version == 13
    ort.InferenceSession(str(sent), providers=["CPUExecutionProvider"])  # loads
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
