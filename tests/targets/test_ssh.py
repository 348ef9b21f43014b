"""The SSH transport against a real sshd: host keys, timeouts per phase, quoting, killing, faults."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from edgedeploy.errors import (
    AuthError,
    ChecksumMismatch,
    CommandTimeout,
    ConnectFailed,
    HostKeyError,
    PreflightError,
    TransportTimeout,
)
from pipeline.deploy import place_file
from pipeline.preflight import preflight
from targets.profiles import Connection, load_profile
from targets.ssh import SSHTimeouts, SSHTransport
from tests.lab import free_port, keygen, process_running, x86_python


def _connection(lab, **changes) -> Connection:
    base = dict(transport="ssh", host="127.0.0.1", port=lab.port, user=lab.user, key_file=str(lab.key_file),
                known_hosts=str(lab.known_hosts), python=tuple(x86_python()), workdir=str(lab.base / "device"))
    return Connection(**{**base, **changes})


@pytest.fixture
def ssh(lab_x86):
    transport = SSHTransport(_connection(lab_x86))
    yield transport
    transport.close()


def test_commands_are_quoted_argv(ssh):
    result = ssh.run(["echo", "$(id)", "a;b", "`id`", "x y"], timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == "$(id) a;b `id` x y"


def test_unknown_host_key_is_refused_with_its_fingerprint(lab_x86, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="unknown") as info:
        SSHTransport(_connection(lab_x86, known_hosts=str(empty))).run(["true"], timeout=10)
    expected = subprocess.run(["ssh-keygen", "-lf", str(lab_x86.base / "host_key.pub")], capture_output=True,
                              text=True).stdout.split()[1]
    assert expected in info.value.context["offered"]
    assert f"ssh-keyscan -p {lab_x86.port} 127.0.0.1 >> {empty}" in info.value.fix
    assert not info.value.transient


def test_changed_host_key_is_refused(lab_x86, tmp_path):
    other = keygen(tmp_path / "impostor").split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{lab_x86.port} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyError, match="CHANGED") as info:
        SSHTransport(_connection(lab_x86, known_hosts=str(known))).run(["true"], timeout=10)
    assert not info.value.transient and "ssh-keygen -R" in info.value.fix


def test_wrong_key_is_an_auth_error(lab_x86, tmp_path):
    keygen(tmp_path / "stranger")
    with pytest.raises(AuthError) as info:
        SSHTransport(_connection(lab_x86, key_file=str(tmp_path / "stranger"))).run(["true"], timeout=10)
    assert not info.value.transient


def test_closed_port_is_transient():
    conn = Connection(transport="ssh", host="127.0.0.1", port=free_port(), user="x", known_hosts="/dev/null",
                      workdir="/tmp")
    with pytest.raises((ConnectFailed, HostKeyError)) as info:
        SSHTransport(conn).run(["true"], timeout=5)
    assert isinstance(info.value, HostKeyError) or info.value.transient


def test_silent_sshd_times_out_at_the_banner(lab_x86):
    """A server that accepts TCP and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    conn = _connection(lab_x86, port=server.getsockname()[1])
    started = time.monotonic()
    with pytest.raises(TransportTimeout) as info:
        SSHTransport(conn, timeouts=SSHTimeouts(connect=2, banner=1, auth=1)).run(["true"], timeout=5)
    assert info.value.context["phase"] == "banner" and info.value.transient
    assert time.monotonic() - started < 10
    server.close()



def test_hung_command_is_killed_on_the_device_with_its_children(ssh, tmp_path):
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
              "time.sleep(600)\n")
    with pytest.raises(CommandTimeout, match="killed there"):
        ssh.run([sys.executable, "-c", script], timeout=10)  # time to start, on a busy CI core
    child = int(pidfile.read_text())
    for _ in range(50):
        if not process_running(child):
            break
        time.sleep(0.1)
    assert not process_running(child), "the benchmark's child outlived the timeout"


def _session_of(pid: int, sshd: int) -> int:
    """The sshd process that serves the connection ``pid`` runs under: its ancestor whose parent is the listener."""
    while True:
        with open(f"/proc/{pid}/stat") as fh:
            parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        if parent == sshd:
            return pid
        if parent <= 1:
            raise AssertionError("not under the lab's sshd")
        pid = parent


def test_a_dropped_connection_is_reported_as_one_and_its_command_dies_there(lab_x86, tmp_path):
    """The device's sshd session is killed mid-command (the board dropped us): run() used to return status -1 as
    if the command had said so, and the command ran on with nobody to hang up on it."""
    import os
    import signal

    transport = SSHTransport(_connection(lab_x86))
    pidfile = tmp_path / "command.pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"

    def drop_the_session() -> None:
        for _ in range(300):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        os.kill(_session_of(int(pidfile.read_text()), lab_x86.process.pid), signal.SIGKILL)

    dropper = threading.Thread(target=drop_the_session)
    dropper.start()
    started = time.monotonic()
    with pytest.raises(ConnectFailed, match="dropped while a command ran") as dropped:
        transport.run([sys.executable, "-c", script], timeout=300)
    dropper.join()
    assert dropped.value.transient and time.monotonic() - started < 60
    command = int(pidfile.read_text())
    for _ in range(100):
        if not process_running(command):
            break
        time.sleep(0.1)
    assert not process_running(command), "the command outlived its connection"
    assert transport.run(["echo", "again"], timeout=30).stdout.strip() == "again"  # a retry reconnects
    transport.close()


def test_a_command_killed_by_a_signal_is_not_a_dropped_connection(ssh):
    result = ssh.run(["sh", "-c", "kill -KILL $$"], timeout=30)
    assert result.returncode != 0


@pytest.fixture
def upload(tmp_path, ssh):
    new = tmp_path / "new.so"
    new.write_bytes(b"new artifact " * 5000)
    device_dir = str(tmp_path / "device")
    ssh.makedirs(device_dir)
    final = tmp_path / "device" / "model.so"
    final.write_bytes(b"previous artifact")
    return new, final


def _leftovers(final):
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


def test_upload_verify_rename_then_skip(ssh, upload):
    new, final = upload
    assert place_file(ssh, new, str(final)).uploaded
    assert final.read_bytes() == new.read_bytes() and _leftovers(final) == []
    assert not place_file(ssh, new, str(final)).uploaded


class CutMidStream(SSHTransport):
    """The connection dies half way through the upload (a real drop: the SSH session is torn down)."""

    def write(self, local, remote):
        data = local.read_bytes()
        with self._sftp_client().open(remote, "wb") as fh:
            fh.write(data[: len(data) // 2])
        self._client.get_transport().close()
        raise ConnectFailed("connection lost mid-upload", host=self.name, path=remote)


class CorruptOnArrival(SSHTransport):
    """The bytes on the device's disk differ from what was sent."""

    def write(self, local, remote):
        super().write(local, remote)
        with self._sftp_client().open(remote, "ab") as fh:
            fh.write(b"X")


def test_cut_upload_leaves_previous_artifact_and_no_partial(lab_x86, upload):
    new, final = upload
    transport = CutMidStream(_connection(lab_x86))
    with pytest.raises(ConnectFailed, match="mid-upload") as info:
        place_file(transport, new, str(final))
    transport.close()
    assert info.value.context["host"] == transport.name and info.value.context["path"].startswith(str(final.parent))
    assert final.read_bytes() == b"previous artifact" and _leftovers(final) == []


def test_corrupted_remote_file_is_not_swapped_in(lab_x86, upload):
    new, final = upload
    transport = CorruptOnArrival(_connection(lab_x86))
    with pytest.raises(ChecksumMismatch) as info:
        place_file(transport, new, str(final))
    transport.close()
    assert info.value.context["expected_sha256"] != info.value.context["actual_sha256"]
    assert not info.value.transient
    assert final.read_bytes() == b"previous artifact" and _leftovers(final) == []


class TinyDisk(SSHTransport):
    def free_bytes(self, remote_dir):
        return 1000


def test_disk_too_small_is_refused_before_upload(lab_x86, tmp_path):
    profile = load_profile(str(lab_x86.profile(extends="x86-server", python=x86_python())))
    transport = TinyDisk(profile.connection)
    with pytest.raises(PreflightError, match="free disk") as info:
        preflight(transport, profile, str(tmp_path / "w"), bytes_needed=10**6)
    transport.close()
    ctx = info.value.context
    assert ctx["bytes_needed"] == 10**6 and ctx["bytes_free"] == 1000 and ctx["directory"] == str(tmp_path / "w")
    assert ctx["host"] == f"{lab_x86.user}@127.0.0.1:{lab_x86.port}"


def test_preflight_refuses_a_device_of_another_arch(lab_x86, tmp_path):
    profile = load_profile(str(lab_x86.profile(extends="raspberry-pi-4", python=x86_python())))
    transport = SSHTransport(profile.connection)
    with pytest.raises(PreflightError, match="x86_64, but profile"):
        preflight(transport, profile, str(tmp_path / "w"), bytes_needed=1)
    transport.close()


def test_a_file_whose_name_holds_a_backslash_or_a_newline_is_placed_and_verified(ssh, tmp_path):
    """sha256sum escapes such a name and marks its hash with a leading backslash: the hash never matched and
    every upload of the file failed as a checksum mismatch."""
    local = tmp_path / "model.so"
    local.write_bytes(b"weights" * 1000)
    (tmp_path / "device").mkdir()
    remote = str(tmp_path / "device" / "odd\\name\nwith newline.so")
    assert place_file(ssh, local, remote).uploaded
    assert not place_file(ssh, local, remote).uploaded  # the device's hash now reads as ours
