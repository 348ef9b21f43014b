"""The results database failing under a finished run: the measurement is kept in result.json whatever happens to the
database (a real `BEGIN EXCLUSIVE` lock held past every retry, a truncated database file)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.quantize import QuantConfig
from pipeline.results.store import ResultStore
from pipeline.workloads import WORKLOADS

pytestmark = pytest.mark.slow
QUICK = BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.1, rounds=1)


def _run(db: Path) -> object:
    return deploy_run(RunConfig(model_path=str(WORKLOADS["digits-cnn"].model_path()), profile="local",
                                quant=QuantConfig(scheme="fp32"), runtime="onnxruntime", bench=QUICK,
                                eval_samples=20, db_url=f"sqlite:///{db}"))


def test_a_locked_database_keeps_both_runs_result_files(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDEPLOY_DB_BUSY_SECONDS", "0.2")
    db = tmp_path / "results.db"
    first = _run(db)
    assert first.recorded and first.record_error is None
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer that never lets go while the second run records
    try:
        second = _run(db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not second.recorded and "Cannot store the result" in second.record_error
    for result in (first, second):
        kept = json.loads(Path(result.result_path).read_text())
        assert kept["run_id"] == result.run_id and kept["latency_ms"]["p50"] > 0
    assert json.loads(Path(second.result_path).read_text())["recorded"] is False
    assert [row.run_id for row in ResultStore(f"sqlite:///{db}").runs()] == [first.run_id]


def test_a_truncated_database_file_keeps_the_result_file(prefect_server, tmp_path):
    db = tmp_path / "results.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * 40)  # a header and nothing: what a cut copy leaves
    result = _run(db)
    assert not result.recorded and "results database" in result.record_error
    assert json.loads(Path(result.result_path).read_text())["recorded"] is False
