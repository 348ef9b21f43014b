"""The lab flow: every model on every device in every scheme.

Devices run in parallel, one thread each; on a device the jobs run one after the other, and each
holds the board's Prefect global concurrency limit (`device:<user@host:port>`, limit 1, strict) so
that no two jobs ever share a board, even from two lab runs at once (and every session with a board holds its lock
on the board itself: targets.board_lock, for runs from elsewhere). The limits are created
before the jobs start; `strict=True` makes a job fail rather than run unguarded if its limit is
missing (a misspelled name). Each lab run publishes a table and a markdown summary as Prefect
artifacts. A job that fails does not stop the others; the lab run then ends Failed, naming the jobs and why, after
publishing every outcome (`run_lab` still returns the summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.states import Failed, State
from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import EdgeDeployError
from flows.run import deploy_run
from pipeline.lab import LabJob, jobs, load_lab
from pipeline.results.store import ResultStore

LIMIT_PREFIX = "device:"


class JobOutcome(BaseModel):
    """What one cell of the matrix did, with its wall-clock interval on the device."""

    model_config = ConfigDict(frozen=True)
    device: str
    model: str
    scheme: str
    started: str
    finished: str
    run_id: str | None = None
    valid: bool = False
    p50_ms: float | None = None
    speedup: float | None = None
    accuracy: float | None = None
    regression: bool = False
    regression_reasons: list[str] = []
    error: str | None = None


class LabSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    lab: str
    outcomes: list[JobOutcome]

    @property
    def regressions(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.regression]

    @property
    def failures(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.error]


def limit_name(device: str) -> str:
    return f"{LIMIT_PREFIX}{device}"


def ensure_device_limits(devices: set[str]) -> None:
    """One slot per device, created if missing (existing limits are left as the lab set them). Created outright, not
    looked up first: two labs starting at once both found a limit missing and the slower one's create failed
    (ObjectAlreadyExists, test_two_labs_at_once_never_share_a_device, 2026-12-07)."""

    async def create() -> None:
        async with get_client() as client:
            for device in sorted(devices):
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=limit_name(device), limit=1))

    asyncio.run(create())


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _run_job(job: LabJob) -> JobOutcome:
    model = job.model
    with concurrency(limit_name(job.board or job.device), occupy=1, strict=True):
        started = _now()
        try:
            result = deploy_run(job.config)
        except Exception as exc:  # one job's failure, whatever it is, must not lose the others'
            error = exc.render() if isinstance(exc, EdgeDeployError) else f"{type(exc).__name__}: {exc}"
            asked = job.label or job.config.quant.scheme
            get_run_logger().error("%s: %s %s failed: %s", job.device, model, asked, error,
                                   exc_info=not isinstance(exc, EdgeDeployError))
            return JobOutcome(device=job.device, model=model, scheme=asked, started=started,
                              finished=_now(), error=error)
        finished = _now()
    verdict = result.regression
    return JobOutcome(
        device=job.device, model=result.model.workload or model, scheme=result.series, started=started,
        finished=finished, run_id=result.run_id, valid=result.valid, p50_ms=result.latency_ms.p50,
        speedup=result.speedup, accuracy=result.accuracy.value,
        regression=bool(verdict and verdict.regressed), regression_reasons=verdict.reasons if verdict else [],
    )


def _device_queue(device_jobs: list[LabJob]) -> list[JobOutcome]:
    return [_run_job(job) for job in device_jobs]


def _publish(lab_name: str, outcomes: list[JobOutcome]) -> None:
    create_table_artifact(
        key=f"lab-{lab_name}",
        table=[{"device": o.device, "model": o.model, "scheme": o.scheme,
                "p50 ms": None if o.p50_ms is None else round(o.p50_ms, 3),
                "speed-up vs ORT fp32": None if o.speedup is None else round(o.speedup, 3),
                "accuracy": o.accuracy, "valid": o.valid, "regression": o.regression, "error": o.error}
               for o in outcomes],
        description=f"lab {lab_name}: latest results",
    )
    lines = [f"# Lab {lab_name}", "", f"{len(outcomes)} jobs, "
             f"{sum(o.regression for o in outcomes)} regression(s), {sum(bool(o.error) for o in outcomes)} failure(s)",
             ""]
    for o in outcomes:
        mark = "REGRESSION" if o.regression else ("FAILED" if o.error else "ok")
        lines.append(f"- **{o.device}** {o.model} {o.scheme}: {mark}"
                     + (f" ({'; '.join(o.regression_reasons)})" if o.regression else ""))
    create_markdown_artifact(key=f"lab-{lab_name}-summary", markdown="\n".join(lines),
                             description=f"lab {lab_name}: summary")


def _failed(summary: LabSummary) -> State:
    """The lab run's final state when jobs failed: Failed, naming each, with the whole summary as its data."""
    jobs_text = "; ".join(f"{o.device} {o.model} {o.scheme}: {o.error.splitlines()[0]}" for o in summary.failures)
    return Failed(message=f"{len(summary.failures)} of {len(summary.outcomes)} lab jobs failed: {jobs_text}",
                  data=summary)


@flow(name="lab-run", persist_result=False, log_prints=False)
def lab_run(lab_path: str) -> LabSummary | State:
    """Run a lab file's matrix now: devices in parallel, one job at a time per device. Ends Failed when a job failed
    (every outcome still published); :func:`run_lab` gives the summary either way."""
    lab = load_lab(Path(lab_path))
    matrix = jobs(lab)
    by_device: dict[str, list[LabJob]] = {}  # by board: two profiles of one board share its queue
    for job in matrix:
        by_device.setdefault(job.board or job.device, []).append(job)
    ensure_device_limits(set(by_device))
    ResultStore(lab.db_url)  # the results database opens (and has its tables) before hours of work, not after
    get_run_logger().info("lab %s: %d jobs on %d devices", lab.name, len(matrix), len(by_device))
    with ThreadPoolExecutor(max_workers=len(by_device), thread_name_prefix="device") as pool:
        # Each thread carries a copy of this flow's context, so every job is a subflow of this run.
        futures = [pool.submit(contextvars.copy_context().run, _device_queue, device_jobs)
                   for device_jobs in by_device.values()]
        outcomes = [o for future in futures for o in future.result()]
    _publish(lab.name, outcomes)
    summary = LabSummary(lab=lab.name, outcomes=outcomes)
    return _failed(summary) if summary.failures else summary


def run_lab(lab_path: str) -> LabSummary:
    """Run the lab flow and return its summary, whether or not jobs failed (``summary.failures``); a lab run that
    failed as a whole (a bad lab file, an unreachable database) raises its error."""
    outcome = lab_run(lab_path, return_state=True).result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


REPO_ROOT = Path(__file__).resolve().parents[1]


class ScheduledLab(BaseModel):
    model_config = ConfigDict(frozen=True)
    deployment_id: str
    deployment: str
    work_pool: str
    cron: str
    timezone: str
    worker_command: str


def schedule_lab(lab_path: Path, *, cron: str, timezone: str, work_pool: str, name: str | None = None) -> ScheduledLab:
    """Create (or update) a deployment of the lab flow on the Prefect server, with a cron schedule.

    The schedule lives in the server's database, so it survives restarts of the worker that serves it.
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.schedules import Cron

    from edgedeploy.errors import OptionError

    lab = load_lab(lab_path)
    jobs(lab)  # profiles must load now, not at 2 a.m.
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise OptionError("Cannot use this schedule", value=f"{cron!r} in {timezone!r}",
                          expected="a 5-field cron expression and an IANA time zone",
                          fix='e.g. --cron "0 2 * * *" --timezone Europe/Berlin') from exc

    async def ensure_pool() -> None:
        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
            except ObjectAlreadyExists:
                pass

    asyncio.run(ensure_pool())
    deployment_name = name or lab.name
    flow_from_source = lab_run.from_source(source=str(REPO_ROOT), entrypoint="flows/lab.py:lab_run")
    # to_deployment + apply rather than Flow.deploy: the latter's check for online workers sends
    # limit=None, which Prefect 3.8.8's own server rejects (422).
    deployment = flow_from_source.to_deployment(
        name=deployment_name, work_pool_name=work_pool, schedules=[schedule],
        parameters={"lab_path": str(Path(lab_path).resolve())},
        description=f"edgedeploy lab {lab.name}: {len(lab.models)} model(s) x {len(lab.profiles)} device(s) x "
                    f"{len(lab.schemes)} scheme(s)",
    )
    deployment_id = deployment.apply()
    return ScheduledLab(deployment_id=str(deployment_id), deployment=f"lab-run/{deployment_name}",
                        work_pool=work_pool, cron=cron, timezone=timezone,
                        worker_command=f"prefect worker start --pool {work_pool}")
