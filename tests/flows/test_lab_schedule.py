"""A scheduled lab on Prefect's own machinery: a real server, a deployment with a cron schedule, a worker
(restarted once: the schedule lives on the server), a triggered run, and both devices' results in the database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.results.store import ResultStore
from tests.flows.test_lab import write_lab
from tests.lab import x86_python

pytestmark = pytest.mark.slow

PREFECT = Path(sys.executable).with_name("prefect")


def _worker(env: dict[str, str], pool: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(PREFECT), "worker", "start", "--pool", pool], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()


def test_scheduled_two_device_lab_runs_on_a_worker(prefect_server, lab_x86, lab_pi4, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    pi, pi_python = lab_pi4
    profiles = [str(lab_x86.profile(extends="x86-server", python=x86_python())),
                str(pi.profile(extends="raspberry-pi-4", python=pi_python,
                               runtimes={"tvm": "0.27.0", "onnxruntime": "1.27.0"}))]
    db = tmp_path / "lab.db"
    lab = write_lab(tmp_path / "two-devices.yaml", profiles, db_url=f"sqlite:///{db}")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "EDGEDEPLOY_HOME": str(tmp_path / "home"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    scheduled = subprocess.run(
        [sys.executable, "-m", "edgedeploy", "lab", "schedule", str(lab), "--cron", "0 2 * * *",
         "--timezone", "Europe/Berlin", "--pool", "lab-pool", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert scheduled.returncode == 0, scheduled.stderr
    info = json.loads(scheduled.stdout)
    assert info["deployment"] == "lab-run/two-devices"

    log = tmp_path / "worker.log"
    worker = _worker(env, "lab-pool", log)
    time.sleep(5)
    _stop(worker)  # the serving process goes away and comes back: the schedule must not care
    worker = _worker(env, "lab-pool", log)
    try:
        flow_run = run_deployment(info["deployment"], timeout=0)

        async def wait_and_read():
            async with get_client() as client:
                deadline = time.monotonic() + 900
                run = await client.read_flow_run(flow_run.id)
                while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
                    await asyncio.sleep(3)
                    run = await client.read_flow_run(flow_run.id)
                deployment = await client.read_deployment(run.deployment_id)
                return run, deployment

        run, deployment = asyncio.run(wait_and_read())
    finally:
        _stop(worker)
    assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    rows = ResultStore(f"sqlite:///{db}").runs()
    assert {r.profile for r in rows} == {"lab-x86", "lab-pi4"} and all(r.valid for r in rows)
