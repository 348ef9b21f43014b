"""Real cuts and a real full disk under an upload, against a real sshd: the error that says what happened survives
the cleanup, what a cut leaves behind is swept by a later deploy, and a full disk is no connection problem."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgedeploy.errors import ConnectFailed, TransportError
from pipeline.deploy import TEMPORARY_PREFIX, place_file, sweep
from targets.profiles import Connection
from targets.ssh import SSHTimeouts, SSHTransport
from tests.lab import start_sshd, x86_python

pytestmark = pytest.mark.slow


def _connection(lab, workdir: Path) -> Connection:
    return Connection(transport="ssh", host="127.0.0.1", port=lab.port, user=lab.user, key_file=str(lab.key_file),
                      known_hosts=str(lab.known_hosts), python=tuple(x86_python()), workdir=str(workdir))


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


class SlowUpload(SSHTransport):
    """SFTP put, with a hook once the first half is on the device's disk (to cut there)."""

    half_written = threading.Event()

    def _put(self, local, remote):
        def progress(sent: int, total: int) -> None:
            if sent >= total // 2 and not self.half_written.is_set():
                self.half_written.set()
                time.sleep(0.5)  # let the cut land while the rest is in flight

        self._sftp_client().put(str(local), remote, callback=progress, confirm=False)


def test_a_board_gone_mid_upload_keeps_the_original_error_and_a_later_deploy_sweeps_the_leftover(tmp_path):
    lab = start_sshd(tmp_path / "board", "board")
    device = tmp_path / "device"
    device.mkdir()
    big = tmp_path / "big.so"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    transport = SlowUpload(_connection(lab, device), timeouts=SSHTimeouts(connect=3, banner=3, auth=3, command=30))
    SlowUpload.half_written.clear()

    def cut() -> None:
        SlowUpload.half_written.wait(60)
        sessions = _children(lab.process.pid)  # before the listener goes: then they belong to init
        lab.process.send_signal(signal.SIGKILL)  # the board is gone: no listener to reconnect to...
        for child in sessions:
            os.kill(child, signal.SIGKILL)  # ...and the session that carried the upload

    cutter = threading.Thread(target=cut)
    cutter.start()
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as failed:
        place_file(transport, big, str(device / "model.so"))
    cutter.join()
    transport.close()
    assert failed.value.context["host"] == transport.name and str(device) in failed.value.context["path"]
    assert time.monotonic() - started < 60
    leftovers = [p for p in device.iterdir() if p.name.startswith(TEMPORARY_PREFIX)]
    assert leftovers, "the cut left no temporary: nothing to sweep (the case didn't happen)"
    # The board is back; a later deploy's sweep removes temporaries older than an hour.
    back = start_sshd(tmp_path / "board-again", "board")
    later = SSHTransport(_connection(back, device))
    try:
        young = device / f"{TEMPORARY_PREFIX}other.so.tmp-live"
        young.write_bytes(b"an upload in flight")
        for leftover in leftovers:
            os.utime(leftover, (time.time() - 7200, time.time() - 7200))
        old_run = device / "runs" / "night-001"
        old_run.mkdir(parents=True)
        os.utime(old_run, (time.time() - 9 * 86400, time.time() - 9 * 86400))
        assert sweep(later, str(device)).returncode == 0
        assert not any(p.exists() for p in leftovers) and young.exists() and not old_run.exists()
    finally:
        later.close()
        back.stop()


def test_a_disk_that_fills_during_the_upload_is_not_a_dropped_connection(lab_x86, tmp_path):
    """A real tmpfs of 1 MiB; the free-space check passes, then another writer fills the disk: sftp-server's bare
    "Failure" used to become a ConnectFailed, retried twice into the same full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine can't mount a tmpfs (needs root and CAP_SYS_ADMIN): no full disk to make")
    try:
        upload = tmp_path / "model.so"
        upload.write_bytes(os.urandom(700 * 1024))

        class AnotherWriter(SSHTransport):
            def free_bytes(self, remote_dir: str) -> int:
                free = super().free_bytes(remote_dir)
                if not (disk / "filler").exists():
                    (disk / "filler").write_bytes(b"\0" * (600 * 1024))  # right after the check said it fits
                return free

        transport = AnotherWriter(_connection(lab_x86, disk))
        with pytest.raises(TransportError) as refused:
            place_file(transport, upload, str(disk / "model.so"))
        transport.close()
        assert not isinstance(refused.value, ConnectFailed) and not refused.value.transient
        assert "disk filled up" in refused.value.what and "free space" in refused.value.fix
        assert not any(p.name.startswith(TEMPORARY_PREFIX) for p in disk.iterdir())  # its temporary removed
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_silent_partition_ends_the_command_on_the_device(lab_x86, tmp_path, monkeypatch):
    """The device stops hearing from us without any connection closing (its sshd session stopped with SIGSTOP: no
    byte and no EOF reaches the command's stdin, as in a partition nobody notices). sshd never gives up on such a
    connection; the supervisor's watcher does, after SILENCE_S seconds without a heartbeat."""
    from targets.ssh import process as remote
    from tests.lab import process_running
    from tests.targets.test_ssh import _session_of

    monkeypatch.setattr(remote, "SILENCE_S", 3)
    monkeypatch.setattr(remote, "HEARTBEAT_S", 1)
    transport = SSHTransport(_connection(lab_x86, tmp_path))
    pidfile = tmp_path / "command.pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    caller = threading.Thread(target=lambda: _swallow(transport.run, [x86_python()[0], "-c", script], timeout=600))
    caller.start()
    for _ in range(300):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    command = int(pidfile.read_text())
    time.sleep(2.5)  # heartbeats flowing: the command lives past SILENCE_S
    assert process_running(command)
    session = _session_of(command, lab_x86.process.pid)
    os.kill(session, signal.SIGSTOP)
    try:
        for _ in range(150):
            if not process_running(command):
                break
            time.sleep(0.1)
        assert not process_running(command), "the command outlived a silent partition"
    finally:
        os.kill(session, signal.SIGKILL)  # the client's side ends too (ConnectFailed, swallowed)
        caller.join(60)
        transport.close()


def _swallow(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except Exception:  # noqa: BLE001 - this test looks at the device, not at the client's error
        pass
