"""One board, one user of it at a time: a lock held ON the board, by every command that uses it.

Two benchmarks on one board at once each measure the other's load. Prefect's concurrency limit of the lab flow
only orders that flow's own jobs (and was keyed by profile name: two profiles for one board never excluded each
other); `deploy run`, `deploy bench` and another lab on another controller took nothing. So every session with a
board (pipeline.session.DeviceSession) holds `flock` on a file of the board's user, ``~/.edgedeploy-board.lock``:
whoever reaches the board as that user, through whichever profile and workdir, queues there (two board users don't
exclude each other: a lock file others could open could be held by anyone). A board over SSH holds it in a
process under the supervisor (targets.ssh.process): our stop, our death, a dropped connection or a silent one
release it. This machine as a device holds it with fcntl in this process. Waiting has a limit
(``connection.lock_timeout``); past it the run stops with who to wait for, not with a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from edgedeploy.errors import BoardBusy, CommandTimeout, ConnectFailed, TransportError
from targets.transport import LocalTransport, RemoteProcess, Transport

LOCK_NAME = ".edgedeploy-board.lock"
LOCKED = "edgedeploy-board-locked"
# The lock's holder on the board lives at most this long (a safety net: it is stopped when the session ends).
HOLDER_LIFETIME_S = 24 * 3600
# flock: wait up to $2 seconds for the lock on ~/$1, say so once held, then hold it until killed.
BUSY_STATUS = 75  # flock's exit status when the wait ran out (-E): told apart from a flock that can't run
HOLD = (f'exec flock -E {BUSY_STATUS} -w "$2" "$HOME/$1" sh -c "echo {LOCKED}; exec sleep {HOLDER_LIFETIME_S}"')


def _busy(board: str, timeout: float) -> BoardBusy:
    return BoardBusy(f"The board {board} is busy: another run has held it for more than {timeout:.0f} s",
                     value=f"~/{LOCK_NAME} on the board",
                     fix="wait for the other run (`deploy lab` runs, other hosts' runs), or raise the profile's "
                         "connection.lock_timeout")


@contextlib.contextmanager
def _local(timeout: float) -> Iterator[RemoteProcess | None]:
    path = Path.home() / LOCK_NAME
    with path.open("a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _busy("local", timeout) from None
                time.sleep(0.2)
        try:
            yield None  # held by this process: it can't be lost while the process lives
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _remote(transport, timeout: float) -> Iterator[RemoteProcess | None]:
    holder = transport.start(["sh", "-c", HOLD, "edgedeploy-lock", LOCK_NAME, f"{timeout:.0f}"],
                             timeout=HOLDER_LIFETIME_S + timeout + 60)
    try:
        try:
            holder.wait_for(LOCKED, timeout + 60, what="the board's lock")
        except CommandTimeout:
            raise _busy(transport.name, timeout) from None
        except TransportError as exc:  # flock gave up (exit 1), or there is no flock
            if holder.exit_status == BUSY_STATUS:
                raise _busy(transport.name, timeout) from None
            raise TransportError(f"Cannot lock the board {transport.name}", value=exc.value,
                                 fix="install util-linux (it has `flock`) on the board") from None
        yield holder
    finally:
        holder.stop()


@contextlib.contextmanager
def board_lock(transport: Transport, timeout: float) -> Iterator[RemoteProcess | None]:
    """Hold the board ``transport`` reaches for the ``with`` block, waiting up to ``timeout`` seconds for it; yields
    the process holding it on the board (None for this machine), whose end means the lock is gone."""
    if isinstance(transport, LocalTransport):
        with _local(timeout) as holder:
            yield holder
    else:
        with _remote(transport, timeout) as holder:
            yield holder


def still_held(holder: RemoteProcess | None, board: str) -> None:
    """Raise ConnectFailed (transient: the task runs again, and locks again) when the lock's holder has ended: its
    connection dropped or went silent, and whatever ran meanwhile may have shared the board."""
    if holder is not None and not holder.running:
        raise ConnectFailed(f"The lock on {board} was lost while this session used it (its connection dropped)",
                            host=board)
