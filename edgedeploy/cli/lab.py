"""The lab's commands: doctor, lab run / schedule, bench, dashboard, profiles list / show."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from edgedeploy.cli.common import (
    EXIT_REGRESSION,
    TuneMinutes,
    exit_with_error,
    prefect_did_not_start,
    quiet_prefect,
    stderr,
    stdout,
)
from edgedeploy.errors import EdgeDeployError, OptionError

profiles_app = typer.Typer(help="Device profiles (device_profiles/*.yaml).", no_args_is_help=True)
lab_app = typer.Typer(help="The device lab: a matrix of models x devices x schemes, now or every night.",
                      no_args_is_help=True)


def doctor(
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")] = "local",
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Is the device reachable and ready: host key, architecture, Python, runtimes, free disk."""
    from rich.table import Table

    from pipeline.doctor import doctor as run_doctor
    from targets.profiles import load_profile

    try:
        rows = run_doctor(load_profile(profile))
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    healthy = all(r.ok for r in rows)
    if as_json:
        print(json.dumps({"profile": profile, "ok": healthy, "checks": [r.model_dump() for r in rows]}))
    else:
        table = Table(title=f"doctor: {profile}", title_justify="left")
        for column in ("check", "", "detail"):
            table.add_column(column)
        for r in rows:
            table.add_row(r.check, "[green]ok[/]" if r.ok else "[bold red]FAIL[/]", r.detail)
        stdout.print(table)
    if not healthy:
        raise typer.Exit(1)


@lab_app.command("run")
def lab_run_command(
    lab: Annotated[Path, typer.Argument(help="The lab file (YAML).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Run the lab's matrix now. Exit 5 when a regression is found, 1 when a job failed."""
    from rich.table import Table

    try:
        quiet_prefect()
        from flows.console import hide_our_error_tracebacks
        from flows.lab import run_lab
        from pipeline.lab import jobs, load_lab

        jobs(load_lab(lab))  # a bad lab file or profile fails here, before Prefect starts
        hide_our_error_tracebacks()
        with stderr.status(f"lab {lab.name}: running ..."):
            summary = run_lab(str(lab.resolve()))
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    except RuntimeError as error:
        exit_with_error(prefect_did_not_start(error), as_json=as_json)
    if as_json:
        print(json.dumps(summary.model_dump(mode="json")))
    else:
        table = Table(title=f"lab {summary.lab}", title_justify="left")
        for column in ("device", "model", "scheme", "p50 ms", "speed-up", "accuracy", "status"):
            table.add_column(column)
        for o in summary.outcomes:
            status = ("[bold red]REGRESSION[/] " + "; ".join(o.regression_reasons) if o.regression
                      else f"[red]failed:[/] {o.error.splitlines()[0]}" if o.error
                      else "[green]ok[/]" if o.valid else "[yellow]invalid[/]")
            table.add_row(o.device, o.model, o.scheme, "" if o.p50_ms is None else f"{o.p50_ms:.3f}",
                          "" if o.speedup is None else f"{o.speedup:.2f}x",
                          "" if o.accuracy is None else f"{o.accuracy * 100:.2f} %", status)
        stdout.print(table)
    if summary.regressions:
        raise typer.Exit(EXIT_REGRESSION)
    if summary.failures:
        raise typer.Exit(1)


@lab_app.command("schedule")
def lab_schedule_command(
    lab: Annotated[Path, typer.Argument(help="The lab file (YAML).")],
    cron: Annotated[str, typer.Option(help='When to run, as cron (e.g. "0 2 * * *").')],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron expression.")] = "UTC",
    pool: Annotated[str, typer.Option(help="Prefect work pool whose workers run the lab.")] = "edgedeploy-lab",
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the lab's name).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Create a Prefect deployment that runs the lab on a schedule (needs PREFECT_API_URL: a server)."""
    try:
        quiet_prefect()
        if not os.environ.get("PREFECT_API_URL"):
            raise OptionError("Scheduling needs a Prefect server that outlives this command",
                              fix="prefect server start, then export PREFECT_API_URL=http://127.0.0.1:4200/api")
        from flows.lab import schedule_lab

        scheduled = schedule_lab(lab, cron=cron, timezone=timezone, work_pool=pool, name=name)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(scheduled.model_dump_json())
    else:
        stdout.print(f"[green]scheduled[/] {scheduled.deployment} ({scheduled.cron}, {scheduled.timezone}) "
                     f"on work pool {scheduled.work_pool}\nstart a worker on each lab host: "
                     f"[bold]{scheduled.worker_command}[/]")


def bench(
    workloads: Annotated[list[str] | None, typer.Argument(help="Reference workloads (default: all three).")] = None,
    out: Annotated[Path, typer.Option(help="Where bench.md and the plots go.")] = Path("docs"),
    eval_samples: Annotated[int | None, typer.Option(min=1, help="Cap on evaluation samples per workload.")] = None,
    min_iterations: Annotated[int, typer.Option(min=1, help="Minimum timed iterations per candidate.")] = 20,
    min_seconds: Annotated[float, typer.Option(min=0, help="Minimum timed seconds per candidate.")] = 2.0,
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file (e.g. a lab device).")] = "local",
    tune_trials: Annotated[int, typer.Option(min=0, help="MetaSchedule trials per task for the TVM candidates "
                                                         "(0 = TVM's default schedules).")] = 0,
    tune_minutes: TuneMinutes = None,
) -> None:
    """Every reference workload through onnxruntime and TVM in every scheme, side by side: docs/bench.md."""
    try:
        quiet_prefect()
        from flows.console import hide_our_error_tracebacks
        from flows.run import deploy_run
        from pipeline.bench_page import write
        from pipeline.benchmark import BenchmarkSettings
        from pipeline.config import RunConfig
        from pipeline.workloads import WORKLOADS

        hide_our_error_tracebacks()
        names = workloads or list(WORKLOADS)
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            raise OptionError("Unknown workload", value=", ".join(unknown), expected=", ".join(WORKLOADS))
        results = []
        for name in names:
            with stderr.status(f"bench: {name} ..."):
                results.append(deploy_run(RunConfig(
                    model_path=str(WORKLOADS[name].model_path()), auto=True, eval_samples=eval_samples,
                    profile=profile, tune_trials=tune_trials, tune_minutes=tune_minutes,
                    bench=BenchmarkSettings(min_iterations=min_iterations, min_seconds=min_seconds))))
        path = write(results, out)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=False)
    except RuntimeError as error:
        exit_with_error(prefect_did_not_start(error), as_json=False)
    stdout.print(f"[green]wrote[/] {path}")


def dashboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1 = this machine only).")] = "127.0.0.1",
    db_url: Annotated[str | None, typer.Option(help="Results database (default $EDGEDEPLOY_DB_URL or SQLite).")] = None,
) -> None:
    """Serve the device-lab dashboard: devices x models, trends, distributions, regressions (works offline)."""
    from pipeline.results.dashboard import make_server
    from pipeline.results.store import ResultStore

    try:
        store = ResultStore(db_url)
        server = make_server(store, host=host, port=port)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=False)
    except OSError as exc:
        exit_with_error(OptionError(f"Cannot serve on {host}:{port}", value=exc.strerror,
                                    fix="choose another --port"), as_json=False)
    stderr.print(f"dashboard on [bold]http://{host}:{server.server_port}/[/] ({store.engine_url_safe()}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@profiles_app.command("list")
def profiles_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the bundled device profiles."""
    from rich.table import Table

    from targets.profiles import RUNTIME_NAMES, available_profiles, load_profile

    try:
        profiles = [load_profile(name) for name in available_profiles()]
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps([p.model_dump(mode="json", by_alias=True) for p in profiles]))
        return
    table = Table(title="device profiles", title_justify="left")
    for column in ("name", "cpu", "gpu", "runtimes (unit)", "memory", "python", "transport"):
        table.add_column(column)
    for p in profiles:
        gpu = f"{p.gpu.sm}: {', '.join(p.gpu.precisions)}" if p.gpu else ""
        runtimes = [f"{'*' if name == p.preferred_runtime else ''}{name} ({p.unit_of(name).upper()})"
                    for name in RUNTIME_NAMES if p.has_runtime(name)]
        table.add_row(p.name, f"{p.cpu.arch} {p.cpu.mcpu or '(host)'}: {', '.join(p.cpu.precisions)}"
                      f"{', int8 dot' if p.cpu.int8_dot_product else ''}", gpu, "\n".join(runtimes),
                      f"{p.memory_mb} MB", p.python_version, p.connection.transport)
    stdout.print(table)


@profiles_app.command("show")
def profiles_show(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one profile, resolved (extends applied, local detection done)."""
    from targets.profiles import load_profile

    try:
        prof = load_profile(name)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(prof.model_dump_json(indent=2, by_alias=True))
    else:
        import yaml
        from rich.syntax import Syntax

        stdout.print(Syntax(yaml.safe_dump(prof.model_dump(mode="json", by_alias=True), sort_keys=False), "yaml"))
