"""docs/bench.md: the side-by-side table and, for tuned TVM candidates, latency against trials."""

from __future__ import annotations

from pipeline.auto import AutoSelection, CandidateOutcome
from pipeline.bench_page import markdown, write
from tests.factories import make_result


def _outcome(label: str, p50: float, tuning: dict | None = None) -> CandidateOutcome:
    return CandidateOutcome(label=label, runtime="tvm" if label.startswith("tvm") else "onnxruntime",
                            scheme="fp32", status="measured", p50_ms=p50, p90_ms=p50, speedup=2.0 / p50,
                            within_budget=True, valid=True, tuning=tuning)


def test_tuned_candidates_get_a_latency_against_trials_section(tmp_path):
    curve = [{"trials": 29, "estimated_ms": 40.0}, {"trials": 290, "estimated_ms": 9.5},
             {"trials": 580, "estimated_ms": 3.1}]
    tuning = {"trials_per_task": 10, "tasks": 29, "seconds": 600.0, "curve": curve}
    selection = AutoSelection(
        outcomes=[_outcome("onnxruntime fp32", 2.0), _outcome("tvm fp32", 60.0),
                  _outcome("tvm fp32 tuned 10/task", 3.4, tuning)],
        chosen=None, reason="nothing beat onnxruntime fp32", budget=0.01, metric="top1", baseline_p50_ms=2.0,
        baseline_accuracy=0.99)
    result = make_result(1, model="digits-cnn").model_copy(update={"auto": selection})
    text = markdown([result])
    assert "### TVM tuning: latency against trials" in text
    assert "| tvm fp32 tuned 10/task | 10 x 29 tasks | 10.0 min | 580 | 40.000 -> 3.100 | 3.400 |" in text
    write([result], tmp_path)
    svg = (tmp_path / "bench-digits-cnn-tuning.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and "onnxruntime fp32 2.000 ms" in svg


def test_no_tuning_no_curve(tmp_path):
    selection = AutoSelection(outcomes=[_outcome("tvm fp32", 60.0)], chosen=None, reason="-", budget=0.01,
                              metric=None, baseline_p50_ms=2.0, baseline_accuracy=None)
    result = make_result(1, model="digits-cnn").model_copy(update={"auto": selection})
    assert "TVM tuning" not in markdown([result])
    write([result], tmp_path)
    assert not (tmp_path / "bench-digits-cnn-tuning.svg").exists()


def test_a_time_budgeted_candidate_shows_the_trials_it_made_not_the_cap():
    """With --tune-minutes the per-task trial cap is a ceiling of 1000: '1000 x 29 tasks' would claim 29,000 trials."""
    curve = [{"trials": 29, "estimated_ms": 40.0}, {"trials": 412, "estimated_ms": 3.9}]
    tuning = {"trials_per_task": 1000, "tasks": 29, "seconds": 1200.0, "curve": curve, "minutes": 20.0,
              "trials_added": 383}
    selection = AutoSelection(
        outcomes=[_outcome("onnxruntime fp32", 2.0), _outcome("tvm fp32 tuned 20 min", 3.4, tuning)],
        chosen=None, reason="nothing beat onnxruntime fp32", budget=0.01, metric="top1", baseline_p50_ms=2.0,
        baseline_accuracy=0.99)
    text = markdown([make_result(1, model="digits-cnn").model_copy(update={"auto": selection})])
    assert "| tvm fp32 tuned 20 min | 383 over 29 tasks | 20.0 min | 412 | 40.000 -> 3.900 | 3.400 |" in text


def test_a_tuned_candidate_without_an_estimate_still_gets_its_row(tmp_path):
    """A budget too short to time a trial of every task leaves no estimate (it sums every kernel's best time): the
    candidate was tuned all the same, and its row says why the estimate is missing instead of vanishing."""
    tuning = {"trials_per_task": 1000, "tasks": 29, "seconds": 6.0, "curve": [], "minutes": 0.1,
              "trials_added": 12, "scheduled": 12}
    selection = AutoSelection(
        outcomes=[_outcome("onnxruntime fp32", 2.0), _outcome("tvm fp32 tuned 0.1 min", 50.0, tuning)],
        chosen=None, reason="nothing beat onnxruntime fp32", budget=0.01, metric="top1", baseline_p50_ms=2.0,
        baseline_accuracy=0.99)
    result = make_result(1, model="digits-cnn").model_copy(update={"auto": selection})
    text = markdown([result])
    assert ("| tvm fp32 tuned 0.1 min | 12 over 29 tasks | 0.1 min | - | none: 12 of 29 tasks timed so far | 50.000 |"
            in text)
    assert "bench-digits-cnn-tuning.svg" not in text  # no curve to draw, so no picture that isn't there
    write([result], tmp_path)
    assert not (tmp_path / "bench-digits-cnn-tuning.svg").exists()
