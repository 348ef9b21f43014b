"""What every `deploy` command shares: the consoles, the one-error exit, Prefect kept quiet."""

from __future__ import annotations

import json
import os
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from edgedeploy.errors import EdgeDeployError

EXIT_REGRESSION = 5

TuneMinutes = Annotated[float | None, typer.Option(min=0.1, help="Stop tuning after this many minutes (the database "
                                                                "keeps every trial; --quant auto: the whole "
                                                                "selection's budget); without --tune-trials, the "
                                                                "clock alone ends the run.")]

stdout = Console()
stderr = Console(stderr=True)


def exit_with_error(error: EdgeDeployError, *, as_json: bool) -> NoReturn:
    if as_json:
        print(json.dumps({"ok": False, **error.to_dict()}))
    stderr.print(f"[bold red]error:[/] {error.render()}", highlight=False)
    raise typer.Exit(error.exit_code)


def quiet_prefect() -> None:
    # Prefect's own INFO chatter and tracebacks of user errors would bury the one clear message.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
