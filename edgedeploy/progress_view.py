"""Rich display of stage progress on stderr (stdout stays clean for --json)."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from pipeline import progress

STAGES = ("ingest", "check", "auto", "data", "quantize", "compile", "deploy", "benchmark", "report", "record")


class StageProgress:
    """Shows each stage as waiting / running / done / failed while the flow runs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.state: dict[str, tuple[str, str]] = {s: ("waiting", "") for s in STAGES}
        self._live = Live(self._render(), console=console, refresh_per_second=8, transient=False)
        self._unsubscribe = None

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for stage, (status, detail) in self.state.items():
            mark = {"waiting": "[dim]·[/]", "done": "[green]✓[/]", "failed": "[red]✗[/]"}.get(status)
            table.add_row(Spinner("dots") if status == "running" else mark, stage, f"[dim]{detail}[/]")
        return table

    def _on_event(self, stage: str, event: str, detail: str) -> None:
        if stage not in self.state:
            return
        self.state[stage] = ({"start": "running", "done": "done", "failed": "failed"}[event], detail)
        self._live.update(self._render())

    def __enter__(self) -> StageProgress:
        self._unsubscribe = progress.subscribe(self._on_event)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)
        self.console.print()
        if self._unsubscribe:
            self._unsubscribe()
