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


def build_all(items: Sequence[Item], build: Callable[[Item], str], *, timeout_s: float) -> list[Outcome]:
    """``build(item)`` for every item, in forked children; an item past ``timeout_s`` (or that crashes its
    child) gets an error instead of a path."""
    outcomes: dict[int, Outcome] = {}
    pending = list(range(len(items)))
    while pending:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: build, report, and leave without running this process's exit handlers
            os.close(read_fd)
            try:
                _child(items, pending, build, write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        killed = False
        with os.fdopen(read_fd) as reports, selectors.DefaultSelector() as selector:
            selector.register(reports, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout_s
            while pending:
                if not selector.select(max(deadline - time.monotonic(), 0)):
                    outcomes[pending.pop(0)] = (None, f"build took longer than {timeout_s:.0f} s: stopped")
                    killed = True
                    break
                line = reports.readline()
                if not line:  # the child died mid-build (a crash in the compiler)
                    outcomes[pending.pop(0)] = (None, "the build crashed its process")
                    break
                index, path, error = json.loads(line)
                outcomes[index] = (path, error)
                pending.remove(index)
                deadline = time.monotonic() + timeout_s
        _reap(pid, kill=killed)
    return [outcomes[i] for i in range(len(items))]
