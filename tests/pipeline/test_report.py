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
