"""Tuning's builds in forked children: a candidate that hangs the compiler, or crashes it, is one failed trial;
the others still build."""

from __future__ import annotations

import os
import time

from pipeline.compiler.tuning.forked_builds import _Child, build_all


def _build(item: str) -> str:
    if item == "hang":
        time.sleep(60)
    if item == "crash":
        os._exit(3)
    if item == "slow":
        time.sleep(3)
    if item == "error":
        raise ValueError("no schedule for this")
    return f"/built/{item}.so"


def test_hung_crashed_and_failed_builds_fail_alone():
    started = time.monotonic()
    outcomes = build_all(["a", "hang", "b", "crash", "error", "c"], _build, timeout_s=1.0)
    assert outcomes[0] == ("/built/a.so", None) and outcomes[2] == ("/built/b.so", None)
    assert outcomes[5] == ("/built/c.so", None)
    assert outcomes[1][0] is None and "longer than 1 s" in outcomes[1][1]
    assert outcomes[3] == (None, "the build crashed its process")
    assert outcomes[4][0] is None and "ValueError: no schedule for this" in outcomes[4][1]
    assert time.monotonic() - started < 20  # the hung build was stopped, not waited for


def test_builds_run_in_a_child_not_here():
    assert build_all(["x"], lambda _: str(os.getpid()), timeout_s=10)[0][0] != str(os.getpid())


def test_empty_batch():
    assert build_all([], _build, timeout_s=1) == []


def test_builds_share_the_work_between_children():
    outcomes = build_all(list("abcdef"), lambda _: str(os.getpid()), timeout_s=10, workers=2)
    assert len({path for path, _ in outcomes}) == 2 and all(error is None for _, error in outcomes)
    assert outcomes[0][0] == outcomes[2][0] == outcomes[4][0] != outcomes[1][0]


def test_a_hung_build_stops_only_its_own_child():
    started = time.monotonic()
    outcomes = build_all(["hang", "a", "crash", "b", "c", "d"], _build, timeout_s=1.0, workers=2)
    assert outcomes[0][0] is None and "longer than 1 s" in outcomes[0][1]
    assert outcomes[2] == (None, "the build crashed its process")
    assert [path for path, _ in outcomes[1::2]] == ["/built/a.so", "/built/b.so", "/built/d.so"]
    assert outcomes[4] == ("/built/c.so", None)
    assert time.monotonic() - started < 20


def test_quick_reports_then_a_slow_build():
    outcomes = build_all(["a", "b", "slow"], _build, timeout_s=1.5)
    assert outcomes[:2] == [("/built/a.so", None), ("/built/b.so", None)]
    assert outcomes[2][0] is None and "longer than 2 s" in outcomes[2][1]


def test_reports_that_arrive_in_one_read_are_all_taken():
    """Regression (found reading the code): a buffered reader could take two reports in one read, and select()
    then saw nothing; the second waited behind the next build and, if that one was slow, was charged with its
    timeout and lost. Whether two reports share a read is a race, so the pipe is filled here by hand."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b'[0, "/a.so", null]\n[1, null, "failed"]\n[2, "/c')
    child = _Child(pid=0, fd=read_fd, pending=[0, 1, 2], deadline=0.0)
    assert child.reports() == ['[0, "/a.so", null]', '[1, null, "failed"]']
    os.write(write_fd, b'.so", null]\n')
    os.close(write_fd)
    assert child.reports() == ['[2, "/c.so", null]']
    assert child.reports() is None
    os.close(read_fd)
