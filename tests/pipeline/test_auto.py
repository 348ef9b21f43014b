"""--quant auto's choice on constructed measurements: never slower, never outside the budget, never by noise."""

from __future__ import annotations

import numpy as np

from pipeline.auto import Candidate, calibration_retries, choose, default_candidates, outcome
from pipeline.benchmark import Measurement
from pipeline.metrics import Agreement, LatencyStats
from pipeline.quantize import QuantConfig

AGREE = Agreement(top1=1.0, cosine=1.0, max_abs=0.0, samples=100)


def _measurement(centre: float, accuracy: float | None = 0.99, seed: int = 0, valid: bool = True) -> Measurement:
    samples = list(np.random.default_rng(seed).normal(centre, centre * 0.05, 300))
    return Measurement(runtime="onnxruntime", artifact_sha256="x", versions={}, latency_ms=LatencyStats.from_samples(
        samples), samples_ms=samples, warmup=1, peak_rss_mb=1, load_seconds=0, timed_seconds=1, samples=100,
        accuracy=accuracy, valid=valid, invalid_reason=None, device_python="3.11", device_machine="x86_64")


INT8 = Candidate(runtime="onnxruntime", quant=QuantConfig(scheme="int8"))
TVM = Candidate(runtime="tvm", quant=QuantConfig(scheme="fp32"))


def test_fastest_within_budget_wins():
    base = _measurement(10.0)
    fast = outcome(INT8, _measurement(6.0, 0.985, seed=1), base, AGREE, metric="top1", budget=0.01)
    faster_but_inaccurate = outcome(TVM, _measurement(4.0, 0.90, seed=2), base, AGREE, metric="top1", budget=0.01)
    selection = choose([fast, faster_but_inaccurate], budget=0.01, metric="top1", baseline=base)
    assert selection.chosen == INT8.label() and not faster_but_inaccurate.within_budget


def test_nothing_faster_ships_onnxruntime_fp32():
    base = _measurement(10.0)
    slow = outcome(TVM, _measurement(80.0, seed=3), base, AGREE, metric="top1", budget=0.01)
    selection = choose([slow], budget=0.01, metric="top1", baseline=base)
    assert selection.chosen is None and "onnxruntime fp32 ships" in selection.reason


def test_noise_never_promotes_a_candidate():
    """The same distribution as the baseline: its p50 may land lower by chance, the U test won't agree."""
    base = _measurement(10.0, seed=4)
    for seed in range(5, 25):
        same = outcome(INT8, _measurement(10.0, seed=seed), base, AGREE, metric="top1", budget=0.01)
        assert choose([same], budget=0.01, metric="top1", baseline=base).chosen is None


def test_without_labels_agreement_is_the_budget():
    base = _measurement(10.0, accuracy=None)
    disagreeing = Agreement(top1=0.95, cosine=0.9, max_abs=1.0, samples=100)
    cand = outcome(INT8, _measurement(5.0, accuracy=None, seed=7), base, disagreeing, metric=None, budget=0.01)
    assert not cand.within_budget and choose([cand], budget=0.01, metric=None, baseline=base).chosen is None


def test_tuning_makes_the_tvm_candidates_tuned_and_keeps_the_default_as_reference():
    from pipeline.auto import default_candidates

    plain = [c.label() for c in default_candidates()]
    tuned = [c.label() for c in default_candidates(32)]
    assert len(plain) == 13 and not any("tuned" in label for label in plain)
    assert "tvm fp32" in tuned and "tvm fp32 tuned 32/task" in tuned
    assert "tvm int8 QDQ U8S8 minmax per-channel tuned 32/task" in tuned
    assert all("tuned" not in label for label in tuned if label.startswith("onnxruntime"))
    assert len(set(tuned)) == len(tuned) == 14


def test_a_time_budget_reaches_every_tuned_candidate():
    """`--quant auto --tune-minutes 20` tunes each TVM candidate for 20 minutes. Before, the budget was dropped and
    the candidates tuned up to TRIALS_WITHIN_MINUTES trials per task: days, not minutes."""
    from pipeline.auto import default_candidates
    from pipeline.config import TRIALS_WITHIN_MINUTES, RunConfig

    config = RunConfig(model_path="m.onnx", auto=True, tune_minutes=20)
    candidates = default_candidates(config.tune_trials, config.tune_minutes)
    tuned = [c for c in candidates if c.tune_trials]
    assert {c.tune_trials for c in tuned} == {TRIALS_WITHIN_MINUTES} and {c.tune_minutes for c in tuned} == {20}
    assert "tvm int8 QDQ U8S8 minmax per-channel tuned 20 min" in [c.label() for c in tuned]
    assert all(c.tune_minutes is None for c in candidates if not c.tune_trials)


def test_the_report_says_why_a_candidate_may_saturate():
    from rich.console import Console

    base = _measurement(10.0)
    caveat = "may saturate: onnxruntime's u8 x s8 kernels on a CPU without VNNI ... (VPMADDUBSW)"
    marked = outcome(INT8, _measurement(6.0, 0.985, seed=1), base, AGREE, metric="top1", budget=0.01)
    marked = marked.model_copy(update={"caveat": caveat})
    selection = choose([marked, outcome(TVM, _measurement(8.0, seed=2), base, AGREE, metric="top1", budget=0.01)],
                       budget=0.01, metric="top1", baseline=base)
    console = Console(width=200, record=True)
    console.print(selection)
    assert f"note: {INT8.label()}: {caveat}" in console.export_text()
    assert selection.model_dump(mode="json")["outcomes"][0]["caveat"] == caveat


def test_a_board_with_gpu_providers_gets_gpu_candidates():
    from pipeline.auto import default_candidates

    cpu_only = default_candidates()
    with_gpu = default_candidates(0, None, ("onnxruntime-tensorrt", "onnxruntime-cuda"))
    added = with_gpu[len(cpu_only):]
    assert all(c.runtime not in ("onnxruntime-tensorrt", "onnxruntime-cuda") for c in cpu_only)
    assert {(c.runtime, c.quant.scheme) for c in added} == {
        (r, s) for r in ("onnxruntime-tensorrt", "onnxruntime-cuda") for s in ("fp32", "fp16", "int8")}
    trt_int8 = next(c for c in added if c.runtime == "onnxruntime-tensorrt" and c.quant.scheme == "int8")
    assert trt_int8.quant.symmetric_activations and trt_int8.quant.activation_type == "int8"


def test_a_transformer_gets_dynamic_int8_as_a_candidate():
    from pipeline.auto import default_candidates

    assert not any(c.quant.scheme == "dynamic" for c in default_candidates())
    (dynamic,) = [c for c in default_candidates(dynamic=True) if c.quant.scheme == "dynamic"]
    assert dynamic.runtime == "onnxruntime"


def test_dynamic_is_for_transformers_and_recurrent_models_not_a_cnns_classifier_head():
    from pipeline.auto import dynamic_worthy

    assert dynamic_worthy({"MatMul": 12, "Softmax": 2, "LayerNormalization": 2, "Gemm": 1})  # a ViT
    assert dynamic_worthy({"LSTM": 1, "Conv": 2})  # recurrent, whatever else
    assert not dynamic_worthy({"Conv": 3, "Relu": 3, "Gemm": 1})  # a CNN with its classifier head


def test_tvm_int8_outside_the_budget_is_retried_with_the_calibration_that_kept_onnxruntime_closest():
    candidates = default_candidates()
    assert any(c.quant.calibration == "mse" for c in candidates if c.runtime == "onnxruntime")
    base = _measurement(10.0)
    accuracy = {"minmax": 0.95, "percentile": 0.985, "entropy": 0.97, "mse": 0.975}
    measured = {}
    for c in candidates:
        if c.quant.scheme != "int8":
            continue
        value = accuracy[c.quant.calibration] if c.runtime == "onnxruntime" else 0.95  # TVM int8 minmax misses
        measured[c.label()] = outcome(c, _measurement(5.0, value, seed=len(measured)), base, AGREE, metric="top1",
                                      budget=0.01)
    retries = calibration_retries(candidates, measured)
    assert [(r.runtime, r.quant.calibration) for r in retries] == [("tvm", "percentile")]
    tvm_int8 = next(c for c in candidates if c.runtime == "tvm" and c.quant.scheme == "int8")
    measured[tvm_int8.label()] = outcome(tvm_int8, _measurement(5.0, 0.99, seed=99), base, AGREE, metric="top1",
                                         budget=0.01)
    assert calibration_retries(candidates, measured) == []  # within budget: the calibration can't make it faster
