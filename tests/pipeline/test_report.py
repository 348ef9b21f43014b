"""The run report: its paragraph on tuning says what the run did and why it stopped; it counts the Winograd convs;
an artifact slower than the baseline comes with what to do about it."""

from __future__ import annotations

from pipeline.report import tuning_text
from tests.factories import make_result

TUNING = {"trials_per_task": 1000, "tasks": 29, "seconds": 3431.0, "database": "/db", "records": 4100,
          "scheduled": 29, "trials_added": 4100, "curve": []}


def test_a_run_ended_by_its_time_budget_says_so():
    text = tuning_text({**TUNING, "minutes": 57.0, "stopped_by_time": True})
    assert "4100 trials added in 3431 s, ended by the 57-minute budget" in text
    assert "29 kernels built with a tuned schedule" in text


def test_a_run_within_its_budget_shows_the_budget():
    assert "(budget 57 min)" in tuning_text({**TUNING, "minutes": 57.0, "stopped_by_time": False})
    assert "budget" not in tuning_text(TUNING)


def test_the_report_says_how_many_threads_timed_the_candidates():
    assert "in 3431 s, timed on 2 threads (29 kernels" in tuning_text({**TUNING, "threads": 2})
    assert "threads" not in tuning_text(TUNING)  # records from before it was reported


def test_a_budget_that_tuned_only_the_heaviest_kernels_says_so():
    text = tuning_text({**TUNING, "tasks": 9, "model_tasks": 38, "minutes": 8.4})
    assert "over 9 tasks (the heaviest of 38; the others kept default schedules)" in text
    assert "heaviest" not in tuning_text({**TUNING, "model_tasks": 29})
    timed = tuning_text({**TUNING, "tasks": 9, "model_tasks": 38, "minutes": 8.4, "ranked_by": "time"})
    assert "over 9 tasks (the slowest of 38, each timed first; the others kept default schedules)" in timed


def rendered(result) -> str:
    from rich.console import Console

    console = Console(record=True, width=300)
    console.print(result)
    return console.export_text()


def test_the_report_counts_the_convs_computed_by_winograd():
    result = make_result(1)
    assert "Winograd" not in rendered(result)
    with_winograd = result.model_copy(update={"artifact": result.artifact.model_copy(update={"winograd_convs": 23})})
    assert "Winograd: 23 float 3x3 convs computed by F(4x4, 3x3)" in rendered(with_winograd)


def test_an_artifact_slower_than_the_baseline_says_what_to_do():
    """`make demo`'s untuned TVM int8 ran at 0.03x onnxruntime fp32 and the report only printed the ratio."""
    faster = make_result(1)  # the factory's artifact runs at ~2x the baseline
    assert faster.slower_advice() is None and "slower than" not in rendered(faster)
    slow = faster.model_copy(update={"speedup": 0.03})
    assert "slower than onnxruntime fp32 here (0.03x): this TVM build is untuned" in rendered(slow)
    assert "--tune-minutes 20" in slow.slower_advice() and "--quant auto" in slow.slower_advice()
    tuned = slow.model_copy(update={"artifact": slow.artifact.model_copy(update={"tuning": TUNING})})
    assert "tune longer" in tuned.slower_advice()
    ort_int8 = slow.model_copy(update={"runtime": "onnxruntime 1.31.1"})
    assert "int8 QDQ U8S8 minmax per-channel loses to fp32" in ort_int8.slower_advice()
    assert slow.model_copy(update={"speedup": 0.97}).slower_advice() is None  # within measurement noise
    assert slow.model_copy(update={"valid": False}).slower_advice() is None  # an invalid measurement proves nothing


def test_a_tuned_library_slower_than_the_build_before_it_is_not_shipped_and_the_report_says_so():
    """The digits CNN's int8 library tuned 9.4 minutes ran 0.94x of onnxruntime fp32, its untuned build 1.60x, and a
    plain `deploy run --tune-minutes` shipped the tuned one without a word (pipeline.tuning_check)."""
    from pipeline.tuning_check import TuningCheck

    slower = TuningCheck(tuned_ms=[0.031, 0.030], before_ms=[0.019, 0.018], tuning=TUNING)
    assert slower.shipped == "before"
    faster = TuningCheck(tuned_ms=[0.015, 0.016], before_ms=[0.018, 0.017], tuning=TUNING)
    assert faster.shipped == "tuned"
    # a tie keeps the tuned one
    assert TuningCheck(tuned_ms=[0.02, 0.03], before_ms=[0.03, 0.02], tuning=TUNING).shipped == "tuned"
    untuned = make_result(1)
    shipped_before = untuned.model_copy(update={"tuning_check": slower})
    text = rendered(shipped_before)
    assert "tuned library 0.030 ms against 0.018 ms for the build before this tuning (best of 2 turns each" in text
    assert "the tuned library was slower and the build before it shipped" in text
    assert "4100 trials added" in text  # the tuning is still reported: its records stay in the database
    assert shipped_before.tuning == TUNING and untuned.tuning is None
    assert "the tuned one shipped" in rendered(untuned.model_copy(update={"tuning_check": faster}))
