"""Tuning records as plain JSON, to share them beyond this host's MetaSchedule database directory.

A target's database (tuning.search.tuning_dir: MetaSchedule's JSONDatabase, two files of JSON lines) holds each
kernel it tuned as a workload (the kernel's TIR) and its timed candidates as records (the schedule's trace, the
measured seconds, the target). :func:`read` turns the timed ones into plain dicts that need no TVM to store (the
lab's results database, pipeline.results.store; an export file), :func:`write` adds such dicts to a directory.
A record's ``key`` names the kernel and its schedule, so the same record read from two hosts is stored once.

MetaSchedule's JSONDatabase numbers each record's workload by its place in the process's own view of the file: two
processes appending workloads to one directory at once would point later records at the wrong kernels. So every
access takes a lock on the directory (:func:`locked`): a tuning run holds it exclusively for its whole run (another
tuning run of the same target on this host waits), :func:`write` takes it exclusively and skips when a tuning run
has it, readers share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORDS_FILE = "database_tuning_record.json"
# What MetaSchedule writes for a candidate that failed to build or run (its run_secs): never shared.
FAILED_SECONDS = 1e9


# A kernel's fastest few records are shared; the rest of its trials help only the host's own search.
SHARED_PER_KERNEL = 3


def record_key(workload_json: list, record_json: list) -> str:
    """sha256 of the kernel (its serialized TIR, not a hash TVM may compute differently elsewhere) and the candidate's
    trace: one key per (kernel, schedule)."""
    return hashlib.sha256(json.dumps([workload_json[1], record_json[0]], sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def locked(directory: Path, *, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold the directory's lock (yields False, holding nothing, when ``wait`` is off and someone else has it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _database(directory: Path):
    from tvm.s_tir import meta_schedule as ms

    directory.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=True)


def _mean_seconds(run_secs) -> float | None:
    seconds = [float(s) for s in run_secs or []]
    if not seconds or any(not math.isfinite(s) or s >= FAILED_SECONDS for s in seconds):
        return None
    return sum(seconds) / len(seconds)


def read(directory: Path, per_kernel: int | None = None) -> list[dict[str, Any]]:
    """The timed records of the database in ``directory`` (the ``per_kernel`` fastest of each kernel, or all): {key,
    workload, record, mean_s}; a schedule timed twice (random search can draw one candidate again) once, with its
    faster time."""
    if not (directory / RECORDS_FILE).exists():
        return []
    with locked(directory, exclusive=False):
        return _read(_database(directory), per_kernel)


def _read(database, per_kernel: int | None) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for record in database.get_all_tuning_records():
        mean = _mean_seconds(record.run_secs)
        if mean is None:
            continue
        workload_json, record_json = record.workload.as_json(), record.as_json()
        key = record_key(workload_json, record_json)
        if key not in out or mean < out[key]["mean_s"]:
            out[key] = {"key": key, "workload": workload_json, "record": record_json, "mean_s": mean}
    if per_kernel is None:
        return list(out.values())
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(out.values(), key=lambda e: e["mean_s"]):
        by_kernel.setdefault(entry["workload"][1], []).append(entry)
    return [entry for entries in by_kernel.values() for entry in entries[:per_kernel]]


def write(directory: Path, records: list[dict[str, Any]]) -> int:
    """Add the records (as :func:`read` gives them) that the database in ``directory`` lacks; how many were added.
    One TVM can't parse (another TVM's, a damaged one) is skipped, not the rest; nothing is added while a tuning run
    holds the directory (its records are newer anyway: the next build pulls again)."""
    from tvm.s_tir import meta_schedule as ms

    if not records:
        return 0
    with locked(directory, exclusive=True, wait=False) as mine:
        if not mine:
            return 0
        database = _database(directory)  # read once: what it has, then what it gets
        have = {r["key"] for r in _read(database, None)}
        new = [r for r in records if r["key"] not in have]
        return _commit(ms, database, new) if new else 0


def _commit(ms, database, new: list[dict[str, Any]]) -> int:
    added = 0
    for entry in new:
        try:
            workload = ms.database.Workload.from_json(entry["workload"])
            record = ms.database.TuningRecord.from_json(entry["record"], workload)
        except Exception:  # noqa: BLE001 - TVM raises whatever its JSON loaders raise
            continue
        database.commit_tuning_record(ms.database.TuningRecord(
            record.trace, database.commit_workload(workload.mod), record.run_secs, record.target, record.args_info))
        added += 1
    return added


def best_for(directory: Path):
    """A lookup ``kernel -> best tuning record or None`` over the database in ``directory`` (None: no database)."""
    if not (directory / RECORDS_FILE).exists():
        return None
    with locked(directory, exclusive=False, wait=False) as mine:
        if not mine:  # a tuning run is writing it: default schedules this time
            return None
        return lookup_in(_database(directory))


def lookup_in(database):
    """``kernel -> the best timed record`` the MetaSchedule ``database`` has for it, or None."""

    def lookup(kernel):
        if not database.has_workload(kernel):
            return None
        top = database.get_top_k(database.commit_workload(kernel), 1)
        return top[0] if top and _mean_seconds(top[0].run_secs) is not None else None

    return lookup


def digest(directory: Path) -> str | None:
    """sha256 of the database's records file (None: no records): an untuned build's cache key includes it, since
    such a build takes the best record of each kernel the database has."""
    path = directory / RECORDS_FILE
    if not path.exists() or not path.stat().st_size:
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()
