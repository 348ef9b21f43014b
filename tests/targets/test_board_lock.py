"""One board, one run at a time: the lock lives on the board (flock over SSH, fcntl for this machine), so it holds
across profiles, workdirs, commands and controllers, waits a bounded time, and goes with its holder.

Every lab "board" here is this machine as root (one ~/.edgedeploy-board.lock): the other pytest worker's runs take
the same lock, as they should (they share the cores). So these tests never time how long a free board takes to get:
only what this test holds is timed."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from edgedeploy.errors import BoardBusy
from pipeline.session import DeviceSession
from targets.board_lock import board_lock
from targets.profiles import load_profile
from targets.transport import LocalTransport
from tests.lab import x86_python

pytestmark = pytest.mark.slow


def _profile(lab, name: str, workdir: str, timeout: float):
    path = lab.profile(extends="x86-server", python=x86_python())
    text = path.read_text().replace(f"name: {lab.name}", f"name: {name}")
    text = text.replace(str(lab.base / "device"), str(lab.base / workdir))
    mine = lab.base / f"{name}.yaml"
    mine.write_text(text + f"  lock_timeout: {timeout}\n" if text.endswith("\n") else text)
    return load_profile(str(mine))


def test_two_profiles_for_one_board_take_turns_on_the_board_itself(lab_x86):
    """Two profile files (names, workdirs) for one board: the second session waits for the first, and past its
    lock_timeout stops with a clear error instead of measuring beside it."""
    first = _profile(lab_x86, "lab-x86-a", "device-a", 30)
    second = _profile(lab_x86, "lab-x86-b", "device-b", 1)
    assert first.board_id() == second.board_id() == f"{lab_x86.user}@127.0.0.1:{lab_x86.port}"
    with DeviceSession(first):
        started = time.monotonic()
        with pytest.raises(BoardBusy, match="is busy") as busy:
            with DeviceSession(second):
                pass
        assert 1 <= time.monotonic() - started < 30 and "lock_timeout" in busy.value.fix
    with DeviceSession(_profile(lab_x86, "lab-x86-b2", "device-b", 600)):  # released with the session
        pass


def test_a_waiting_session_gets_the_board_when_the_holder_is_done(lab_x86):
    profile = _profile(lab_x86, "lab-x86-c", "device-c", 600)
    order = []
    holder_in = threading.Event()

    def holder() -> None:
        with DeviceSession(profile):
            holder_in.set()
            time.sleep(2)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    holder_in.wait(600)
    with DeviceSession(profile):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_holder_whose_connection_drops_frees_the_board(lab_x86):
    """The lock's holder runs under the supervisor: the board frees itself when its controller vanishes."""
    from tests.lab import process_running
    from tests.targets.test_ssh import _session_of

    profile = _profile(lab_x86, "lab-x86-d", "device-d", 600)
    held = DeviceSession(profile).__enter__()  # never left: its connection is cut below
    holders = {}
    for pid in os.popen("pgrep -x flock").read().split():
        try:
            holders[int(pid)] = _session_of(int(pid), lab_x86.process.pid)
        except (AssertionError, OSError):  # another worker's board, or gone
            continue
    assert holders, "no lock holder under the lab's sshd"
    for session in set(holders.values()):
        os.kill(session, signal.SIGKILL)
    for _ in range(100):  # the supervisor sees its stdin end and ends flock: the lock is free
        if not any(process_running(pid) for pid in holders):
            break
        time.sleep(0.1)
    assert not any(process_running(pid) for pid in holders), "the lock's holder outlived its connection"
    with DeviceSession(_profile(lab_x86, "lab-x86-e", "device-e", 600)):
        pass
    del held


def test_this_machine_as_a_device_is_locked_too(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with board_lock(LocalTransport(), 5):
        with pytest.raises(BoardBusy, match="board local is busy"):
            with board_lock(LocalTransport(), 0.5):
                pass
    with board_lock(LocalTransport(), 0.5):
        pass
