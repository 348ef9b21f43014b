"""A check's verdict and the report of all of them (pipeline.checks, pipeline.checks_x86): pass / warn / refuse, the
reason in a user's words, the hardware or compiler fact it rests on, the fix."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from pipeline.quantize import QuantConfig
from targets.profiles import RuntimeName

Verdict = Literal["pass", "warn", "refuse"]
Runtime = RuntimeName


class CheckResult(BaseModel):
    """One check's verdict."""

    model_config = ConfigDict(frozen=True)
    check: str
    verdict: Verdict
    reason: str = Field(description="What this means for the user's request.")
    fact: str = Field(default="", description="The hardware or compiler fact the verdict rests on.")
    fix: str | None = None
    nodes: list[str] = Field(default_factory=list, description="Offending nodes as 'name (op)'.")
    blocks: Literal["build", "run"] = Field(
        default="build", description="build: refusal stops compiling too; run: only running on the device."
    )


class CheckReport(BaseModel):
    """All checks for one (model, profile, scheme, runtime)."""

    model_config = ConfigDict(frozen=True)
    profile: str
    scheme: str
    runtime: Runtime
    results: list[CheckResult]
    quant: QuantConfig = Field(description="The configuration to use, after the checks' adjustments.")

    @property
    def refused(self) -> list[CheckResult]:
        return [r for r in self.results if r.verdict == "refuse"]

    def refused_for(self, purpose: Literal["build", "run"]) -> list[CheckResult]:
        """Refusals that stop this purpose: a run needs every check, a build only the build checks."""
        return [r for r in self.refused if purpose == "run" or r.blocks == "build"]

    def refusal_message(self, purpose: Literal["build", "run"]) -> str:
        count = len(self.refused_for(purpose))
        lines = [f"{count} check(s) refused {self.scheme} on {self.profile} via {self.runtime}:"]
        for r in self.refused_for(purpose):
            lines.append(f"  - {r.check}: {r.reason}")
            if r.nodes:
                lines.append(f"    nodes: {', '.join(r.nodes)}")
            if r.fact:
                lines.append(f"    fact: {r.fact}")
            if r.fix:
                lines.append(f"    fix: {r.fix}")
        return "\n".join(lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"checks: {self.scheme} on {self.profile} via {self.runtime}", title_justify="left")
        table.add_column("check")
        table.add_column("verdict")
        table.add_column("reason")
        colour = {"pass": "green", "warn": "yellow", "refuse": "bold red"}
        for r in self.results:
            text = r.reason + (f"\n[dim]fact: {r.fact}[/]" if r.fact else "") + (f"\n[cyan]fix: {r.fix}[/]" if r.fix
                                                                                   else "")
            table.add_row(r.check, f"[{colour[r.verdict]}]{r.verdict}[/]", text)
        yield table
