"""The lab's tuning database: every host's MetaSchedule records for a target, kept in the results database.

Each host tunes into its own database directory per target ($EDGEDEPLOY_HOME/tuning/<target>, tuning.search). Before
a TVM CPU build, :func:`pull` adds the records the lab's database ($EDGEDEPLOY_DB_URL: the lab's PostgreSQL; else
this host's SQLite) has for that target; after a tuned build, :func:`push` stores what this host measured. So a
night's trials on one host serve every other host: a tuned build starts from them, and an untuned build takes the
best record of every kernel the lab has tuned (compiler.build._cpu_build), whichever model it was tuned with.

A database that can't be opened costs the sharing, never the build: the host's own directory still works, and the
run says so in a warning. `deploy tuning export` / `import` move one target's records as a file (JSON lines: a header
naming the target, then one record a line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

from edgedeploy.errors import EdgeDeployError, OptionError
from pipeline.compiler.tuning import records
from pipeline.results.store import ResultStore
from pipeline.versions import tool_versions

log = logging.getLogger("edgedeploy.tuning")
FORMAT = "edgedeploy-tuning-records"
VERSION = 1


def target_key(target: dict[str, Any]) -> str:
    """Records are kept by target and by TVM's version: another TVM's traces may not apply."""
    tvm_version = tool_versions().get("apache-tvm")
    return hashlib.sha256(json.dumps({"target": target, "tvm": tvm_version}, sort_keys=True).encode()).hexdigest()


def _store(store: ResultStore | None) -> ResultStore | None:
    if store is not None:
        return store
    try:
        return ResultStore()
    except EdgeDeployError as error:
        log.warning("tuning records are not shared this time: %s (%s)", error.what, error.context.get("reason", ""))
        return None


def pull(directory: Path, target: dict[str, Any], store: ResultStore | None = None) -> int:
    """Add the lab's records for ``target`` to this host's database ``directory``; how many were new here."""
    store = _store(store)
    if store is None:
        return 0
    try:
        return records.write(directory, store.tuning_records(target_key(target)))
    except Exception as exc:  # noqa: BLE001 - a database gone mid-way: build from what this host has
        log.warning("tuning records not pulled from %s: %s", store.engine_url_safe(), str(exc).splitlines()[0][:200])
        return 0


def push(directory: Path, target: dict[str, Any], measured_on: str, store: ResultStore | None = None) -> int:
    """Store this host's timed records for ``target`` in the lab's database (each kernel's fastest few); how many it
    lacked."""
    store = _store(store)
    if store is None:
        return 0
    try:
        return store.add_tuning_records(target_key(target), target,
                                        records.read(directory, per_kernel=records.SHARED_PER_KERNEL),
                                        source=f"{socket.gethostname()} ({measured_on})")
    except EdgeDeployError as error:
        log.warning("tuning records not stored: %s (%s)", error.what, error.context.get("reason", ""))
    except Exception as exc:  # noqa: BLE001 - a damaged local database: the build itself succeeded
        log.warning("tuning records not stored: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc))
    return 0


def lab_records(target: dict[str, Any], store: ResultStore | None = None) -> int | None:
    """How many records the lab's database has for ``target`` (None: it can't be opened)."""
    store = _store(store)
    try:
        return None if store is None else len(store.tuning_records(target_key(target)))
    except EdgeDeployError:
        return None


def profile_target(profile) -> dict[str, Any]:
    """The TVM CPU target a profile builds for (the `local` profile's CPU detected): what records are kept by."""
    from pipeline.compiler.frontend import resolve_target

    if profile.tvm_gpu_target():
        raise OptionError(f"Profile {profile.name!r} builds TVM for its GPU: tuning records are kept for CPU targets",
                          value=profile.name, fix="use a profile whose TVM runs on the CPU")
    return resolve_target(profile)


def export_records(target: dict[str, Any], path: Path, store: ResultStore | None = None) -> int:
    """Write the lab's records for ``target`` to ``path``; how many."""
    entries = (store or ResultStore()).tuning_records(target_key(target))
    if not entries:
        raise OptionError("The lab's tuning database has no records for this target", value=json.dumps(target),
                          fix="tune first (`deploy tune MODEL --profile P --minutes M`), or check the profile")
    lines = [json.dumps({"format": FORMAT, "version": VERSION, "target": target})]
    lines += [json.dumps(entry) for entry in entries]
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise OptionError("Cannot write the tuning records file", value=str(path), reason=exc.strerror,
                          fix="check that its folder exists and is writable") from exc
    return len(entries)


def _bad_file(path: Path, line: int, why: str) -> OptionError:
    return OptionError(f"{path} is not an edgedeploy tuning records file", value=f"line {line}: {why}",
                       expected=f'a first line {{"format": "{FORMAT}", "version": {VERSION}, "target": {{...}}}}, '
                                "then one record a line", fix="use a file written by `deploy tuning export`")


def read_export(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(target, records) of an export file, every line checked before anything is stored."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError("Cannot read the tuning records file", value=str(path), fix="check the path") from exc
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise _bad_file(path, number, f"not JSON ({exc.msg})") from None
    if not entries or not isinstance(entries[0], dict) or entries[0].get("format") != FORMAT:
        raise _bad_file(path, 1, "no header")
    if entries[0].get("version") != VERSION or not isinstance(entries[0].get("target"), dict):
        raise _bad_file(path, 1, f"version {entries[0].get('version')!r}, target {entries[0].get('target')!r}")
    for number, entry in enumerate(entries[1:], 2):
        fields_ok = isinstance(entry, dict) and isinstance(entry.get("workload"), list) and \
            len(entry["workload"]) >= 2 and isinstance(entry.get("record"), list) and bool(entry["record"]) and \
            isinstance(entry.get("mean_s"), int | float)
        if not fields_ok or entry.get("key") != records.record_key(entry["workload"], entry["record"]):
            raise _bad_file(path, number, "not a record, or its key does not match its kernel and schedule")
    return entries[0]["target"], entries[1:]


def import_records(path: Path, store: ResultStore | None = None) -> tuple[dict[str, Any], int, int]:
    """Store an export file's records in the lab's database: (target, records in the file, new ones)."""
    target, entries = read_export(path)
    added = (store or ResultStore()).add_tuning_records(target_key(target), target, entries,
                                                        source=f"import of {path.name}")
    return target, len(entries), added
