"""The `deploy` command: parses options, starts the flow, prints. No pipeline logic lives here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import typer
from rich.console import Console

from edgedeploy.errors import CheckRefused, EdgeDeployError, OptionError

app = typer.Typer(help="Get a trained ONNX model onto edge hardware and prove how fast and how accurate it is there.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
profiles_app = typer.Typer(help="Device profiles (device_profiles/*.yaml).", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
lab_app = typer.Typer(help="The device lab: a matrix of models x devices x schemes, now or every night.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")

EXIT_REGRESSION = 5

stdout = Console()
stderr = Console(stderr=True)


def exit_with_error(error: EdgeDeployError, *, as_json: bool) -> NoReturn:
    if as_json:
        print(json.dumps({"ok": False, **error.to_dict()}))
    stderr.print(f"[bold red]error:[/] {error.render()}", highlight=False)
    raise typer.Exit(error.exit_code)


def _quiet_prefect() -> None:
    # Prefect's own INFO chatter and tracebacks of user errors would bury the one clear message.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _bundled_model(model: Path) -> Path:
    """A reference workload's name stands for its bundled model (when no such file exists)."""
    if model.exists():
        return model
    from pipeline.workloads import WORKLOADS

    workload = WORKLOADS.get(str(model))
    return workload.model_path() if workload else model


# Options `run` and `compile` share.
# targets.profiles.RuntimeName, spelled out: the CLI imports nothing heavy before a command runs (tests keep them equal)
RuntimeName = Literal["tvm", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"]
RuntimeOption = Annotated[RuntimeName | None,
                          typer.Option(help="What runs the model on the device (default: the profile's preferred "
                                            "runtime; `deploy profiles list` marks it with *).")]
AccuracyBudget = Annotated[float, typer.Option(min=0, help="auto and --partial: allowed drop of the metric, "
                                                          "in points.")]
Partial = Annotated[bool, typer.Option("--partial", help="int8: keep the most sensitive layers in float until the "
                                                         "accuracy budget is met.")]
Percentile = Annotated[float, typer.Option(min=50.0, max=100.0, help="--calibration percentile: the share of each "
                                                                     "tensor's values its range keeps.")]
Activations = Annotated[Literal["uint8", "int8"], typer.Option(help="int8: the activations' type (uint8 asymmetric "
                                                                   "by default; TensorRT wants int8 symmetric).")]
SymmetricActivations = Annotated[bool, typer.Option("--symmetric-activations", help="int8: activation zero points "
                                                                                     "0.")]
InputShape = Annotated[list[str] | None, typer.Option(help="NAME=1,3,224,224 (repeatable).")]
Batch = Annotated[int | None, typer.Option(min=1, help="Samples per inference, for a model whose batch dimension is "
                                                       "dynamic (default: the model's own, else 1); data rows are "
                                                       "samples.")]
TuneTrials = Annotated[int, typer.Option(min=0, help="MetaSchedule trials per task for the TVM build (0 = none; a "
                                                     "board is timed over SSH).")]
TuneMinutes = Annotated[float | None, typer.Option(min=0.1, help="Stop tuning after this many minutes (the database "
                                                                "keeps every trial); without --tune-trials, the "
                                                                "clock alone ends the run.")]


def _build_config(model: Path, profile: str, quant: str | None, calibration: str, per_channel: bool,
                  calib_data: Path | None, calib_samples: int, input_shape: list[str] | None, tune_trials: int = 0,
                  tune_minutes: float | None = None, quant_options: dict | None = None, **options):
    """The RunConfig every command builds from its options; `options` are RunConfig's other fields."""
    from pipeline.config import RunConfig
    from pipeline.ingest import parse_input_shapes
    from pipeline.quantize import QuantConfig

    if quant is None:  # the profile's own choice where the runtime's unit computes it (a Jetson's GPU: fp16)
        from targets.profiles import load_profile

        device = load_profile(profile)
        quant = device.default_scheme(options.get("runtime") or device.preferred_runtime)
    if options.get("partial") and quant != "int8":
        raise OptionError("--partial keeps some layers of an int8 model in float", value=f"--quant {quant}",
                          fix="use --quant int8 --partial (--quant auto tries partial int8 by itself)")

    return RunConfig(
        model_path=str(_bundled_model(model)), profile=profile,
        quant=QuantConfig(scheme="fp32" if quant == "auto" else quant, calibration=calibration,
                          per_channel=per_channel, **(quant_options or {})),
        auto=quant == "auto", calib_data=str(calib_data) if calib_data else None, calib_samples=calib_samples,
        input_shapes=parse_input_shapes(input_shape or []), tune_trials=tune_trials, tune_minutes=tune_minutes,
        **options,
    )


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="The .onnx model to deploy, or a bundled workload's name "
                                                "(digits-cnn, pp-lcnet-orientation, yolox-glyph-detector).")],
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")] = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic", "auto"] | None,
                     typer.Option(help="Numeric format to deploy (default: the profile's, fp32 or a Jetson's fp16); "
                                       "dynamic = onnxruntime's dynamic int8 (with --runtime onnxruntime; no "
                                       "calibration); auto = measure every allowed scheme x runtime on the device and "
                                       "ship the fastest within --accuracy-budget.")] = None,
    calibration: Annotated[Literal["minmax", "entropy", "percentile", "mse"],
                           typer.Option(help="int8 range calibration method.")] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales.")] = True,
    percentile: Percentile = 99.999,
    activations: Activations = "uint8",
    symmetric_activations: SymmetricActivations = False,
    calib_data: Annotated[Path | None, typer.Option(help=".npz of inputs or a folder of images.")] = None,
    eval_data: Annotated[Path | None, typer.Option(help=".npz of inputs (+labels) or a folder of images.")] = None,
    accuracy_budget: AccuracyBudget = 1.0,
    partial: Partial = False,
    runtime: RuntimeOption = None,
    tune_trials: TuneTrials = 0,
    tune_minutes: TuneMinutes = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Calibration samples to use.")] = 100,
    eval_samples: Annotated[int | None, typer.Option(min=1, help="Cap on evaluation samples.")] = None,
    input_shape: InputShape = None,
    batch: Batch = None,
    min_iterations: Annotated[int, typer.Option(min=1, help="Minimum timed iterations per runtime.")] = 20,
    min_seconds: Annotated[float, typer.Option(min=0, help="Minimum timed seconds per runtime.")] = 2.0,
    max_seconds: Annotated[float, typer.Option(min=1, help="Time limit per runtime on the device.")] = 600.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up iterations (not counted).")] = 2,
    rounds: Annotated[int, typer.Option(min=1, help="Turns the artifact and the baseline take on the device, "
                                        "sharing the minimums (a drifting device slows both alike).")] = 3,
    max_model_mb: Annotated[int, typer.Option(min=1, help="Refuse model files larger than this.")] = 2048,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Ingest, quantize, compile, deploy and benchmark MODEL on a device, next to onnxruntime fp32."""
    try:
        _quiet_prefect()
        from pipeline.benchmark import BenchmarkSettings

        config = _build_config(
            model, profile, quant, calibration, per_channel, calib_data, calib_samples, input_shape, tune_trials,
            tune_minutes, eval_data=str(eval_data) if eval_data else None, eval_samples=eval_samples,
            max_model_mb=max_model_mb, accuracy_budget=accuracy_budget / 100, partial=partial, runtime=runtime,
            batch=batch,
            quant_options={"percentile": percentile, "activation_type": activations,
                           "symmetric_activations": symmetric_activations},
            bench=BenchmarkSettings(warmup=warmup, min_iterations=min_iterations, min_seconds=min_seconds,
                                    max_seconds=max_seconds, rounds=rounds),
        ).with_run_id()
        from edgedeploy.progress_view import StageProgress
        from flows.console import hide_our_error_tracebacks
        from flows.run import deploy_run

        hide_our_error_tracebacks()

        with StageProgress(stderr):
            result = deploy_run(config)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps(result.model_dump(mode="json")))
    else:
        stdout.print(result)
    if not result.valid:
        raise typer.Exit(3)


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="The .onnx model, or a bundled workload's name.")],
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")] = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic"] | None,
                     typer.Option(help="Numeric format to check (default: the profile's).")] = None,
    runtime: RuntimeOption = None,
    input_shape: InputShape = None,
    batch: Batch = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Only the hardware and compiler checks: pass / warn / refuse, each with its reason. Exit 4 on a refusal."""
    import tempfile

    try:
        from pipeline.compile import check_report, ingest_model
        from targets.profiles import load_profile

        config = _build_config(model, profile, quant, "minmax", True, None, 1, input_shape, runtime=runtime,
                               batch=batch)
        device = load_profile(profile)
        with tempfile.TemporaryDirectory(prefix="edgedeploy-check-") as tmp:
            report = check_report(ingest_model(config, Path(tmp)), device, config)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps({**report.model_dump(mode="json"), "refused": bool(report.refused)}))
    else:
        stdout.print(report)
    if report.refused:
        raise typer.Exit(CheckRefused.exit_code)


@app.command("compile")
def compile_command(
    model: Annotated[Path, typer.Argument(help="The .onnx model, or a bundled workload's name.")],
    out: Annotated[Path, typer.Option(help="Directory for the library and its manifest.")],
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")] = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic"], typer.Option(help="Numeric format.")] = "fp32",
    calibration: Annotated[Literal["minmax", "entropy", "percentile", "mse"],
                           typer.Option(help="int8 range calibration method.")] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales.")] = True,
    percentile: Percentile = 99.999,
    activations: Activations = "uint8",
    symmetric_activations: SymmetricActivations = False,
    calib_data: Annotated[Path | None, typer.Option(help=".npz of inputs or a folder of images.")] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Calibration samples to use.")] = 100,
    input_shape: InputShape = None,
    batch: Batch = None,
    tune_trials: TuneTrials = 0,
    tune_minutes: TuneMinutes = None,
    partial: Partial = False,
    accuracy_budget: AccuracyBudget = 1.0,
    runtime: Annotated[RuntimeName,
                       typer.Option(help="tvm: a library for the profile's CPU or GPU (runtimes.tvm.unit); an "
                                         "onnxruntime one: the quantized .onnx and its manifest.")] = "tvm",
    as_json: Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")] = False,
) -> None:
    """Compile MODEL with TVM for a profile on this machine (cross-compiling where the device is another arch)."""
    try:
        from pipeline.compile import build
        from pipeline.session import tuning_board
        from targets.profiles import load_profile

        config = _build_config(model, profile, quant, calibration, per_channel, calib_data, calib_samples,
                               input_shape, tune_trials, tune_minutes, partial=partial,
                               accuracy_budget=accuracy_budget / 100, runtime=runtime, batch=batch,
                               quant_options={"percentile": percentile, "activation_type": activations,
                                              "symmetric_activations": symmetric_activations})
        with stderr.status(f"compiling for {profile} ..."):
            result = build(config, load_profile(profile), out, tuning_board=tuning_board)
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    art = result.artifact
    summary = {"library": art.library_path, "manifest": art.manifest_path, "sha256": art.sha256,
               "target": art.target, "gpu_target": art.gpu_target, "device_code": art.device_code,
               "scheme": result.quantized.config.label(), "compile_seconds": round(art.compile_seconds, 3),
               "tuning": art.tuning, "kept_float": list(result.quantized.config.keep_float),
               "checks": [c.model_dump(mode="json") for c in result.checks.results]}
    if as_json:
        print(json.dumps(summary))
        return
    stdout.print(result.checks)
    stdout.print(f"[green]compiled[/] {summary['scheme']} for [bold]{profile}[/] in {art.compile_seconds:.1f} s: "
                 f"{art.library_path} ({art.device_code})\nmanifest: {art.manifest_path}")


@app.command()
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
        _quiet_prefect()
        from flows.console import hide_our_error_tracebacks
        from flows.lab import run_lab
        from pipeline.lab import jobs, load_lab

        jobs(load_lab(lab))  # a bad lab file or profile fails here, before Prefect starts
        hide_our_error_tracebacks()
        with stderr.status(f"lab {lab.name}: running ..."):
            summary = run_lab(str(lab.resolve()))
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
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
        _quiet_prefect()
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


@app.command()
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
        _quiet_prefect()
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
    stdout.print(f"[green]wrote[/] {path}")


@app.command()
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
