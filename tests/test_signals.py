"""Stopping `deploy run`: SIGTERM to the `deploy` process ends the run and everything it started (the local device
runner, Prefect's temporary server) within seconds; SIGKILL takes the command and the runner down too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def _start(tmp_path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update({"EDGEDEPLOY_HOME": str(tmp_path / "home"), **(extra_env or {})})
    # A benchmark long enough to be stopped in the middle of (onnxruntime: no compile to wait for).
    return subprocess.Popen([sys.executable, "-m", "edgedeploy", "run", "digits-cnn", "--runtime", "onnxruntime",
                             "--min-seconds", "300", "--min-iterations", "1000000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _runner_below(deploy: subprocess.Popen, timeout: float = 240) -> list[psutil.Process]:
    """Every process below `deploy` once the device runner runs among them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        below = psutil.Process(deploy.pid).children(recursive=True)
        if any("device_runner.py" in " ".join(_cmdline(p)) for p in below):
            return below
        assert deploy.poll() is None, "deploy ended before its benchmark started"
        time.sleep(0.5)
    raise AssertionError("the device runner never started")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _alive(processes: list[psutil.Process]) -> list[str]:
    return [" ".join(_cmdline(p))[:120] for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_ends_the_run_and_everything_it_started(tmp_path):
    deploy = _start(tmp_path)
    try:
        below = _runner_below(deploy)
        assert any("prefect" in " ".join(_cmdline(p)) for p in below), "no temporary Prefect server to check"
        deploy.send_signal(signal.SIGTERM)
        assert deploy.wait(timeout=15) == 128 + signal.SIGTERM
        time.sleep(1)
        assert not _alive(below), f"left running 10 s after SIGTERM: {_alive(below)}"
    finally:
        if deploy.poll() is None:
            deploy.kill()


def test_sigkill_takes_the_command_and_the_local_runner_down(tmp_path):
    deploy = _start(tmp_path)
    try:
        below = _runner_below(deploy)
        ours = [p for p in below if any(mark in " ".join(_cmdline(p)) for mark in ("device_runner.py", "edgedeploy"))]
        deploy.kill()
        deploy.wait(timeout=15)
        for _ in range(50):
            if not _alive(ours):
                break
            time.sleep(0.2)
        assert not _alive(ours), f"left running after SIGKILL: {_alive(ours)}"
    finally:  # Prefect's temporary server, which nothing can end after a SIGKILL (launcher.py says so)
        home = str(tmp_path / "home")
        for process in psutil.process_iter():
            try:
                if process.environ().get("EDGEDEPLOY_HOME") == home:
                    process.kill()
            except psutil.Error:
                continue
