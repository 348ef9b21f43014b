"""MetaSchedule tuning with a persistent database: trials accumulate run after run, and the tuned library
computes what onnxruntime computes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgedeploy.errors import CompileError
from pipeline.compile import compile_model
from pipeline.ingest import ingest, sample_inputs
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from targets.profiles import load_profile

pytestmark = pytest.mark.slow


def test_tuning_database_grows_and_results_match(tmp_path):
    model = WORKLOADS["digits-cnn"].model_path()
    info = ingest(model, tmp_path / "ingest")
    q = quantize(tmp_path / "ingest" / "model.static.onnx", tmp_path, QuantConfig(), None)
    profile = load_profile("local")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = compile_model(q, info, profile, tmp_path / "a", tune_trials=2, tuning_root=tmp_path / "tuning")
    second = compile_model(q, info, profile, tmp_path / "b", tune_trials=2, tuning_root=tmp_path / "tuning")
    assert first.tuning["database"] == second.tuning["database"]  # one database per target
    assert first.tuning["tasks"] >= 5 and first.tuning["records"] > 0
    assert second.tuning["records"] > first.tuning["records"]  # the next night adds trials

    import tvm
    from tvm import relax

    x = sample_inputs(info.inputs, seed=1)["image"]
    vm = relax.VirtualMachine(tvm.runtime.load_module(second.library_path), tvm.cpu())
    tuned = vm["main"](tvm.runtime.tensor(x)).numpy()
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(tuned, expected, rtol=1e-4, atol=1e-4)


def test_tuning_for_a_remote_board_is_refused_clearly(tmp_path):
    info = ingest(WORKLOADS["digits-cnn"].model_path(), tmp_path)
    q = quantize(tmp_path / "model.static.onnx", tmp_path, QuantConfig(), None)
    with pytest.raises(CompileError, match="Tuning for profile 'raspberry-pi-4'") as exc:
        compile_model(q, info, load_profile("raspberry-pi-4"), tmp_path, tune_trials=4)
    assert "RPC" in exc.value.expected


def test_tuning_keeps_stdout_for_json(tmp_path):
    """Regression: MetaSchedule's log lines went to stdout and broke `deploy compile/run --json`."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edgedeploy", "compile", "digits-cnn", "--out", str(tmp_path / "out"),
                           "--tune-trials", "1", "--json"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "EDGEDEPLOY_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert summary["tuning"]["trials_per_task"] == 1 and "LocalRunner" in proc.stderr
