"""Shared fixtures: tiny real ONNX models built with onnx.helper, and an isolated EDGEDEPLOY_HOME."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("edgedeploy-home")
    monkeypatch.setenv("EDGEDEPLOY_HOME", str(home))
    return home


def int8_on_this_host(scheme: str = "int8", runtime: str = "onnxruntime"):
    """The int8 QuantConfig the checks give ``runtime`` on this machine (the `local` profile): 7-bit weights
    (reduce-range) where the CPU has no VNNI, since the VPMADDUBSW kernels of onnxruntime, and of TVM there, saturate
    with 8-bit ones (pipeline.checks_x86.check_ort_int8_x86; docs/int8-saturation.md)."""
    from pipeline.checks_x86 import check_ort_int8_x86
    from pipeline.quantize import QuantConfig
    from targets.profiles import load_profile

    return check_ort_int8_x86(load_profile("local"), QuantConfig(scheme=scheme), runtime)[1]


def conv_model(batch: int | str = 1) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv(4 filters, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> y[batch,4]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def tvm_build(model: Path, folder: Path):
    """``model`` ingested and built by TVM as it is (fp32: QuantConfig()'s default) for this host (profile
    `local`), all under ``folder``: its CompiledArtifact (library_path, manifest_path)."""
    from pipeline.compiler.build import compile_model
    from pipeline.ingest import ingest
    from pipeline.quantize import QuantConfig, quantize
    from targets.profiles import load_profile

    info = ingest(model, folder / "ingest")
    quantized = quantize(folder / "ingest" / "model.static.onnx", folder, QuantConfig(), None)
    (folder / "out").mkdir()
    return compile_model(quantized, info, load_profile("local"), folder / "out")


def dynamic_reshape_model() -> onnx.ModelProto:
    """The PyTorch-export pattern TVM can't import: Shape -> Gather -> Concat -> Reshape, plus a Range grid.

    x[N,3,4,4] -> Reshape to [N, 48] (shape computed from x) -> MatMul w[48,2] -> + Range(0,2) -> y[N,2]
    """
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((48, 2)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0], np.int64), "zero_idx"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "start"),
        numpy_helper.from_array(np.array(1.0, np.float32), "step"),
        numpy_helper.from_array(np.array([1], np.int64), "one_idx"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_idx"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Shape", ["mm"], ["mm_shape"]),
        helper.make_node("Gather", ["mm_shape", "one_idx"], ["width_vec"], axis=0),
        helper.make_node("Squeeze", ["width_vec"], ["width_i"]),
        helper.make_node("Cast", ["width_i"], ["width"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["start", "width", "step"], ["grid"]),
        helper.make_node("Add", ["mm", "grid"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture
def conv_onnx(tmp_path) -> Path:
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), str(path))
    return path


@pytest.fixture
def dynamic_onnx(tmp_path) -> Path:
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_reshape_model(), str(path))
    return path


def qoperator_model() -> onnx.ModelProto:
    """What onnxruntime's QOperator format looks like: QuantizeLinear -> QLinearConv -> DequantizeLinear."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="quant_in"),
        helper.make_node("QLinearConv", ["x_q", "x_scale", "x_zp", "w_q", "w_scale", "w_zp", "y_scale", "y_zp"],
                         ["y_q"], name="conv_q", pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="dequant_out"),
    ]
    graph = helper.make_graph(nodes, "qop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def conv_integer_model() -> onnx.ModelProto:
    """What onnxruntime's dynamic quantization makes of a Conv: DynamicQuantizeLinear -> ConvInteger."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "w_q")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zp"], name="dyn_quant"),
        helper.make_node("ConvInteger", ["x_q", "w_q", "x_zp"], ["y_int"], name="conv_int", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["y_int"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "convint", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def lstm_model() -> onnx.ModelProto:
    """A one-layer LSTM over 5 steps (TVM 0.27 can't import LSTM)."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 32, 6)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 32, 8)).astype(np.float32), "R"),
    ]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm_0", hidden_size=8)]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def sensitive_model() -> onnx.ModelProto:
    """x[1,4,8,8] -> conv_a -> conv_b -> Relu -> GlobalAveragePool -> Flatten -> fc -> y[1,10].

    conv_a's channel 0 carries an offset of 500 that conv_b ignores: quantizing that tensor per tensor leaves
    a handful of levels for the seven channels the answer depends on, so int8 changes the argmax; fc is harmless.
    """
    rng = np.random.default_rng(0)
    wa = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    ba = np.zeros(8, np.float32)
    ba[0] = 500.0
    wb = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    wb[:, 0] = 0.0
    wfc = rng.standard_normal((10, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (ba, "ba"), (wb, "wb"), (wfc, "wfc"))]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["a", "wb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Relu", ["b"], ["r"]),  # unnamed on purpose: ingest names it
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wfc"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "sensitive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture
def sensitive_onnx(tmp_path) -> Path:
    """The sensitive model, with calibration and evaluation inputs next to it (calib.npz, eval.npz)."""
    path = tmp_path / "sensitive.onnx"
    onnx.save(sensitive_model(), path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 4, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((40, 4, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def lab_x86(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host key, user key and port (the lab's x86 "server")."""
    from tests.lab import start_sshd

    device = start_sshd(tmp_path_factory.mktemp("lab-x86"), "lab-x86")
    yield device
    device.stop()


@pytest.fixture(scope="session")
def lab_pi4(tmp_path_factory):
    """The emulated Raspberry Pi 4: its own sshd; its Python is arm64 Debian's under qemu-aarch64."""
    from tests.lab import aarch64_python, start_sshd

    python = aarch64_python()
    if python is None:
        pytest.fail("the emulated aarch64 board is not built: run `make setup` (scripts/make_aarch64_root.sh)")
    device = start_sshd(tmp_path_factory.mktemp("lab-pi4"), "lab-pi4")
    yield device, python
    device.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server from Debian's packages, on its own port and socket directory, for the session.

    initdb and pg_ctl refuse to run as root, so they run as the postgres user."""
    import getpass
    import glob
    import shutil
    import subprocess
    import tempfile

    from tests.lab import free_port

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed: run `make setup` (apt-get install postgresql)")
    bindir = Path(bins[-1])
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="edgedeploy-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if getpass.getuser() == "root" else []
    if as_postgres:
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "edgedeploy", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start",
                    "-o", f"-p {port} -k {sockets} -h 127.0.0.1"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "edgedeploy",
                    "edgedeploy"], check=True, capture_output=True)
    yield f"postgresql+psycopg://edgedeploy@127.0.0.1:{port}/edgedeploy"
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                   capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def tiny_vit(dim: int = 64, tokens: int = 16, blocks: int = 2, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """A small ViT-style transformer: patches by MatMul, attention blocks (LayerNorm, q/k/v MatMuls, Softmax,
    residuals, an MLP), a mean-pooled Gemm head. Its work is in MatMul: dynamic quantization's kind of model."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.ones(dim, np.float32), "ln_g"),
             numpy_helper.from_array(np.zeros(dim, np.float32), "ln_b"),
             numpy_helper.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale")]

    def weight(name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        scale = scale or 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    nodes: list[onnx.NodeProto] = []
    h = node("MatMul", ["x", weight("patch_w", (48, dim))], "patch")
    for b in range(blocks):
        p = f"b{b}_"
        ln = node("LayerNormalization", [h, "ln_g", "ln_b"], p + "ln", axis=-1)
        q, k, v = (node("MatMul", [ln, weight(p + t + "_w", (dim, dim))], p + t) for t in "qkv")
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], p + "kt", perm=[0, 2, 1])], p + "qk"),
                              "scale"], p + "scores")
        attended = node("MatMul", [node("Softmax", [scores], p + "softmax", axis=-1), v], p + "attend")
        r1 = node("Add", [h, node("MatMul", [attended, weight(p + "proj_w", (dim, dim))], p + "proj")], p + "res1")
        hidden = node("Relu", [node("MatMul", [r1, weight(p + "fc1_w", (dim, 2 * dim))], p + "fc1")], p + "relu")
        h = node("Add", [r1, node("MatMul", [hidden, weight(p + "fc2_w", (2 * dim, dim))], p + "fc2")], p + "res2")
    pooled = node("ReduceMean", [h], "pool", axes=[1], keepdims=0)
    node("Gemm", [pooled, weight("head_w", (dim, classes)), weight("head_b", (classes,), 0.01)], "logits")
    patches = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, 48])
    graph = helper.make_graph(nodes, "tiny_vit", [patches],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def two_output_model() -> onnx.ModelProto:
    """x[1,3,8,8] -> conv -> (scores[1,4] by pooling + Flatten, features[1,4,8,8]): two outputs, a classifier's and a
    feature map."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["features"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["scores"], name="flatten")]
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(nodes, "two_outputs", [image],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
