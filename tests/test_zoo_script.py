"""scripts/zoo/run.py, which writes docs/model-coverage.md: each zoo model through `deploy run`, one row per run,
from what the command answered (here on a stand-in for squeezenet1_1: a small model with its 224x224 input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.flows.conftest import prefect_server  # noqa: F401 - the shared server fixture

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _stand_in(path: Path) -> None:
    """input[N,3,224,224] -> Conv 3x3 stride 4 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> output[N,10]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], strides=[4, 4], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["output"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "stand_in", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))


def test_the_zoo_runner_writes_one_row_per_run_from_the_commands_answers(prefect_server, tmp_path,  # noqa: F811
                                                                           isolated_home):
    _stand_in(tmp_path / "squeezenet1_1.onnx")
    doc = tmp_path / "coverage.md"
    doc.write_text("# Model coverage\n\nhand-written text stays\n\n<!-- zoo table: begin (scripts/zoo/run.py writes "
                   "it) -->\nold\n<!-- zoo table: end -->\ntail stays\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "EDGEDEPLOY_HOME": str(isolated_home)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "zoo" / "run.py"), str(tmp_path), "--doc", str(doc),
                           "--only", "squeezenet1_1"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "coverage.json").read_text())
    assert [(r["runtime"], r["scheme"]) for r in rows] == [("tvm", "fp32"), ("tvm", "int8"), ("onnxruntime", "int8")]
    assert all(r["result"] == "pass" and r["exit"] == 0 for r in rows) and rows[0]["cosine"] >= 0.999
    text = doc.read_text()
    assert "hand-written text stays" in text and "tail stays" in text and "\nold\n" not in text
    assert text.count("| squeezenet1_1 |") == 3 and "3 runs, 3 passed" in text
