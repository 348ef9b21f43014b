"""Results in a real database: SQLite (the default) and PostgreSQL (a lab's shared database)."""

from __future__ import annotations

import pytest

from pipeline.regression import RegressionPolicy
from pipeline.results.store import ResultStore
from tests.factories import make_result

POLICY = RegressionPolicy()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    url = request.getfixturevalue("postgres_url")
    s = ResultStore(url)
    from pipeline.results.store import Base

    Base.metadata.drop_all(s.engine)  # each test starts from an empty schema
    Base.metadata.create_all(s.engine)
    return s


def test_results_and_raw_samples_are_kept(store):
    result = make_result(0)
    verdict = store.record(result, manifest={"artifact": {"sha256": "aa"}}, policy=POLICY)
    assert verdict.compared_runs == 0 and not verdict.regressed
    (row,) = store.runs()
    assert row.run_id == result.run_id and row.valid and row.p50_ms == pytest.approx(result.latency_ms.p50)
    assert row.manifest == {"artifact": {"sha256": "aa"}} and row.environment["tools"]["apache-tvm"]
    assert row.result["speedup"] == pytest.approx(result.speedup)
    assert store.samples(result.run_id)["artifact"] == pytest.approx(result.benchmark["artifact"]["samples_ms"])


def test_nights_then_a_slow_one_is_a_regression(store):
    for night in range(4):
        assert not store.record(make_result(night), manifest={}, policy=POLICY).regressed
    slow = store.record(make_result(4, centre_ms=12.0), manifest={}, policy=POLICY)
    assert slow.latency_regression and slow.compared_runs == 4
    newest = store.runs()[0]
    assert newest.regression and newest.regression_detail["latency_regression"]


def test_history_is_per_model_profile_and_scheme(store):
    store.record(make_result(0, profile="lab-pi4", centre_ms=100.0), manifest={}, policy=POLICY)
    store.record(make_result(1, model="pp-lcnet-orientation", centre_ms=100.0), manifest={}, policy=POLICY)
    verdict = store.record(make_result(2, centre_ms=10.0), manifest={}, policy=POLICY)
    assert verdict.compared_runs == 0


def test_invalid_runs_are_stored_but_never_form_history_or_flag(store):
    store.record(make_result(0), manifest={}, policy=POLICY)
    bad = store.record(make_result(1, centre_ms=50.0, valid=False), manifest={}, policy=POLICY)
    assert not bad.regressed
    assert store.record(make_result(2), manifest={}, policy=POLICY).compared_runs == 1
    assert len(store.runs()) == 3


def test_two_first_opens_at_once_both_keep_their_result(store):
    """A lab's two devices finishing together opened a new database at once: both found no tables, both created
    them, and the slower one failed ("table latency_samples already exists") and lost its device's row (SQLite: 29
    of 30 tries before the fix)."""
    import threading

    from pipeline.results.store import Base

    for attempt in range(5):
        Base.metadata.drop_all(store.engine)
        start, errors = threading.Barrier(2), []

        def open_and_record(night: int, start=start, errors=errors) -> None:
            start.wait()
            try:
                ResultStore(store.url).record(make_result(night, profile=f"device-{night}"), manifest={}, policy=POLICY)
            except Exception as exc:  # collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=open_and_record, args=(10 * attempt + i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert {row.profile for row in store.runs()} == {f"device-{10 * attempt + i}" for i in range(2)}
