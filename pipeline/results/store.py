"""Results that last: every run's result, manifest, raw latency samples and environment, in a database.

SQLite by default (a file under $EDGEDEPLOY_HOME, nothing to set up); any SQLAlchemy URL, e.g.
``postgresql+psycopg://user@host/edgedeploy``, when a lab shares one database ($EDGEDEPLOY_DB_URL).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, String, create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edgedeploy.errors import ResultsBusy, StageError
from pipeline.config import edgedeploy_home
from pipeline.regression import RegressionPolicy, Verdict, compare
from pipeline.report import RunResult
from pipeline.results.schema import migrate


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    """One `deploy run`: the numbers the dashboard and the regression check need, plus everything else as JSON."""

    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(String(100), index=True)
    scheme: Mapped[str] = mapped_column(String(200), index=True)
    valid: Mapped[bool] = mapped_column(Boolean)
    p50_ms: Mapped[float] = mapped_column(Float)
    p90_ms: Mapped[float] = mapped_column(Float)
    baseline_p50_ms: Mapped[float] = mapped_column(Float)
    speedup: Mapped[float] = mapped_column(Float)
    metric: Mapped[str | None] = mapped_column(String(50), nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_baseline: Mapped[float | None] = mapped_column(Float, nullable=True)
    regression: Mapped[bool] = mapped_column(Boolean, default=False)
    regression_detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON)


class SampleRow(Base):
    """The raw latency samples of one runtime in one run (warm-up excluded), in milliseconds."""

    __tablename__ = "latency_samples"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    runtime: Mapped[str] = mapped_column(String(20), primary_key=True)  # artifact | baseline
    samples_ms: Mapped[list[float]] = mapped_column(JSON)


class TuningRecordRow(Base):
    """One timed MetaSchedule candidate of one kernel for one target, shared by every host of the lab
    (pipeline.compiler.tuning.records: the plain JSON of a record; pipeline.tuning_share: the sync)."""

    __tablename__ = "tuning_records"
    target_key: Mapped[str] = mapped_column(String(64), primary_key=True)  # the target and TVM's version
    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # the kernel and its schedule
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    workload: Mapped[list[Any]] = mapped_column(JSON)
    record: Mapped[list[Any]] = mapped_column(JSON)
    mean_s: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def default_url() -> str:
    return os.environ.get("EDGEDEPLOY_DB_URL") or f"sqlite:///{edgedeploy_home() / 'results.db'}"


def busy_seconds() -> float:
    """How long SQLite waits for another writer's lock before it says "database is locked"."""
    try:
        return max(0.0, float(os.environ.get("EDGEDEPLOY_DB_BUSY_SECONDS", "30")))
    except ValueError:
        return 30.0


def _database_error(what: str, url: str, exc: SQLAlchemyError) -> StageError:
    """One clear error; a lock held by another writer is transient (the record step asks again)."""
    reason = str(exc).splitlines()[0][:300]
    kind = ResultsBusy if "locked" in reason or "busy" in reason else StageError
    return kind(what, value=url, reason=reason, fix="another process holds the database: it is asked again" if
                kind is ResultsBusy else "check EDGEDEPLOY_DB_URL, and that the database file or server is sound")


def _sqlite_engine(url: str):
    """SQLite in WAL mode (readers never wait for the writer) with a busy timeout (a writer waits for another's
    lock instead of failing at once)."""
    from sqlalchemy import event

    engine = create_engine(url, future=True, connect_args={"timeout": busy_seconds()})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_seconds() * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    return engine


class ResultStore:
    """Read and write results; the schema is created on first use."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = _sqlite_engine(self.url) if self.url.startswith("sqlite") else \
                create_engine(self.url, future=True, pool_pre_ping=True)
            self.migrated = migrate(self.engine, Base.metadata, self.engine_url_safe())
        except SQLAlchemyError as exc:
            raise _database_error("Cannot open the results database", self.engine_url_safe(), exc) from exc

    def engine_url_safe(self) -> str:
        """The URL without its password, for messages."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def history(self, model_sha256: str, profile: str, scheme: str, *, before: datetime,
                limit: int) -> list[tuple[list[float], float | None]]:
        """(artifact samples, accuracy) of the latest valid runs before ``before``, oldest first."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(RunRow, SampleRow)
                .join(SampleRow, (SampleRow.run_id == RunRow.run_id) & (SampleRow.runtime == "artifact"))
                .where(RunRow.model_sha256 == model_sha256, RunRow.profile == profile, RunRow.scheme == scheme,
                       RunRow.valid.is_(True), RunRow.created < before)
                .order_by(RunRow.created.desc()).limit(limit)
            ).all()
        return [(s.samples_ms, r.accuracy) for r, s in reversed(rows)]

    def record(self, result: RunResult, *, manifest: dict[str, Any], policy: RegressionPolicy) -> Verdict:
        """Compare with this (model, profile, series)'s history (RunResult.series: the scheme, and a runtime other
        than TVM on the CPU), then store the run with the verdict."""
        created = datetime.fromisoformat(result.created)
        try:
            history = self.history(result.model.sha256, result.profile, result.series, before=created,
                                   limit=policy.history)
        except SQLAlchemyError as exc:
            raise _database_error("Cannot read this run's history", self.engine_url_safe(), exc) from exc
        verdict = compare(result.benchmark["artifact"]["samples_ms"], result.accuracy.value,
                          [h[0] for h in history], [h[1] for h in history], policy)
        if not result.valid:  # an invalid measurement proves nothing either way
            verdict = verdict.model_copy(update={"latency_regression": False, "accuracy_regression": False,
                                                 "reasons": []})
        row = RunRow(
            run_id=result.run_id, created=created, model_sha256=result.model.sha256,
            model_name=result.model.workload or Path(result.model.path).stem, profile=result.profile,
            scheme=result.series, valid=result.valid, p50_ms=result.latency_ms.p50, p90_ms=result.latency_ms.p90,
            baseline_p50_ms=result.baseline.latency_ms.p50, speedup=result.speedup,
            metric=result.accuracy.metric, accuracy=result.accuracy.value,
            accuracy_baseline=result.accuracy.baseline, regression=verdict.regressed,
            regression_detail=verdict.model_dump(), flow_run_id=result.flow_run_id,
            result=json.loads(result.model_dump_json()), manifest=manifest,
            environment={"tools": result.tools, "device": {
                k: result.benchmark["artifact"].get(k) for k in ("device_python", "device_machine", "versions")}},
        )
        samples = [SampleRow(run_id=result.run_id, runtime="artifact",
                             samples_ms=result.benchmark["artifact"]["samples_ms"]),
                   SampleRow(run_id=result.run_id, runtime="baseline",
                             samples_ms=result.benchmark["baseline"]["samples_ms"])]
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.add_all(samples)
        except SQLAlchemyError as exc:
            raise _database_error("Cannot store the result", self.engine_url_safe(), exc) from exc
        return verdict

    def add_tuning_records(self, target_key: str, target: dict[str, Any], records: list[dict[str, Any]],
                           source: str) -> int:
        """Store the records (pipeline.compiler.tuning.records) this database lacks; how many were new."""
        if not records:
            return 0
        try:
            with Session(self.engine) as session, session.begin():
                have = set(session.scalars(select(TuningRecordRow.key).where(TuningRecordRow.target_key == target_key)))
                new = {r["key"]: r for r in records if r["key"] not in have}
                now = datetime.now().astimezone()
                session.add_all(TuningRecordRow(key=key, target_key=target_key, target=target, workload=r["workload"],
                                                record=r["record"], mean_s=r["mean_s"], source=source, created=now)
                                for key, r in new.items())
        except SQLAlchemyError as exc:
            raise _database_error("Cannot store tuning records", self.engine_url_safe(), exc) from exc
        return len(new)

    def tuning_records(self, target_key: str) -> list[dict[str, Any]]:
        """Every record the lab has for one target, as pipeline.compiler.tuning.records reads them."""
        try:
            with Session(self.engine) as session:
                rows = session.scalars(select(TuningRecordRow).where(TuningRecordRow.target_key == target_key))
                return [{"key": r.key, "workload": r.workload, "record": r.record, "mean_s": r.mean_s} for r in rows]
        except SQLAlchemyError as exc:
            raise _database_error("Cannot read tuning records", self.engine_url_safe(), exc) from exc

    def tuning_targets(self) -> list[tuple[str, dict[str, Any], int]]:
        """(target key, target, records) for every target the lab has records for."""
        from sqlalchemy import func

        try:
            with Session(self.engine) as session:
                counts = dict(session.execute(select(TuningRecordRow.target_key, func.count())
                                              .group_by(TuningRecordRow.target_key)).all())
                targets = {key: session.scalars(select(TuningRecordRow.target)
                                                .where(TuningRecordRow.target_key == key).limit(1)).one()
                           for key in counts}
        except SQLAlchemyError as exc:
            raise _database_error("Cannot read tuning records", self.engine_url_safe(), exc) from exc
        return [(key, targets[key], counts[key]) for key in sorted(counts)]

    def runs(self, *, model_sha256: str | None = None, profile: str | None = None,
             scheme: str | None = None) -> list[RunRow]:
        """Runs, newest first, optionally for one (model, profile, scheme)."""
        query = select(RunRow).order_by(RunRow.created.desc())
        if model_sha256:
            query = query.where(RunRow.model_sha256 == model_sha256)
        if profile:
            query = query.where(RunRow.profile == profile)
        if scheme:
            query = query.where(RunRow.scheme == scheme)
        with Session(self.engine) as session:
            return list(session.scalars(query))

    def version(self) -> tuple[int, str | None]:
        """(runs, newest run's time): changes whenever a run is stored (the dashboard's cache key)."""
        from sqlalchemy import func

        with Session(self.engine) as session:
            count, newest = session.execute(select(func.count(RunRow.run_id), func.max(RunRow.created))).one()
        return int(count), str(newest) if newest is not None else None

    def run(self, run_id: str) -> RunRow | None:
        with Session(self.engine) as session:
            return session.get(RunRow, run_id)

    def samples(self, run_id: str) -> dict[str, list[float]]:
        with Session(self.engine) as session:
            rows = session.scalars(select(SampleRow).where(SampleRow.run_id == run_id))
            return {s.runtime: s.samples_ms for s in rows}
