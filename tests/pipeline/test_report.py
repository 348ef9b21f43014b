"""The run report: its paragraph on tuning says what the run did and why it stopped; it counts the Winograd convs."""

from __future__ import annotations

from pipeline.report import tuning_text

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


def test_the_report_counts_the_convs_computed_by_winograd():
    from rich.console import Console

    from tests.factories import make_result

    def rendered(result) -> str:
        console = Console(record=True, width=200)
        console.print(result)
        return console.export_text()

    result = make_result(1)
    assert "Winograd" not in rendered(result)
    with_winograd = result.model_copy(update={"artifact": result.artifact.model_copy(update={"winograd_convs": 23})})
    assert "Winograd: 23 float 3x3 convs computed by F(4x4, 3x3)" in rendered(with_winograd)
