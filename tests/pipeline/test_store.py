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

    Base.metadata.drop_all(s.engine)  # each test starts from empty tables
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

    from pipeline.results.schema import VERSION_TABLE
    from pipeline.results.store import Base

    for attempt in range(5):
        Base.metadata.drop_all(store.engine)
        VERSION_TABLE.drop(store.engine, checkfirst=True)  # a new database: no tables, no schema number
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


def test_a_database_from_before_versioning_is_migrated_and_keeps_its_runs(tmp_path):
    """The lab's database of last month: runs and samples, no schema number, no tuning_records."""
    from sqlalchemy import create_engine, inspect

    from pipeline.results.schema import LATEST, current_version
    from pipeline.results.store import Base

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.tables["runs"].create(old)
    Base.metadata.tables["latency_samples"].create(old)
    old.dispose()
    store = ResultStore(url)
    assert store.migrated == [2] and ResultStore(url).migrated == []  # once
    fresh = ResultStore(f"sqlite:///{tmp_path / 'new.db'}")
    assert fresh.migrated == [1, 2]
    again = create_engine(url)
    with again.connect() as connection:
        assert current_version(connection) == LATEST == 2
        assert "tuning_records" in inspect(connection).get_table_names()
    store.record(make_result(0), manifest={}, policy=POLICY)
    assert len(ResultStore(url).runs()) == 1


def test_a_pre_versioning_database_with_runs_keeps_them_through_the_migration(tmp_path):
    import sqlite3

    from pipeline.results.store import Base

    url = f"sqlite:///{tmp_path / 'old.db'}"
    current = ResultStore(url)
    current.record(make_result(0), manifest={}, policy=POLICY)
    with sqlite3.connect(tmp_path / "old.db") as db:  # back to last month's shape: no number, no tuning records
        db.execute("DROP TABLE edgedeploy_schema")
        db.execute("DROP TABLE tuning_records")
    assert "tuning_records" in Base.metadata.tables
    reopened = ResultStore(url)
    assert reopened.migrated == [2] and len(reopened.runs()) == 1


def test_a_database_newer_than_this_edgedeploy_is_refused(tmp_path):
    import sqlite3

    from edgedeploy.errors import StageError

    url = f"sqlite:///{tmp_path / 'results.db'}"
    ResultStore(url)
    with sqlite3.connect(tmp_path / "results.db") as db:
        db.execute("UPDATE edgedeploy_schema SET version = 99")
    with pytest.raises(StageError, match="newer than this edgedeploy") as refused:
        ResultStore(url)
    assert "upgrade edgedeploy" in refused.value.fix


def test_sqlite_runs_in_wal_mode_and_a_locked_database_is_a_transient_error(tmp_path, monkeypatch):
    """A real `BEGIN EXCLUSIVE` held by another connection: the writer waits its busy timeout, then says the database
    is busy (transient: the record step asks again) instead of failing for good."""
    import sqlite3

    from edgedeploy.errors import ResultsBusy

    monkeypatch.setenv("EDGEDEPLOY_DB_BUSY_SECONDS", "0.2")
    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    holder = sqlite3.connect(tmp_path / "results.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ResultsBusy, match="Cannot store the result") as busy:
            store.record(make_result(0), manifest={}, policy=POLICY)
        assert busy.value.transient
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.record(make_result(0), manifest={}, policy=POLICY)  # the lock gone, the same run is stored
    assert len(store.runs()) == 1
