"""--quant auto end to end: every candidate measured on the device, the choice never slower than onnxruntime fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.workloads import WORKLOADS
from tests.conftest import int8_on_this_host


def _tvm_int8(suffix: str = "") -> str:
    """TVM's int8 candidate's label as the checks build it here: with 7-bit weights (reduce-range) where its kernels
    use vpmaddubsw (no VNNI)."""
    return f"tvm {int8_on_this_host(runtime='tvm').label()}{suffix}"


pytestmark = pytest.mark.slow


def test_auto_on_digits(prefect_server, tmp_path):
    board = tmp_path / "no-fp16.yaml"  # fp16 refused by the checks: those candidates must say why
    board.write_text("extends: local\nname: no-fp16\ncpu:\n  precisions: [fp32, int8]\n")
    result = deploy_run(RunConfig(model_path=str(WORKLOADS["digits-cnn"].model_path()), profile=str(board),
                                  auto=True, eval_samples=100, calib_samples=100,
                                  bench=BenchmarkSettings(warmup=2, min_iterations=200, min_seconds=0.3)))
    selection = result.auto
    assert set(result.board) == {"before", "after", "marks"}  # the board's state around all the measurements
    statuses = {o.label: o for o in selection.outcomes}
    assert len(statuses) == 13  # the calibration retry only where TVM's int8 misses the budget: not here
    assert statuses["onnxruntime int8 QDQ U8S8 mse per-channel"].status == "measured"
    assert statuses["onnxruntime fp16"].status == "refused" and "fp16" in statuses["onnxruntime fp16"].reason
    assert statuses["tvm fp16"].status == "refused"
    assert statuses[_tvm_int8()].status == "measured"
    assert statuses["onnxruntime int8 QOperator U8S8 minmax per-channel"].status == "measured"
    # Never slower than what the user already has: either a candidate measurably faster within budget, or
    # onnxruntime fp32 itself.
    assert result.latency_ms.p50 <= result.baseline.latency_ms.p50
    # The finalists (the fastest alone, within 1.3x of the fastest and of the baseline) measured again in turns with
    # the baseline: only those turns choose, and the shipped one's turns are the run's benchmark.
    finalists = [o for o in selection.outcomes if o.in_turns]
    assert 1 <= len(finalists) <= 3 and all(o.alone_p50_ms and o.within_budget for o in finalists)
    if selection.chosen:
        chosen = statuses[selection.chosen]
        assert chosen.in_turns and chosen.within_budget and chosen.faster_p_value < 0.01
        assert result.latency_ms.p50 == chosen.p50_ms and result.speedup == pytest.approx(chosen.speedup, rel=0.01)
        assert result.accuracy.value >= result.accuracy.baseline - 0.01
    else:
        assert result.speedup == 1.0 and result.runtime.startswith("onnxruntime")
    plot = Path(result.result_path).with_name("auto.svg").read_text()
    assert plot.startswith("<svg") and "onnxruntime fp32" in plot
    # Full int8 keeps the digits' accuracy: no partial candidates needed.
    assert selection.partial is not None and selection.partial.keep_float == ()


def test_auto_adds_partial_candidates_when_full_int8_misses_the_budget(prefect_server, sensitive_onnx):
    folder = sensitive_onnx.parent
    result = deploy_run(RunConfig(model_path=str(sensitive_onnx), profile="local", auto=True, accuracy_budget=0.02,
                                  calib_data=str(folder / "calib.npz"), eval_data=str(folder / "eval.npz"),
                                  bench=BenchmarkSettings(warmup=1, min_iterations=20, min_seconds=0.1)))
    selection = result.auto
    assert set(selection.partial.keep_float) == {"conv_a", "conv_b"}
    statuses = {o.label: o for o in selection.outcomes}
    full = statuses["onnxruntime int8 QDQ U8S8 minmax per-channel"]
    partial = statuses["onnxruntime int8 QDQ U8S8 minmax per-channel (2 layers float)"]
    assert full.status == partial.status == "measured"
    assert not full.within_budget and partial.within_budget  # measured on the device, as planned on the host
    assert _tvm_int8(" (2 layers float)") in statuses
    assert selection.chosen != full.label


def test_the_time_budget_is_the_whole_selections(prefect_server, sensitive_onnx):
    """--quant auto --tune-minutes: one budget for the whole selection, not one per candidate. Every TVM candidate
    (the partial one included) is measured untuned first; those that did best share the budget, and each stops at
    its share."""
    folder = sensitive_onnx.parent
    result = deploy_run(RunConfig(model_path=str(sensitive_onnx), profile="local", auto=True, accuracy_budget=0.02,
                                  tune_minutes=0.05, calib_data=str(folder / "calib.npz"),
                                  eval_data=str(folder / "eval.npz"),
                                  bench=BenchmarkSettings(warmup=1, min_iterations=20, min_seconds=0.1)))
    outcomes = result.auto.outcomes
    untuned = {o.label for o in outcomes if o.runtime == "tvm" and o.status == "measured" and not o.tuning}
    assert {"tvm fp32", _tvm_int8(), _tvm_int8(" (2 layers float)")} <= untuned
    tuned = [o for o in outcomes if o.status == "measured" and o.tuning]
    assert tuned and sum(o.tuning["minutes"] for o in tuned) == pytest.approx(0.05)
    assert all(o.tuning["stopped_by_time"] and o.label.rsplit(" tuned ", 1)[0] in untuned for o in tuned)


def test_auto_builds_tvm_candidates_as_the_checks_would(tmp_path, sensitive_onnx):
    """On an AVX2 server TVM int8 takes 7-bit weights (without them no kernel takes VPMADDUBSW, and auto measured
    plain integer loops: PP-LCNet 7.3 ms against 3.0 ms); onnxruntime's candidates stay as listed."""
    import onnx

    from flows.auto import as_checked
    from pipeline.auto import Candidate
    from pipeline.ingest import ingest
    from pipeline.quantize import QuantConfig
    from targets.profiles import load_profile

    info = ingest(sensitive_onnx, tmp_path / "ingest")
    model = onnx.load(info.prepared_path)
    server = load_profile("x86-server")
    int8 = QuantConfig(scheme="int8")
    assert as_checked(Candidate(runtime="tvm", quant=int8), model, info, server).quant.reduce_range
    assert not as_checked(Candidate(runtime="onnxruntime", quant=int8), model, info, server).quant.reduce_range
    assert not as_checked(Candidate(runtime="tvm", quant=int8), model, info,
                          load_profile("x86-server-vnni")).quant.reduce_range
