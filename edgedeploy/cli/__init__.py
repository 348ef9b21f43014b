"""The `deploy` command: parses options, starts the flow, prints. No pipeline logic lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from edgedeploy.cli.common import TuneMinutes, exit_with_error, prefect_did_not_start, quiet_prefect, stderr, stdout
from edgedeploy.cli.lab import bench, dashboard, doctor, lab_app, lab_schedule_command, profiles_app
from edgedeploy.cli.tuning import tuning_app
from edgedeploy.errors import CheckRefused, EdgeDeployError, OptionError

app = typer.Typer(help="Get a trained ONNX model onto edge hardware and prove how fast and how accurate it is there.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

__all__ = ["app", "lab_schedule_command"]


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
Calibration = Annotated[Literal["minmax", "entropy", "percentile", "mse"],
                        typer.Option(help="int8 range calibration method.")]
PerChannel = Annotated[bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales.")]
CalibData = Annotated[Path | None, typer.Option(help=".npz of inputs or a folder of images.")]
CalibSamples = Annotated[int, typer.Option(min=1, help="Calibration samples to use.")]
Reference = Annotated[Path | None, typer.Option(help="The fp32 model to measure accuracy against, for a model that "
                                                     "came int8 (QDQ): the same inputs and outputs.")]
ProfileOption = Annotated[str, typer.Option(help="Device profile name or YAML file.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print only one JSON object on stdout.")]
InputShape = Annotated[list[str] | None, typer.Option(help="NAME=1,3,224,224 (repeatable).")]
Batch = Annotated[int | None, typer.Option(min=1, help="Samples per inference, for a model whose batch dimension is "
                                                       "dynamic (default: the model's own, else 1); data rows are "
                                                       "samples.")]
TuneTrials = Annotated[int, typer.Option(min=0, help="MetaSchedule trials per task for the TVM build (0 = none; a "
                                                     "board is timed over SSH).")]


def _quant_options(percentile: float, activations: str, symmetric_activations: bool) -> dict:
    return {"percentile": percentile, "activation_type": activations, "symmetric_activations": symmetric_activations}


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
    profile: ProfileOption = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic", "auto"] | None,
                     typer.Option(help="Numeric format to deploy (default: the profile's, fp32 or a Jetson's fp16); "
                                       "dynamic = onnxruntime's dynamic int8 (with --runtime onnxruntime; no "
                                       "calibration); auto = measure every allowed scheme x runtime on the device and "
                                       "ship the fastest within --accuracy-budget.")] = None,
    calibration: Calibration = "minmax",
    per_channel: PerChannel = True,
    percentile: Percentile = 99.999,
    activations: Activations = "uint8",
    symmetric_activations: SymmetricActivations = False,
    calib_data: CalibData = None,
    eval_data: Annotated[Path | None, typer.Option(help=".npz of inputs (+labels), a folder of images, or COCO "
                                                        "instances (.json, with --decode).")] = None,
    reference: Reference = None,
    decode: Annotated[Literal["yolov5", "yolov8", "yolox"] | None,
                      typer.Option(help="How a detector's outputs read, for COCO annotations (--eval-data "
                                        "instances.json): mAP@0.5:0.95 and mAP@0.5 by pycocotools.")] = None,
    images: Annotated[Path | None, typer.Option(help="The COCO annotations' images (default: beside the "
                                                     ".json, or images/ there).")] = None,
    accuracy_budget: AccuracyBudget = 1.0,
    partial: Partial = False,
    runtime: RuntimeOption = None,
    tune_trials: TuneTrials = 0,
    tune_minutes: TuneMinutes = None,
    calib_samples: CalibSamples = 100,
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
    as_json: JsonFlag = False,
) -> None:
    """Ingest, quantize, compile, deploy and benchmark MODEL on a device, next to onnxruntime fp32."""
    try:
        quiet_prefect()
        from pipeline.benchmark import BenchmarkSettings

        config = _build_config(
            model, profile, quant, calibration, per_channel, calib_data, calib_samples, input_shape, tune_trials,
            tune_minutes, eval_data=str(eval_data) if eval_data else None, eval_samples=eval_samples,
            max_model_mb=max_model_mb, accuracy_budget=accuracy_budget / 100, partial=partial, runtime=runtime,
            batch=batch, reference=str(reference) if reference else None, decode=decode,
            images=str(images) if images else None,
            quant_options=_quant_options(percentile, activations, symmetric_activations),
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
    except RuntimeError as error:
        exit_with_error(prefect_did_not_start(error), as_json=as_json)
    if as_json:
        print(json.dumps(result.model_dump(mode="json")))
    else:
        stdout.print(result)
    if not result.valid:
        raise typer.Exit(3)


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="The .onnx model, or a bundled workload's name.")],
    profile: ProfileOption = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic"] | None,
                     typer.Option(help="Numeric format to check (default: the profile's).")] = None,
    runtime: RuntimeOption = None,
    input_shape: InputShape = None,
    batch: Batch = None,
    as_json: JsonFlag = False,
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
    profile: ProfileOption = "local",
    quant: Annotated[Literal["fp32", "fp16", "int8", "dynamic"], typer.Option(help="Numeric format.")] = "fp32",
    calibration: Calibration = "minmax",
    per_channel: PerChannel = True,
    percentile: Percentile = 99.999,
    activations: Activations = "uint8",
    symmetric_activations: SymmetricActivations = False,
    calib_data: CalibData = None,
    calib_samples: CalibSamples = 100,
    input_shape: InputShape = None,
    batch: Batch = None,
    tune_trials: TuneTrials = 0,
    tune_minutes: TuneMinutes = None,
    partial: Partial = False,
    accuracy_budget: AccuracyBudget = 1.0,
    runtime: Annotated[RuntimeName,
                       typer.Option(help="tvm: a library for the profile's CPU or GPU (runtimes.tvm.unit); an "
                                         "onnxruntime one: the quantized .onnx and its manifest.")] = "tvm",
    as_json: JsonFlag = False,
) -> None:
    """Compile MODEL with TVM for a profile on this machine (cross-compiling where the device is another arch)."""
    try:
        from pipeline.compile import build
        from pipeline.session import tuning_board
        from targets.profiles import load_profile

        config = _build_config(model, profile, quant, calibration, per_channel, calib_data, calib_samples,
                               input_shape, tune_trials, tune_minutes, partial=partial,
                               accuracy_budget=accuracy_budget / 100, runtime=runtime, batch=batch,
                               quant_options=_quant_options(percentile, activations, symmetric_activations))
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
def inspect(
    model: Annotated[Path, typer.Argument(help="The .onnx model (fp32, or int8 QDQ as it came), or a bundled "
                                                "workload's name.")],
    quant: Annotated[Literal["int8"], typer.Option(help="The scheme whose error is measured: static int8 (QDQ); a "
                                                        "model that came int8 is measured as it is.")] = "int8",
    calibration: Calibration = "minmax",
    per_channel: PerChannel = True,
    percentile: Percentile = 99.999,
    activations: Activations = "uint8",
    symmetric_activations: SymmetricActivations = False,
    calib_data: CalibData = None,
    calib_samples: CalibSamples = 100,
    reference: Reference = None,
    input_shape: InputShape = None,
    batch: Batch = None,
    top: Annotated[int, typer.Option(min=1, help="Rows to print, worst first (--json gives all).")] = 15,
    as_json: JsonFlag = False,
) -> None:
    """Per-layer int8 error: every tensor int8 quantizes, its SQNR against fp32 on the calibration data, worst first."""
    import tempfile

    try:
        from pipeline.compile import inspect_quantization

        config = _build_config(model, "local", quant, calibration, per_channel, calib_data, calib_samples,
                               input_shape, batch=batch, reference=str(reference) if reference else None,
                               quant_options=_quant_options(percentile, activations, symmetric_activations))
        with tempfile.TemporaryDirectory(prefix="edgedeploy-inspect-") as tmp, stderr.status("quantizing ..."):
            info, quantized, report = inspect_quantization(config, Path(tmp))
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    scheme = quantized.config.label()
    if as_json:
        print(json.dumps({"model": info.source_path, "scheme": scheme, **report.model_dump(mode="json")}))
        return
    stdout.print(f"[bold]{Path(info.source_path).name}[/] as {scheme}, against "
                 f"{Path(info.reference_path).name if info.reference_path else 'its fp32 self'}")
    stdout.print(report.table(top))
    if len(report.tensors) > top:
        stdout.print(f"... and {len(report.tensors) - top} more (--top, or --json for all)")


@app.command()
def tune(
    model: Annotated[Path, typer.Argument(help="The .onnx model, or a bundled workload's name.")],
    minutes: Annotated[float, typer.Option(min=0.1, help="How long to tune (the database keeps every trial).")],
    profile: ProfileOption = "local",
    quant: Annotated[Literal["fp32", "int8"], typer.Option(help="The scheme whose kernels are tuned.")] = "int8",
    calib_data: CalibData = None,
    calib_samples: CalibSamples = 100,
    input_shape: InputShape = None,
    batch: Batch = None,
    as_json: JsonFlag = False,
) -> None:
    """Tune MODEL's TVM kernels for a profile ahead of time, into the lab's tuning database: every later build for
    that target, on any host, tuned or not, starts from the records."""
    import tempfile

    try:
        from pipeline.compile import build
        from pipeline.session import tuning_board
        from pipeline.tuning_share import lab_records
        from targets.profiles import load_profile

        config = _build_config(model, profile, quant, "minmax", True, calib_data, calib_samples, input_shape,
                               tune_minutes=minutes, batch=batch, runtime="tvm")
        device = load_profile(profile)
        with tempfile.TemporaryDirectory(prefix="edgedeploy-tune-") as tmp, \
                stderr.status(f"tuning for {profile}, {minutes:g} min ..."):
            result = build(config, device, Path(tmp), tuning_board=tuning_board)
        tuning = result.artifact.tuning or {}
        summary = {"profile": profile, "scheme": result.quantized.config.label(), "target": result.artifact.target,
                   "tasks": tuning.get("tasks"), "model_tasks": tuning.get("model_tasks"),
                   "trials_added": tuning.get("trials_added"),
                   "host_records": tuning.get("records"), "lab_records": lab_records(result.artifact.target),
                   "measured_on": tuning.get("measured_on"), "seconds": round(tuning.get("seconds", 0.0), 1),
                   "database": tuning.get("database")}
    except EdgeDeployError as error:
        exit_with_error(error, as_json=as_json)
    if as_json:
        print(json.dumps(summary))
        return
    stdout.print(f"[green]tuned[/] {summary['scheme']} for [bold]{profile}[/]: {summary['trials_added']} trials over "
                 f"{summary['tasks']} kernels in {summary['seconds']} s, timed on {summary['measured_on']}\n"
                 f"this host's database: {summary['host_records']} records; the lab's: "
                 + (f"{summary['lab_records']} for this target" if summary["lab_records"] is not None else
                    "not reachable (see the warning)"))


# The lab's commands (edgedeploy/cli/lab.py), after the model's own in --help.
app.command()(doctor)
app.command()(bench)
app.command()(dashboard)
app.add_typer(profiles_app, name="profiles")
app.add_typer(lab_app, name="lab")
app.add_typer(tuning_app, name="tuning")
