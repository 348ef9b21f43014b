"""Running commands on the device over SSH: exit status, time limits, the remote process group, output.

Every remote command is an argv list joined with shlex quoting, and runs under `timeout` on the device, which
signals its whole process group: a hung benchmark leaves no orphan. And under a supervisor (``run_supervisor``)
that kills that group when the SSH connection goes: the device has no terminal to hang up on a command, so a
benchmark whose connection dropped ran on, and the retry ran beside it. A drop is reported as one (ConnectFailed,
transient: retried): paramiko gives a channel that closed without an exit status the status -1, which used to read
as the command's own.

A long-running command (TVM's RPC server, for tuning on the board) is started with ``start()`` and tied to its
SSH channel, so that it dies with its whole process group when we stop it, when the connection drops or when its
time limit passes.
"""

from __future__ import annotations

import contextlib
import re
import select
import shlex
import threading
import time
from collections import deque

import paramiko

from edgedeploy.errors import CommandTimeout, ConnectFailed, TransportError
from targets.ssh.connection import SSHConnection
from targets.transport import CommandResult

# How the device tells that we are still there: a byte on the command's stdin every HEARTBEAT_S seconds. The
# watcher ends the command's process group when its stdin ends (we closed it, or sshd noticed the drop) or when no
# byte came for SILENCE_S seconds (a silent partition: sshd never notices, and a command ran on for hours).
HEARTBEAT_S = 15
SILENCE_S = 60


def _watch() -> str:
    """Shell: wait while a byte comes within SILENCE_S seconds each time (fd 3: the command's stdin)."""
    return f'while [ "$(timeout {SILENCE_S:g} dd bs=1 count=1 <&3 2>/dev/null | wc -c)" -eq 1 ]; do :; done'


def supervisor() -> str:
    """Runs a long-lived command on the device and ties it to the SSH channel that started it. It says the command's
    pid and process group (the group of the `timeout` around it: timeout makes its own), then waits; when the
    watcher gives up on us or the command exits, it signals the whole process group, TERM and a second later KILL,
    so nothing the command started outlives it."""
    return f"""\
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
read -r _ _ _ _ pgid _ 2>/dev/null </proc/$$/stat || pgid=$PPID
echo "edgedeploy-started pid=$child pgid=$pgid"
teardown() {{ trap '' TERM; kill -TERM 0 2>/dev/null; sleep 1; kill -KILL 0 2>/dev/null; }}
( {_watch()}; teardown ) >/dev/null 2>&1 &
exec 3<&-
wait "$child"
echo "edgedeploy-exited status=$?"
teardown
"""


def run_supervisor() -> str:
    """The same tie for a command we wait for: when it exits by itself, the supervisor exits with its status at once
    (no grace period, no markers in its output); when the watcher gives up on us first, the group goes."""
    return f"""\
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
( {_watch()}; trap '' TERM; kill -TERM 0 2>/dev/null; sleep 1; kill -KILL 0 2>/dev/null ) >/dev/null 2>&1 &
watcher=$!
exec 3<&-
wait "$child"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"""


def _heartbeat(channel: paramiko.Channel) -> float:
    """One byte to the supervisor's watcher (see _watch); a channel that can't take it is noticed elsewhere."""
    with contextlib.suppress(Exception):
        channel.send(b".")
    return time.monotonic()


def _env_words(env: dict[str, str] | None) -> list[str]:
    return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


def _under_timeout(limit: float, words: list[str]) -> str:
    """The shell line that runs ``words`` under `timeout -k 5 LIMIT` (every word quoted): the device ends it
    and its process group when the time is up, whatever happens to us."""
    return shlex.join(["timeout", "-k", "5", f"{limit:.0f}", *words])


_STARTED = re.compile(r"^edgedeploy-started pid=(\d+) pgid=(\d+)$")
_EXITED = re.compile(r"^edgedeploy-exited status=(\d+)$")

# How `timeout -k 5 T` ends a command that ran too long: 124 (TERM worked), 137 (KILL needed), or no
# status at all (-1 from paramiko) when the KILL sent to the process group took timeout itself down too.
KILLED_BY_TIMEOUT = (124, 137, -1)


class RemoteCommands(SSHConnection):
    """Commands run on the device (a part of ``SSHTransport``)."""

    # -- primitives -----------------------------------------------------------------------------
    def _exec(self, command: str) -> paramiko.Channel:
        """A new session channel running ``command`` (a shell string already quoted)."""
        client = self._ssh()
        try:
            channel = client.get_transport().open_session(timeout=self.timeouts.connect)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError) as exc:
            self.close()
            raise ConnectFailed(f"Lost the connection starting a command: {exc}", host=self.name) from exc
        return channel

    def run(self, argv: list[str], *, timeout: float | None = None, env: dict[str, str] | None = None) -> CommandResult:
        limit = timeout or self.timeouts.command
        channel = self._exec(_under_timeout(limit, ["sh", "-c", run_supervisor(), "edgedeploy-supervisor",
                                                    *_env_words(env), *argv]))
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + limit + 30  # the device's own timeout should fire first
        started = beat = time.monotonic()
        try:
            while True:
                if time.monotonic() - beat >= HEARTBEAT_S:
                    beat = _heartbeat(channel)
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if channel.closed and not channel.exit_status_ready():
                    self.close()
                    raise ConnectFailed("The connection dropped while a command ran", host=self.name,
                                        command=" ".join(argv[:3]))
                if time.monotonic() > deadline:
                    channel.close()
                    raise CommandTimeout(f"Command on the device ran past its {limit:.0f} s limit",
                                         host=self.name, command=" ".join(argv[:3]))
                time.sleep(0.02)
            code = channel.recv_exit_status()
        finally:
            channel.close()
        if code in KILLED_BY_TIMEOUT and time.monotonic() - started >= limit - 1:
            raise CommandTimeout(f"Command on the device ran past its {limit:.0f} s limit and was killed there "
                                 "with its process group", host=self.name, command=" ".join(argv[:3]))
        if code == -1 and not self._connected():  # alive: a command killed by a signal (sshd's exit-signal)
            self.close()
            raise ConnectFailed("The connection dropped while a command ran (the device's supervisor ends the "
                                "command and its process group)", host=self.name, command=" ".join(argv[:3]))
        return CommandResult(tuple(argv), code, out.decode(errors="replace"), err.decode(errors="replace"))

    # -- for tuning on the board: a server left running -------------------------------------------------
    def start(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> RemoteProcess:
        """Start ``argv`` on the device and leave it running (a server); ``stop()`` the result when done.

        It runs under ``timeout -k 5 T`` like every command, inside a supervisor that kills its whole process
        group when it exits, when ``stop()`` closes its stdin, or when the SSH connection drops."""
        channel = self._exec(_under_timeout(timeout, ["sh", "-c", supervisor(), "edgedeploy-supervisor",
                                                      *_env_words(env), *argv]))
        process = RemoteProcess(self, channel, argv)
        try:
            process.wait_started(30)
        except BaseException:
            process.stop()
            raise
        return process


class RemoteProcess:
    """A command left running on the device, tied to one SSH channel (see ``supervisor``).

    Its stdout and stderr are read all the time (a server blocked on a full pipe would hang whoever talks to
    it); the last lines are kept for ``wait_for`` and for error messages."""

    def __init__(self, transport: RemoteCommands, channel: paramiko.Channel, argv: list[str]) -> None:
        self.host = transport.name
        self.argv = tuple(argv)
        self.pid: int | None = None
        self.pgid: int | None = None
        self.exit_status: int | None = None  # the command's own status, when it exited by itself
        self._transport = transport
        self._channel = channel
        self._lines: deque[str] = deque(maxlen=4000)
        self._ended = False
        self._stopping = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"edgedeploy-remote-{transport.name}", daemon=True)
        self._reader.start()
        self._beating = threading.Thread(target=self._beat, name=f"edgedeploy-heartbeat-{transport.name}",
                                         daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        """The heartbeat the device's watcher waits for, until the command ends or stop() closes its stdin."""
        while True:
            with self._changed:
                if self._ended or self._stopping:
                    return
                self._changed.wait(HEARTBEAT_S)
                if self._ended or self._stopping:
                    return
            _heartbeat(self._channel)

    @property
    def running(self) -> bool:
        """False once the channel has ended: the command and everything it started are gone."""
        return not self._ended

    def _read(self) -> None:
        partial = {False: b"", True: b""}  # stdout, stderr
        channel = self._channel
        try:
            while True:
                select.select([channel], [], [], 0.5)
                got = False
                for is_err, ready, recv in ((False, channel.recv_ready, channel.recv),
                                            (True, channel.recv_stderr_ready, channel.recv_stderr)):
                    while ready():
                        data = recv(65536)
                        if not data:
                            break
                        got = True
                        *complete, partial[is_err] = (partial[is_err] + data).split(b"\n")
                        self._add([line.decode(errors="replace") for line in complete])
                if not got and (channel.closed or channel.eof_received) and not channel.recv_ready() \
                        and not channel.recv_stderr_ready():
                    break
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            self._add([rest.decode(errors="replace") for rest in partial.values() if rest])
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def _add(self, lines: list[str]) -> None:
        with self._changed:
            for line in lines:
                if (started := _STARTED.match(line)) and self.pid is None:
                    self.pid, self.pgid = int(started[1]), int(started[2])
                    continue
                if exited := _EXITED.match(line):
                    self.exit_status = int(exited[1])
                    continue
                self._lines.append(line)
            self._changed.notify_all()

    def output(self, last: int = 30) -> str:
        """The last lines it printed (stdout and stderr interleaved as they arrived)."""
        with self._changed:
            return "\n".join(list(self._lines)[-last:])

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.pid is None:
                if self._ended or time.monotonic() > deadline:
                    raise TransportError(
                        "A command on the device did not start", host=self.host, command=" ".join(self.argv[:4]),
                        value=self.output(10) or "(no output)", fix="check that `sh` and GNU `timeout` exist there",
                    )
                self._changed.wait(0.5)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *, what: str) -> re.Match[str]:
        """The first line that matches ``pattern``, once it is printed; ``what`` names it in errors. Raises
        TransportError if the command ends first, CommandTimeout if it doesn't come within ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if match := regex.search(line):
                        return match
                if self._ended:
                    status = "" if self.exit_status is None else f" with status {self.exit_status}"
                    raise TransportError(f"{' '.join(self.argv[:4])} exited on the device{status} before {what}",
                                         host=self.host, value=self.output(15) or "(no output)")
                if time.monotonic() > deadline:
                    raise CommandTimeout(f"{' '.join(self.argv[:4])} did not get to {what} within {timeout:.0f} s",
                                         host=self.host, value=self.output(15) or "(no output)")
                self._changed.wait(0.5)

    def stop(self, grace: float = 10.0) -> bool:
        """End the command and everything it started; True when the device confirmed it (the channel ended).

        Closing its stdin makes the supervisor kill the process group; if the channel doesn't end within
        ``grace`` seconds, the group is killed from a second command. Never raises: it runs in cleanup."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if not self._ended:
            with contextlib.suppress(Exception):
                self._channel.shutdown_write()
            self._reader.join(grace)
            if self._reader.is_alive() and self.pgid is not None:
                with contextlib.suppress(Exception):
                    # `-s KILL`: dash's built-in kill (run() starts commands through the shell) reads "-KILL --
                    # -PGID" as a bad number
                    self._transport.run(["kill", "-s", "KILL", "--", f"-{self.pgid}"], timeout=15)
                self._reader.join(5)
        with contextlib.suppress(Exception):
            self._channel.close()
        return self._ended

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
