"""Transports: how files reach a device and commands run there.

A transport offers primitive operations; the deploy protocol built on them (temporary name,
checksum on the device, atomic rename) lives in pipeline.deploy, so every transport gets the
same guarantees. ``LocalTransport`` is the device "this machine": files under a work directory,
commands as child processes in their own process group (killed whole on timeout).

A ``ServingTransport`` (SSH) also starts long-running processes on the device and forwards a local port to one
of them: what timing tuning candidates on a board takes (pipeline.compiler.tuning.board).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgedeploy.errors import CommandTimeout, TransportError
from targets.hashing import sha256_file


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Transport(Protocol):
    """Primitive operations on a device. Paths are POSIX strings on the device."""

    name: str

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> CommandResult: ...
    def write(self, local: Path, remote: str) -> None: ...
    def read(self, remote: str, local: Path) -> None: ...
    def sha256(self, remote: str) -> str | None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove(self, remote: str) -> None: ...
    def makedirs(self, remote: str) -> None: ...
    def free_bytes(self, remote_dir: str) -> int: ...
    def close(self) -> None: ...


class NothingListening(TransportError):
    """The device could not connect to a forwarded port's destination there."""


class RemoteProcess(Protocol):
    """A process started on the device and left running; leaving its ``with`` block stops it and what it started."""

    @property
    def running(self) -> bool: ...
    def output(self, last: int = 30) -> str: ...
    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *, what: str) -> re.Match[str]: ...
    def stop(self, grace: float = 10.0) -> bool: ...
    def __enter__(self) -> RemoteProcess: ...
    def __exit__(self, *exc_info) -> None: ...


class PortForward(Protocol):
    """127.0.0.1:``port`` here, each connection carried to a destination as the device sees it."""

    port: int


class ServingTransport(Transport, Protocol):
    """A transport that can also leave a server running on the device and reach it through a forwarded port."""

    def start(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> RemoteProcess: ...
    def forward(self, host: str, port: int, *, ready_within: float = 0.0,
                server: RemoteProcess | None = None) -> AbstractContextManager[PortForward]: ...


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the process (thread) that started it dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG); elsewhere nothing. A local runner whose `deploy` was killed kept a core busy for minutes."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Files and directories the tool makes on a device are its user's alone: another user of the board can neither swap a
# library nor read the inputs.
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


class LocalTransport:
    """This machine as a device."""

    name = "local"

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> CommandResult:
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise TransportError(f"Cannot start {argv[0]!r} on the local device", value=exc.strerror,
                                 fix="check the profile's connection.python") from exc
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no orphan keeps running
            proc.communicate()
            raise CommandTimeout(
                f"Command on the local device ran past its {timeout:.0f} s limit and was killed",
                value=" ".join(argv[:4]) + (" ..." if len(argv) > 4 else ""), host="local",
            ) from None
        return CommandResult(tuple(argv), proc.returncode, stdout, stderr)

    def write(self, local: Path, remote: str) -> None:
        shutil.copyfile(local, remote)
        os.chmod(remote, PRIVATE_FILE)

    def read(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def sha256(self, remote: str) -> str | None:
        return sha256_file(remote) if os.path.isfile(remote) else None

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, remote: str) -> None:
        try:
            os.remove(remote)
        except FileNotFoundError:
            pass

    def makedirs(self, remote: str) -> None:
        os.makedirs(remote, mode=PRIVATE_DIR, exist_ok=True)

    def free_bytes(self, remote_dir: str) -> int:
        return shutil.disk_usage(remote_dir).free

    def close(self) -> None:
        pass


def expand_workdir(workdir: str) -> str:
    """A local device's workdir with ~ expanded (remote ones are expanded by the remote shell)."""
    return str(Path(workdir).expanduser())
