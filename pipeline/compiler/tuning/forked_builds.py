"""Run a batch of builds in a forked child, each with a time limit.

Tuning builds thousands of candidate kernels. Now and then LLVM takes many minutes over one (a huge unrolled
loop nest, seen on an int8 conv of PP-LCNet: stuck over 5 minutes), and a build in this process can't be
interrupted. MetaSchedule's LocalBuilder runs builds in fresh worker processes, but each spends ~30-40 s
importing TVM's tensor intrinsics. A fork of this process has everything imported already: the child builds
the batch one candidate after the other and reports each; a candidate past its limit, or one that kills the
child, is a failed trial, and a new child carries on with the rest.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

Item = TypeVar("Item")
Outcome = tuple[str | None, str | None]  # (artifact path, error)


def _child(items: Sequence[Item], indices: list[int], build: Callable[[Item], str], write_fd: int) -> None:
    with os.fdopen(write_fd, "w") as out:
        for index in indices:
            try:
                outcome: Outcome = (build(items[index]), None)
            except BaseException as exc:  # noqa: BLE001 - every failure is this candidate's result
                outcome = (None, f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
            out.write(json.dumps([index, *outcome]) + "\n")
            out.flush()


def _reap(pid: int, kill: bool) -> None:
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.waitpid(pid, 0)


@dataclass
class _Child:
    """A forked builder: its process, the pipe it reports on (read raw: a buffered reader can hold a finished
    report that select() no longer sees), the items it has yet to report."""

    pid: int
    fd: int
    pending: list[int]
    deadline: float
    unread: bytes = b""

    def reports(self) -> list[str] | None:
        """The complete report lines the pipe has now; None at end of file (the child is gone)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        *lines, self.unread = (self.unread + chunk).split(b"\n")
        return [line.decode() for line in lines]


def _spawn(items: Sequence[Item], indices: list[int], build: Callable[[Item], str], timeout_s: float) -> _Child:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, report, and leave without running this process's exit handlers
        os.close(read_fd)
        try:
            _child(items, indices, build, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    return _Child(pid, read_fd, list(indices), time.monotonic() + timeout_s)


def build_all(items: Sequence[Item], build: Callable[[Item], str], *, timeout_s: float,
              workers: int = 1) -> list[Outcome]:
    """``build(item)`` for every item, in up to ``workers`` forked children at once (each builds its share one
    after the other); an item past ``timeout_s`` (or that crashes its child) gets an error instead of a path, and
    a new child carries on with the rest of that share."""
    outcomes: dict[int, Outcome] = {}
    shares = [list(range(len(items)))[w::max(workers, 1)] for w in range(max(workers, 1))]
    children = [_spawn(items, share, build, timeout_s) for share in shares if share]
    with selectors.DefaultSelector() as selector:
        for child in children:
            selector.register(child.fd, selectors.EVENT_READ, child)
        while children:
            wait = max(min(child.deadline for child in children) - time.monotonic(), 0)
            ready = {key.data.pid for key, _ in selector.select(wait)}
            for child in list(children):
                if child.pid in ready:
                    lines = child.reports()
                    if lines is not None:
                        for line in lines:
                            index, path, error = json.loads(line)
                            outcomes[index] = (path, error)
                            child.pending.remove(index)
                            child.deadline = time.monotonic() + timeout_s
                        if child.pending:
                            continue
                        ended, killed = None, False
                    else:  # the child died mid-build (a crash in the compiler)
                        ended, killed = "the build crashed its process", False
                elif time.monotonic() >= child.deadline:
                    ended, killed = f"build took longer than {timeout_s:.0f} s: stopped", True
                else:
                    continue
                if ended:
                    outcomes[child.pending.pop(0)] = (None, ended)
                selector.unregister(child.fd)
                os.close(child.fd)
                _reap(child.pid, kill=killed)
                children.remove(child)
                if child.pending:  # a new child carries on with the rest of this share
                    successor = _spawn(items, child.pending, build, timeout_s)
                    selector.register(successor.fd, selectors.EVENT_READ, successor)
                    children.append(successor)
    return [outcomes[i] for i in range(len(items))]
