"""The `deploy` process a user (or a lab's scheduler) starts, and stops: a small supervisor around the real command.

A stopped `deploy run` used to leave its children running: SIGTERM reaches Python's handler only between bytecodes,
and the main thread can be inside TVM's C++ for minutes (tuning), so the run went on; and a run that did end left the
local device runner (98 % CPU) and Prefect's temporary server behind, re-parented to init. So the command runs in a
child process, and this one, which does nothing but wait, answers signals at once:

- SIGTERM or SIGHUP: passed on to the command, which gets GRACE_S seconds to end; then it and everything it started
  (this process is their subreaper: orphans come back to it) get SIGTERM, and a moment later SIGKILL. Exit 128+sig.
- SIGINT (Ctrl-C) reaches the whole terminal's process group anyway: here it only starts the same clean-up
  deadline.
- This process killed outright (SIGKILL): the command dies with it (PR_SET_PDEATHSIG), and so does a local device
  runner (targets.transport.die_with_parent); what Prefect itself started may then stay (nothing can catch SIGKILL).
- The command's own exit: its status, after its leftovers are ended.

`EDGEDEPLOY_SUPERVISED=1` in the environment marks the child (and runs the command directly, for tests and
debuggers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

MARK = "EDGEDEPLOY_SUPERVISED"
GRACE_S = 5.0
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no subreaper, no death signal; the rest still works
        pass


def _end_descendants(grace: float = 1.0) -> None:
    """SIGTERM to every process below this one, SIGKILL to those still there after ``grace`` seconds."""
    import psutil

    try:
        below = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for process in below:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(below, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def main() -> int:
    if os.environ.get(MARK) == "1":
        from edgedeploy.cli import app

        app(prog_name="deploy")
        return 0
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # -P: the current directory is not put on sys.path (a pipeline.py or flows.py there would be run as ours).
    command = subprocess.Popen([sys.executable, "-P", "-m", "edgedeploy", *sys.argv[1:]], env={**os.environ, MARK: "1"},
                               preexec_fn=lambda: _prctl(PR_SET_PDEATHSIG, signal.SIGKILL))
    stopped: dict[str, float | int] = {}

    def stop(signum, _frame) -> None:
        if "signal" not in stopped:
            stopped.update(signal=signum, deadline=time.monotonic() + GRACE_S)
            if signum != signal.SIGINT:  # Ctrl-C reached the command already, with the terminal's whole group
                try:
                    command.send_signal(signum)
                except OSError:
                    pass

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup deploy ...`, a background job: left ignored
            signal.signal(signum, stop)
    while True:
        try:
            status = command.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if "deadline" in stopped and time.monotonic() > stopped["deadline"]:
                command.kill()
    _end_descendants()
    if "signal" in stopped:
        return 128 + int(stopped["signal"])
    return status if status >= 0 else 128 - status
