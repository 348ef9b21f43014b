"""What every `deploy` command shares: the consoles, the one-error exit, Prefect kept quiet."""

from __future__ import annotations

import json
import os
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from edgedeploy.errors import EdgeDeployError, StageError

EXIT_REGRESSION = 5
PREFECT_STARTUP_WAIT_S = 120  # how long a command waits for Prefect's temporary server (see quiet_prefect)

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
    # Without PREFECT_API_URL every command starts Prefect's temporary server, whose first start creates and migrates
    # its SQLite database: 17-28 s on a 2-core VM, past Prefect's default wait of 20 s (a raw RuntimeError).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(PREFECT_STARTUP_WAIT_S))


def prefect_did_not_start(error: RuntimeError) -> EdgeDeployError:
    """Prefect's temporary server not starting, as one clear error (nothing ran yet); any other RuntimeError is a
    bug and is raised as it is."""
    if "Prefect API server" not in str(error):
        raise error
    return StageError(
        "Prefect's temporary server did not start: no stage ran", value=str(error).splitlines()[0][:300],
        fix="run the command again (the first start creates Prefect's database); on a slow machine raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default here {PREFECT_STARTUP_WAIT_S}), or start a "
            "server (prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
