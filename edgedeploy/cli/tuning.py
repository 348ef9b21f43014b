"""`deploy tuning`: the lab's tuning database (pipeline.tuning_share): list its targets, export one to a file,
import a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgedeploy.cli.common import exit_with_error, stdout
from edgedeploy.errors import EdgeDeployError

tuning_app = typer.Typer(help="The lab's tuning database: every host's MetaSchedule records, by target.",
                         no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")]


@tuning_app.command("list")
def list_command(as_json: JsonFlag = False) -> None:
    """The targets the lab has tuning records for, and how many."""
    from pipeline.results.store import ResultStore

    try:
        targets = ResultStore().tuning_targets()
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps([{"target_key": key, "target": target, "records": n} for key, target, n in targets]))
        return
    if not targets:
        stdout.print("no tuning records yet: `deploy tune MODEL --profile P --minutes M` adds some")
    for key, target, n in targets:
        stdout.print(f"{key[:12]}  {n:6d} records  {json.dumps(target, sort_keys=True)}")


@tuning_app.command("export")
def export_command(
    file: Annotated[Path, typer.Argument(help="The file to write (JSON lines).")],
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file: whose target's records.")] = "local",
    as_json: JsonFlag = False,
) -> None:
    """Write the lab's records for a profile's target to FILE, for another lab or an offline host."""
    from pipeline.tuning_share import export_records, profile_target
    from targets.profiles import load_profile

    try:
        target = profile_target(load_profile(profile))
        count = export_records(target, file)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps({"file": str(file), "target": target, "records": count}))
        return
    stdout.print(f"[green]exported[/] {count} records for {json.dumps(target, sort_keys=True)} to {file}")


@tuning_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="A file written by `deploy tuning export`.")],
    as_json: JsonFlag = False,
) -> None:
    """Add FILE's records to the lab's tuning database (those it has already are skipped)."""
    from pipeline.tuning_share import import_records

    try:
        target, count, added = import_records(file)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps({"file": str(file), "target": target, "records": count, "added": added}))
        return
    stdout.print(f"[green]imported[/] {added} new of {count} records for {json.dumps(target, sort_keys=True)}")
