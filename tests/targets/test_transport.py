"""LocalTransport: a command past its limit is killed with its whole process group."""

from __future__ import annotations

import sys
import time

import pytest

from edgedeploy.errors import CommandTimeout
from targets.transport import LocalTransport
from tests.lab import process_running


def test_run_returns_output():
    result = LocalTransport().run([sys.executable, "-c", "print('hi')"], timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "hi"


def test_hung_command_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(CommandTimeout, match="killed"):
        # 10 s: time to start and write the pid on a busy CI core (two test workers on two cores)
        LocalTransport().run([sys.executable, "-c", script], timeout=10)
    child = int(pidfile.read_text())
    for _ in range(50):  # the kill is asynchronous
        if not process_running(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} survived the timeout")

