"""Stage 5 of 8, compile: pipeline.compiler behind the content-addressed artifact cache; and ingest -> check ->
quantize -> compile without a device, what `deploy compile` runs.

`deploy run` runs the same stage functions, one Prefect task each (flows/tasks.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import onnx
from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import CheckRefused, OptionError
from pipeline import tuning_share
from pipeline.checks import run_checks
from pipeline.compiler.build import COMPILE_REVISION, compile_model
from pipeline.compiler.frontend import resolve_target
from pipeline.compiler.tuning import records
from pipeline.compiler.tuning.search import TuningBoard, tuning_dir
from pipeline.config import RunConfig, edgedeploy_home
from pipeline.data import PreparedData, prepare_data
from pipeline.ingest import ModelInfo, ingest
from pipeline.layer_error import LayerErrorReport, layer_errors
from pipeline.manifest import CompiledArtifact, package_onnx, profile_sha256
from pipeline.partial import plan_partial
from pipeline.quantize import QuantConfig, QuantizedModel, quantize
from pipeline.results.cache import ArtifactCache, arrays_sha256, cache_key
from pipeline.verdicts import CheckReport, Runtime
from pipeline.versions import tool_versions
from pipeline.workloads import workload_for
from pipeline.workloads.base import Samples
from targets.profiles import DeviceProfile


class BuildResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    info: ModelInfo
    checks: CheckReport
    quantized: QuantizedModel
    artifact: CompiledArtifact


def ingest_model(config: RunConfig, workdir: Path) -> ModelInfo:
    """Stage 1 for a run: the model, and the fp32 ``--reference`` beside it (the same inputs and outputs)."""
    limits = {"input_shapes": config.input_shapes, "batch": config.batch, "max_bytes": config.max_model_mb << 20}
    info = ingest(Path(config.model_path), workdir, **limits)
    if not config.reference:
        return info
    reference = ingest(Path(config.reference), workdir / "reference", **limits)
    for what, ours, theirs in (("inputs", info.inputs, reference.inputs), ("outputs", info.outputs, reference.outputs)):
        if [(s.name, s.shape) for s in ours] != [(s.name, s.shape) for s in theirs]:
            raise OptionError(f"--reference has other {what} than the model", value=config.reference,
                              expected=", ".join(f"{s.name} {list(s.shape)}" for s in ours),
                              fix="give the fp32 model the int8 one was made from (the same export)")
    return info.model_copy(update={"reference_path": reference.source_path,
                                   "reference_prepared_path": reference.prepared_path})


def check_report(info: ModelInfo, profile: DeviceProfile, config: RunConfig, *,
                 runtime: Runtime | None = None) -> CheckReport:
    """Every check's verdict (what `deploy check` prints), for ``runtime`` (default: the run's)."""
    # The model as the user gave it: its quantized format is what the checks judge.
    return run_checks(onnx.load(info.prepared_path), info, profile, config.quant,
                      runtime=runtime or config.runtime_on(profile))


def check_model(info: ModelInfo, profile: DeviceProfile, config: RunConfig, *, runtime: Runtime | None = None,
                purpose: Literal["build", "run"] = "run") -> CheckReport:
    """Run every check; raise CheckRefused when one that matters for ``purpose`` refuses."""
    report = check_report(info, profile, config, runtime=runtime)
    if report.refused_for(purpose):
        raise CheckRefused(report.refusal_message(purpose), profile=profile.name, scheme=report.scheme)
    return report


def prepare(config: RunConfig, info: ModelInfo, workdir: Path, scheme: str) -> PreparedData:
    return prepare_data(
        info.inputs, workload_for(info.sha256), workdir, scheme=scheme,
        calib_data=config.calib_data, eval_data=config.eval_data,
        calib_samples=config.calib_samples, eval_samples=config.eval_samples, decode=config.decode,
        images=config.images,
    )


def artifact_cache() -> ArtifactCache:
    return ArtifactCache(edgedeploy_home() / "cache")


def data_scheme(quant: QuantConfig) -> str:
    """The scheme the data stage prepares for: a prequantized model needs no calibration data."""
    return "fp32" if quant.prequantized else quant.scheme


def quantize_model(info: ModelInfo, data: PreparedData, quant: QuantConfig) -> QuantizedModel:
    """Quantize, or reuse the same model quantized the same way on the same data by the same tools; a prequantized
    model (QDQ already) is used as it is."""
    if quant.scheme == "fp32" or quant.prequantized:
        return quantize(Path(info.prepared_path), Path(info.prepared_path).parent, quant, None)
    names = [s.name for s in info.inputs]
    calibration = Samples.load(Path(data.calibration_path), names) if data.calibration_path else None
    if calibration is not None:
        calibration.source = data.calibration_source
    tools = tool_versions()
    key = cache_key(model=info.sha256, inputs=[i.model_dump() for i in info.inputs], quant=quant.model_dump(),
                    calibration=arrays_sha256(calibration.inputs) if calibration else None,
                    tools={k: tools[k] for k in ("onnx", "onnxruntime", "edgedeploy")})
    result, hit = artifact_cache().get_or_build(
        "quantized", key, QuantizedModel,
        lambda directory: quantize(Path(info.prepared_path), directory, quant, calibration))
    return result.model_copy(update={"cached": hit})


def package_cached(quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, *,
                   runtime: Runtime = "onnxruntime") -> CompiledArtifact:
    """The onnxruntime artifact (the .onnx and its manifest, which names the provider), content-addressed like a
    library."""
    tools = tool_versions()
    key = cache_key(model=quantized.sha256, profile=profile_sha256(profile), runtime=runtime,
                    tools={k: tools[k] for k in ("onnxruntime", "edgedeploy")})
    result, hit = artifact_cache().get_or_build(
        "packaged", key, CompiledArtifact,
        lambda directory: package_onnx(quantized, info, profile, directory, runtime=runtime))
    return result.model_copy(update={"cached": hit})


def compile_cached(quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, *,
                   tune_trials: int = 0, tune_minutes: float | None = None,
                   tuning_board: TuningBoard | None = None) -> CompiledArtifact:
    """Compile, or reuse the library built from the same model for the same profile by the same tools.

    A tuned build is never taken from the cache: each one adds trials to the persistent tuning database
    ($EDGEDEPLOY_HOME/tuning/<target>), shared with the lab (pipeline.tuning_share), so the library can get faster
    night after night. An untuned build takes the best record of each kernel that database has: its cache key holds
    the database's digest."""
    root = edgedeploy_home() / "tuning"
    target = None if profile.tvm_gpu_target() else resolve_target(profile)
    database = tuning_dir(target, root) if target else None
    if database:
        tuning_share.pull(database, target)
    if tune_trials:
        workdir = edgedeploy_home() / "tuned" / f"{quantized.sha256[:16]}-{profile.name}"
        workdir.mkdir(parents=True, exist_ok=True)
        artifact = compile_model(quantized, info, profile, workdir, tune_trials=tune_trials,
                                 tune_minutes=tune_minutes, tuning_root=root, tuning_board=tuning_board)
        if database:
            tuning_share.push(database, target, measured_on=(artifact.tuning or {}).get("measured_on", "local"))
        return artifact
    tools = tool_versions()
    # The targets too: they come from targets/profiles.py, outside the compiler's own revision; and the CUDA wheels,
    # whose absence makes a PTX-only library that must not be served once they are installed.
    key = cache_key(model=quantized.sha256, inputs=[i.model_dump() for i in info.inputs],
                    profile=profile_sha256(profile), compiler=COMPILE_REVISION, target=profile.tvm_target(),
                    gpu_target=profile.tvm_gpu_target(), tuning_records=records.digest(database) if database else None,
                    tools={k: tools[k] for k in ("apache-tvm", "apache-tvm-ffi", "edgedeploy", "nvidia-cuda-nvcc-cu12",
                                                 "nvidia-nvfatbin-cu12")})
    result, hit = artifact_cache().get_or_build(
        "compiled", key, CompiledArtifact,
        lambda directory: compile_model(quantized, info, profile, directory, tuning_root=root))
    return result.model_copy(update={"cached": hit})


def artifact_for(runtime: Runtime, quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, *,
                 tune_trials: int = 0, tune_minutes: float | None = None,
                 tuning_board: TuningBoard | None = None) -> CompiledArtifact:
    """What ``runtime`` runs: a TVM library compiled for the profile, or the .onnx packaged for onnxruntime."""
    if runtime == "tvm":
        return compile_cached(quantized, info, profile, tune_trials=tune_trials, tune_minutes=tune_minutes,
                              tuning_board=tuning_board)
    return package_cached(quantized, info, profile, runtime=runtime)


def build(config: RunConfig, profile: DeviceProfile, out_dir: Path, *,
          tuning_board: TuningBoard | None = None) -> BuildResult:
    """Everything up to a library for ``profile`` in ``out_dir`` (tuned on the board through ``tuning_board``, the
    caller's session with it, when the profile is reached over SSH)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = config.runtime or "tvm"  # `deploy compile` compiles, whatever the profile prefers to run
    info = ingest_model(config, out_dir)
    checks = check_model(info, profile, config, runtime=runtime, purpose="build")
    data = prepare(config, info, out_dir, data_scheme(checks.quant))
    quant = checks.quant
    if config.partial:
        plan = plan_partial(info, data, quant, budget=config.accuracy_budget, workdir=out_dir / "partial")
        quant = quant.model_copy(update={"keep_float": plan.keep_float})
    quantized = quantize_model(info, data, quant)
    cached = artifact_for(runtime, quantized, info, profile, tune_trials=config.tune_trials,
                          tune_minutes=config.tune_minutes, tuning_board=tuning_board)
    library = out_dir / Path(cached.library_path).name
    manifest = out_dir / "manifest.json"
    shutil.copyfile(cached.library_path, library)
    shutil.copyfile(cached.manifest_path, manifest)
    artifact = cached.model_copy(update={"library_path": str(library), "manifest_path": str(manifest)})
    return BuildResult(info=info, checks=checks, quantized=quantized, artifact=artifact)


def inspect_quantization(config: RunConfig, workdir: Path) -> tuple[ModelInfo, QuantizedModel, LayerErrorReport]:
    """`deploy inspect`: the model quantized as ``config.quant`` says (a model that came int8, as it is), and every
    quantized tensor's error against the fp32 model (its ``--reference`` for one that came int8) on the calibration
    samples (pipeline.layer_error)."""
    info = ingest_model(config, workdir)
    quant = (QuantConfig(scheme="int8", prequantized=True) if info.prequantized
             else config.quant.model_copy(update={"scheme": "int8"}))
    data = prepare(config, info, workdir, "fp32" if info.prequantized and not config.calib_data else "int8")
    quantized = quantize_model(info, data, quant)
    names = [s.name for s in info.inputs]
    samples = Samples.load(Path(data.calibration_path or data.eval_path), names).head(config.calib_samples)
    fp32 = info.reference_prepared_path if info.prequantized else info.prepared_path
    report = layer_errors(Path(fp32) if fp32 else None, Path(quantized.path), samples, batch=info.batch,
                          workdir=workdir / "layers")
    return info, quantized, report

