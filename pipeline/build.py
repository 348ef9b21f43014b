"""Ingest -> check -> quantize -> compile, without a device: what `deploy compile` runs.

`deploy run` runs the same stage functions, one Prefect task each (flows/run.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnx
from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import CheckRefused
from pipeline.checks import CheckReport, Runtime, run_checks
from pipeline.compile import CompiledArtifact, compile_model
from pipeline.config import RunConfig
from pipeline.data import PreparedData, prepare_data
from pipeline.ingest import ModelInfo, ingest
from pipeline.quantize import QuantizedModel, quantize
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
    return ingest(Path(config.model_path), workdir, input_shapes=config.input_shapes,
                  max_bytes=config.max_model_mb * 1024 * 1024)


def check_model(info: ModelInfo, profile: DeviceProfile, config: RunConfig, *, runtime: Runtime = "tvm",
                purpose: Literal["build", "run"] = "run") -> CheckReport:
    """Run every check; raise CheckRefused when one that matters for ``purpose`` refuses."""
    # The model as the user gave it: its quantized format is what the checks judge.
    report = run_checks(onnx.load(info.prepared_path), info, profile, config.quant, runtime=runtime)
    if report.refused_for(purpose):
        raise CheckRefused(report.refusal_message(purpose), profile=profile.name, scheme=report.scheme)
    return report


def prepare(config: RunConfig, info: ModelInfo, workdir: Path, scheme: str) -> PreparedData:
    return prepare_data(
        info.inputs, workload_for(info.sha256), workdir, scheme=scheme,
        calib_data=config.calib_data, eval_data=config.eval_data,
        calib_samples=config.calib_samples, eval_samples=config.eval_samples,
    )


def quantize_model(info: ModelInfo, data: PreparedData, checks: CheckReport, workdir: Path) -> QuantizedModel:
    names = [s.name for s in info.inputs]
    calibration = Samples.load(Path(data.calibration_path), names) if data.calibration_path else None
    if calibration is not None:
        calibration.source = data.calibration_source
    return quantize(Path(info.prepared_path), workdir, checks.quant, calibration)


def build(config: RunConfig, profile: DeviceProfile, out_dir: Path) -> BuildResult:
    """Everything up to a library for ``profile`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = ingest_model(config, out_dir)
    checks = check_model(info, profile, config, purpose="build")
    data = prepare(config, info, out_dir, checks.quant.scheme)
    quantized = quantize_model(info, data, checks, out_dir)
    artifact = compile_model(quantized, info, profile, out_dir)
    return BuildResult(info=info, checks=checks, quantized=quantized, artifact=artifact)
