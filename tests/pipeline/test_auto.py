"""--quant auto's choice on constructed measurements: never slower, never outside the budget, never by noise."""

from __future__ import annotations

import numpy as np

from pipeline.auto import Candidate, calibration_retries, choose, default_candidates, finalists, outcome
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


def test_every_candidate_starts_untuned():
    labels = [c.label() for c in default_candidates()]
    assert len(labels) == len(set(labels)) == 13 and not any("tuned" in label for label in labels)
    assert {"tvm fp32", "tvm int8 QDQ U8S8 minmax per-channel", "tvm fp16"} <= set(labels)


def _untuned(runtime: str, quant: QuantConfig, p50: float | None, *, within: bool = True, status: str = "measured",
             unit: str = "cpu"):
    from pipeline.auto import CandidateOutcome

    candidate = Candidate(runtime=runtime, quant=quant)
    return candidate, CandidateOutcome(label=candidate.label(), runtime=runtime, scheme=quant.label(), status=status,
                                       unit=unit, p50_ms=p50, within_budget=within, valid=status == "measured")


def test_the_tuning_budget_goes_to_the_tvm_builds_that_did_best_untuned():
    """--tune-minutes is the whole selection's: split in proportion to the untuned speed among the TVM CPU
    candidates measured within the accuracy budget and within 2x of the fastest; none under a minute."""
    from pipeline.auto import tuning_plan
    from pipeline.config import TRIALS_WITHIN_MINUTES

    int8, fp32 = QuantConfig(scheme="int8"), QuantConfig(scheme="fp32")
    measured = [
        _untuned("tvm", int8, 5.0), _untuned("tvm", fp32, 10.0),
        _untuned("tvm", int8.model_copy(update={"keep_float": ("conv_a",)}), 11.0),  # > 2x the fastest
        _untuned("tvm", int8.model_copy(update={"calibration": "entropy"}), 4.0, within=False),  # accuracy lost
        _untuned("tvm", QuantConfig(scheme="fp16"), None, status="refused"),
        _untuned("onnxruntime", int8, 3.0),
    ]
    plan = {c.label(): c for c in tuning_plan(measured, TRIALS_WITHIN_MINUTES, 15)}
    assert set(plan) == {"tvm int8 QDQ U8S8 minmax per-channel tuned 10 min", "tvm fp32 tuned 5 min"}
    assert sum(c.tune_minutes for c in plan.values()) == 15
    assert all(c.tune_trials == TRIALS_WITHIN_MINUTES for c in plan.values())
    (only,) = tuning_plan(measured, TRIALS_WITHIN_MINUTES, 1.2)  # fp32's share would be 0.4 min: all to int8
    assert only.quant == int8 and only.tune_minutes == 1.2
    by_trials = tuning_plan(measured, 32, None)
    assert [c.label() for c in by_trials] == ["tvm int8 QDQ U8S8 minmax per-channel tuned 32/task",
                                              "tvm fp32 tuned 32/task"]
    assert tuning_plan(measured, 0, None) == []
    assert tuning_plan([_untuned("tvm", fp32, 5.0, unit="gpu")], 32, 10) == []


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
    with_gpu = default_candidates(("onnxruntime-tensorrt", "onnxruntime-cuda"))
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


def test_the_finalists_are_the_candidates_close_to_the_fastest_and_to_the_baseline():
    base = _measurement(10.0)
    alone = {label: outcome(Candidate(runtime="tvm", quant=QuantConfig(scheme="fp32")), _measurement(ms, seed=i),
                            base, AGREE, metric="top1", budget=0.01).model_copy(update={"label": label})
             for i, (label, ms) in enumerate([("a", 8.0), ("b", 9.5), ("c", 10.3), ("d", 10.5), ("e", 12.0)])}
    inaccurate = outcome(TVM, _measurement(5.0, 0.90, seed=9), base, AGREE, metric="top1", budget=0.01)
    # within 1.3x of the fastest within budget (8.0 ms: up to 10.4), the fastest three; never one outside the budget
    assert finalists([*alone.values(), inaccurate], 10.0) == ["a", "b", "c"]
    # a baseline faster than every candidate sets the bar: 1.3 x 6 ms = 7.8, none close enough to measure again
    assert finalists(list(alone.values()), 6.0) == []


def test_where_finalists_ran_in_turns_only_their_turns_choose():
    """Alone, a candidate met another minute's baseline: b read 1.67x alone but 1.01x in its turns; a, 0.95x alone
    (a slow minute), 1.25x in its turns, ships. Each is judged against the baseline of its own turns."""
    base = _measurement(10.0)
    a = outcome(INT8, _measurement(8.0, seed=1), _measurement(10.0, seed=2), AGREE, metric="top1", budget=0.01)
    b = outcome(TVM, _measurement(9.9, seed=3), _measurement(10.0, seed=4), AGREE, metric="top1", budget=0.01)
    alone_b = outcome(TVM, _measurement(6.0, seed=5), base, AGREE, metric="top1", budget=0.01)
    a, b = (o.model_copy(update={"in_turns": True, "alone_p50_ms": ms}) for o, ms in ((a, 10.5), (b, 6.0)))
    selection = choose([a, b, alone_b.model_copy(update={"label": "c"})], budget=0.01, metric="top1", baseline=base)
    assert selection.chosen == INT8.label() and "in turns" in selection.reason
    # b's turns show no gain and no other finalist: the baseline ships, whatever b read alone
    assert choose([b, alone_b.model_copy(update={"label": "c"})], budget=0.01, metric="top1",
                  baseline=base).chosen is None
