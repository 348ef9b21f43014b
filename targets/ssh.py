"""SSH transport: the only module that imports paramiko.

Host keys are verified against the profile's known_hosts (RejectPolicy; never AutoAdd): an
unknown host is refused with its fingerprint and the command to trust it, a changed key is
refused and never retried. Connect, banner, auth and each command have their own timeouts;
keepalive is on. Every remote command is an argv list joined with shlex quoting, and runs under
`timeout` on the device, which signals its whole process group: a hung benchmark leaves
no orphan. A dropped connection is re-opened by the next operation, so cleanup still happens.

Two more things ride on the same connection, for tuning on the board: a long-running command (TVM's RPC
server) started with ``start()`` and tied to its SSH channel, so that it dies with its whole process group
when we stop it, when the connection drops or when its time limit passes; and ``forward()``, a port on
127.0.0.1 here whose connections are carried to a (host, port) as the device sees it ("direct-tcpip").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import posixpath
import re
import select
import shlex
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from edgedeploy.errors import (
    AuthError,
    CommandTimeout,
    ConnectFailed,
    HostKeyError,
    TransportError,
    TransportTimeout,
)
from targets.profiles import Connection
from targets.transport import CommandResult

# Runs a long-lived command on the device and ties it to the SSH channel that started it. It says the command's
# pid and process group (the group of the `timeout` around it: timeout makes its own), then waits; when its stdin
# ends (we closed it, or the connection dropped: sshd closes the pipe) or the command exits, it signals the whole
# process group, TERM and a second later KILL, so nothing the command started outlives it.
SUPERVISOR = """\
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
read -r _ _ _ _ pgid _ 2>/dev/null </proc/$$/stat || pgid=$PPID
echo "edgedeploy-started pid=$child pgid=$pgid"
teardown() { trap '' TERM; kill -TERM 0 2>/dev/null; sleep 1; kill -KILL 0 2>/dev/null; }
( read -r _ <&3; teardown ) &
exec 3<&-
wait "$child"
echo "edgedeploy-exited status=$?"
teardown
"""


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


@dataclass(frozen=True)
class SSHTimeouts:
    """One limit per phase, in seconds (httpx-style)."""

    connect: float = 10.0
    banner: float = 15.0
    auth: float = 15.0
    command: float = 600.0
    keepalive: int = 15


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: what `ssh-keygen -lf` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RejectAndRemember(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, keeping the offered key so the error can show its fingerprint."""

    def __init__(self) -> None:
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.offered = key
        raise paramiko.SSHException(f"host {hostname} not in known_hosts")


class SSHTransport:
    """A device reached over SSH."""

    def __init__(self, connection: Connection, *, timeouts: SSHTimeouts | None = None) -> None:
        if not connection.host:
            raise TransportError("The profile's connection has no host", fix="set connection.host")
        self.connection = connection
        self.timeouts = timeouts or SSHTimeouts()
        self.name = f"{connection.user + '@' if connection.user else ''}{connection.host}:{connection.port}"
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection ---------------------------------------------------------------------------
    def _host_key_name(self) -> str:
        host, port = self.connection.host, self.connection.port
        return host if port == 22 else f"[{host}]:{port}"

    def _connect(self) -> paramiko.SSHClient:
        conn, t = self.connection, self.timeouts
        known_hosts = Path(conn.known_hosts or "~/.ssh/known_hosts").expanduser()
        if not known_hosts.is_file():
            raise HostKeyError(
                f"known_hosts file {known_hosts} does not exist: host keys can't be verified",
                host=self.name, fix=f"ssh-keyscan -p {conn.port} {conn.host} >> {known_hosts}   "
                                    "(then compare the fingerprint with the device's own)",
            )
        client = paramiko.SSHClient()
        client.load_host_keys(str(known_hosts))
        policy = _RejectAndRemember()
        client.set_missing_host_key_policy(policy)
        key_file = str(Path(conn.key_file).expanduser()) if conn.key_file else None
        try:
            client.connect(
                conn.host, port=conn.port, username=conn.user, key_filename=key_file,
                allow_agent=key_file is None, look_for_keys=False,
                timeout=t.connect, banner_timeout=t.banner, auth_timeout=t.auth, channel_timeout=t.connect,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                "The device's host key has CHANGED since it was trusted: refusing to connect (never retried)",
                host=self.name, known_hosts=str(known_hosts),
                expected=fingerprint(exc.expected_key), offered=fingerprint(exc.key),
                fix="if the device was really reinstalled, remove its old line with "
                    f"ssh-keygen -R '{self._host_key_name()}' -f {known_hosts} and trust the new key",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthError(f"The device refused our key: {exc}", host=self.name, user=conn.user,
                            key_file=key_file or "(ssh-agent)",
                            fix="check connection.user and connection.key_file, and the device's "
                                "authorized_keys") from None
        except TimeoutError as exc:
            client.close()
            raise TransportTimeout(f"Connecting to the device timed out after {t.connect:.0f} s", host=self.name,
                                   phase="connect") from exc
        except paramiko.SSHException as exc:
            client.close()
            if policy.offered is not None:
                raise HostKeyError(
                    "The device's host key is unknown: refusing to connect",
                    host=self.name, offered=f"{policy.offered.get_name()} {fingerprint(policy.offered)}",
                    known_hosts=str(known_hosts),
                    fix=f"check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_*.pub), then: "
                        f"ssh-keyscan -p {conn.port} {conn.host} >> {known_hosts}",
                ) from None
            if "banner" in str(exc).lower():
                raise TransportTimeout(f"The device accepted the connection but sent no SSH banner within "
                                       f"{t.banner:.0f} s", host=self.name, phase="banner") from exc
            raise ConnectFailed(f"SSH negotiation with the device failed: {exc}", host=self.name) from exc
        except OSError as exc:
            client.close()
            raise ConnectFailed(f"Cannot reach the device: {exc.strerror or exc}", host=self.name,
                                fix="check that the device is on and sshd listens on the profile's port") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(t.keepalive)
        return client

    def _ssh(self) -> paramiko.SSHClient:
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            self.close()
            self._client = self._connect()
        return self._client

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._ssh()
        if self._sftp is None or self._sftp.get_channel().closed:
            self._sftp = client.open_sftp()
            self._sftp.get_channel().settimeout(self.timeouts.command)
        return self._sftp

    def close(self) -> None:
        for thing in (self._sftp, self._client):
            try:
                if thing is not None:
                    thing.close()
            except Exception:  # closing a dead connection must never mask the real error
                pass
        self._sftp = self._client = None

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
        channel = self._exec(_under_timeout(limit, [*_env_words(env), *argv]))
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + limit + 30  # the device's own timeout should fire first
        started = time.monotonic()
        try:
            while True:
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
        return CommandResult(tuple(argv), code, out.decode(errors="replace"), err.decode(errors="replace"))

    def write(self, local: Path, remote: str) -> None:
        try:
            self._sftp_client().put(str(local), remote, confirm=False)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise ConnectFailed(f"Upload to the device failed: {exc}", host=self.name, path=remote) from exc

    def read(self, remote: str, local: Path) -> None:
        try:
            self._sftp_client().get(remote, str(local))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise TransportError(f"Download from the device failed: {exc}", host=self.name, path=remote) from exc

    def sha256(self, remote: str) -> str | None:
        result = self.run(["sha256sum", "--", remote], timeout=self.timeouts.command)
        if result.returncode != 0:
            return None
        return result.stdout.split()[0]

    def rename(self, src: str, dst: str) -> None:
        self._sftp_client().posix_rename(src, dst)  # rename(2): atomic, replaces dst

    def remove(self, remote: str) -> None:
        try:
            self._sftp_client().remove(remote)
        except FileNotFoundError:
            pass

    def makedirs(self, remote: str) -> None:
        result = self.run(["mkdir", "-p", "--", remote], timeout=self.timeouts.command)
        if result.returncode != 0:
            raise TransportError(f"Cannot create {remote} on the device", host=self.name,
                                 value=result.stderr.strip()[:300])

    def free_bytes(self, remote_dir: str) -> int:
        result = self.run(["df", "-P", "-B1", "--", remote_dir], timeout=self.timeouts.command)
        try:
            return int(result.stdout.strip().splitlines()[-1].split()[3])
        except (IndexError, ValueError):
            raise TransportError(f"Cannot read free disk space of {remote_dir} on the device", host=self.name,
                                 value=(result.stdout + result.stderr).strip()[:300]) from None

    def home(self) -> str:
        return self._sftp_client().normalize(".")

    def resolve(self, path: str) -> str:
        """A workdir with ~ expanded on the device (SFTP doesn't expand it)."""
        if path == "~" or path.startswith("~/"):
            return posixpath.join(self.home(), path[2:])
        return path

    # -- for tuning on the board: a server left running, and a port forwarded to it ---------------------
    def start(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> RemoteProcess:
        """Start ``argv`` on the device and leave it running (a server); ``stop()`` the result when done.

        It runs under ``timeout -k 5 T`` like every command, inside a supervisor that kills its whole process
        group when it exits, when ``stop()`` closes its stdin, or when the SSH connection drops."""
        channel = self._exec(_under_timeout(timeout, ["sh", "-c", SUPERVISOR, "edgedeploy-supervisor",
                                                      *_env_words(env), *argv]))
        process = RemoteProcess(self, channel, argv)
        try:
            process.wait_started(30)
        except BaseException:
            process.stop()
            raise
        return process

    @contextlib.contextmanager
    def forward(self, host: str, port: int, *, ready_within: float = 0.0,
                server: RemoteProcess | None = None) -> Iterator[PortForward]:
        """A port on 127.0.0.1 here whose connections reach ``host:port`` as the device sees it.

        Checked on entry (one connection opened and closed at once): a device whose sshd forbids forwarding,
        or with nothing listening there after ``ready_within`` seconds (for a ``server`` that announced its port
        a moment before it listens; no longer once it has exited), is refused with the reason. Every connection
        is closed on exit."""
        client = self._ssh()
        forward = PortForward(client.get_transport(), (host, port), name=self.name, timeout=self.timeouts.connect)
        try:
            forward.probe(ready_within, while_running=server)
            yield forward
        finally:
            forward.close()


class RemoteProcess:
    """A command left running on the device, tied to one SSH channel (see ``SUPERVISOR``).

    Its stdout and stderr are read all the time (a server blocked on a full pipe would hang whoever talks to
    it); the last lines are kept for ``wait_for`` and for error messages."""

    def __init__(self, transport: SSHTransport, channel: paramiko.Channel, argv: list[str]) -> None:
        self.host = transport.name
        self.argv = tuple(argv)
        self.pid: int | None = None
        self.pgid: int | None = None
        self.exit_status: int | None = None  # the command's own status, when it exited by itself
        self._transport = transport
        self._channel = channel
        self._lines: deque[str] = deque(maxlen=4000)
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"edgedeploy-remote-{transport.name}", daemon=True)
        self._reader.start()

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
        if not self._ended:
            with contextlib.suppress(Exception):
                self._channel.shutdown_write()
            self._reader.join(grace)
            if self._reader.is_alive() and self.pgid is not None:
                with contextlib.suppress(Exception):
                    self._transport.run(["kill", "-KILL", "--", f"-{self.pgid}"], timeout=15)
                self._reader.join(5)
        with contextlib.suppress(Exception):
            self._channel.close()
        return self._ended

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class NothingListening(TransportError):
    """The device's sshd could not connect to a forwarded port's destination there."""


def _without_refused_channels(record: logging.LogRecord) -> bool:
    return "open FAILED" not in record.getMessage()


class PortForward:
    """127.0.0.1:``port`` here, each connection carried over the SSH connection to ``destination`` as the device
    sees it (a "direct-tcpip" channel), both ways, half-closes included."""

    def __init__(self, transport: paramiko.Transport, destination: tuple[str, int], *, name: str,
                 timeout: float) -> None:
        self.destination = destination
        self.name = name
        self.connections = 0  # carried so far
        self.error: TransportError | None = None  # why the last connection could not be carried, if it couldn't
        self._transport = transport
        self._timeout = timeout
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name=f"edgedeploy-forward-{self.port}", daemon=True)
        self._acceptor.start()

    def _channel(self, peer: tuple[str, int]) -> paramiko.Channel:
        host, port = self.destination
        try:
            return self._transport.open_channel("direct-tcpip", self.destination, peer, timeout=self._timeout)
        except paramiko.ChannelException as exc:
            if exc.code == 1:  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
                raise TransportError("The device's sshd does not allow port forwarding", host=self.name,
                                     value=exc.text, fix="set `AllowTcpForwarding yes` (or `local`) in the "
                                                         "device's sshd_config and reload sshd") from None
            raise NothingListening(f"The device could not connect to {host}:{port}", host=self.name,
                                   value=exc.text, expected=f"something listening on {host}:{port} there") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectFailed(f"Could not open a forwarded connection to {host}:{port}: {exc}",
                                host=self.name) from exc

    def probe(self, ready_within: float = 0.0, *, while_running: RemoteProcess | None = None) -> None:
        """Raise, with the reason, if connections can't be carried: forwarding refused (at once), or nothing
        listening there still after ``ready_within`` seconds (or once ``while_running`` has ended)."""
        deadline = time.monotonic() + ready_within
        # paramiko logs every refused channel as an ERROR; a refusal here is either retried or raised with the
        # reason, so its lines would only be noise (one per retry).
        paramiko_log = logging.getLogger(self._transport.get_log_channel())
        paramiko_log.addFilter(_without_refused_channels)
        try:
            while True:
                try:
                    self._channel(("127.0.0.1", self.port)).close()
                    return
                except NothingListening:
                    if time.monotonic() >= deadline or (while_running is not None and not while_running.running):
                        raise
                    time.sleep(0.25)
        finally:
            paramiko_log.removeFilter(_without_refused_channels)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                if not select.select([self._listener], [], [], 0.2)[0]:
                    continue
                sock, peer = self._listener.accept()
            except (OSError, ValueError):  # the listener was closed
                return
            try:
                channel = self._channel(peer)
            except TransportError as exc:
                self.error = exc
                sock.close()
                continue
            with self._lock:
                self._open.add((sock, channel))
                self.connections += 1
                thread = threading.Thread(target=self._carry, args=(sock, channel), daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _carry(self, sock: socket.socket, channel: paramiko.Channel) -> None:
        reading = {sock: True, channel: True}
        try:
            while any(reading.values()) and not self._closed.is_set():
                ready = select.select([end for end, still in reading.items() if still], [], [], 0.2)[0]
                if sock in ready:
                    data = sock.recv(65536)
                    if data:
                        channel.sendall(data)
                    else:  # the local side is done sending: pass the half-close on
                        reading[sock] = False
                        channel.shutdown_write()
                if channel in ready:
                    data = channel.recv(65536)
                    if data:
                        sock.sendall(data)
                    else:
                        reading[channel] = False
                        sock.shutdown(socket.SHUT_WR)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with self._lock:
                self._open.discard((sock, channel))
            for end in (channel, sock):
                with contextlib.suppress(Exception):
                    end.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        """Stop listening and close every connection, both ends."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            pairs, threads = list(self._open), list(self._threads)
        for sock, channel in pairs:
            for end in (channel, sock):
                with contextlib.suppress(Exception):
                    end.close()
        for thread in threads:
            thread.join(5)
