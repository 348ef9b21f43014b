"""Results in a real database: SQLite (the default) and PostgreSQL (a lab's shared database)."""

from __future__ import annotations

import pytest

from pipeline.regression import RegressionPolicy
from pipeline.store import ResultStore
from tests.factories import make_result

POLICY = RegressionPolicy()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    url = request.getfixturevalue("postgres_url")
    s = ResultStore(url)
    from pipeline.store import Base

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
