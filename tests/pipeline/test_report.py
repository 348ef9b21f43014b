"""The run report's paragraph on tuning says what the run did and why it stopped."""

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
