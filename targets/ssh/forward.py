"""Port forwarding over SSH, for tuning on the board: ``forward()``, a port on 127.0.0.1 here whose connections
are carried to a (host, port) as the device sees it ("direct-tcpip"), checked on entry (waiting a moment for a
server that announced its port before it listens).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import paramiko

from edgedeploy.errors import ConnectFailed, TransportError
from targets.ssh.connection import SSHConnection
from targets.ssh.process import RemoteProcess
from targets.transport import NothingListening


def _without_refused_channels(record: logging.LogRecord) -> bool:
    return "open FAILED" not in record.getMessage()


class PortForwarding(SSHConnection):
    """Ports forwarded to the device (a part of ``SSHTransport``)."""

    # -- for tuning on the board: a port forwarded to a server left running ------------------------------
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
