"""A lab file: which models, on which devices, in which schemes, every night.

    name: nightly
    models:
      - digits-cnn                     # a bundled workload's name, or a path to an .onnx
      - {model: pp-lcnet-orientation, eval_samples: 24}
      - {model: ./my_model.onnx, calib_data: ./calib.npz, eval_data: ./eval.npz, input_shape: [images=1,3,640,640]}
      - {model: ./yolov8n.onnx, eval_data: ./coco/instances.json, decode: yolov8, batch: 4}
    profiles: [lab-x86.yaml, raspberry-pi-4]   # names, or paths relative to this file
    schemes: [fp32, int8]
    runtimes: [tvm, onnxruntime-tensorrt]   # optional: those each board has (else its preferred runtime)
    bench: {min_iterations: 20, min_seconds: 2}
    regression: {threshold: 0.05, alpha: 0.01, accuracy_budget: 0.01}
    db_url: postgresql+psycopg://lab@db/edgedeploy     # optional; default $EDGEDEPLOY_DB_URL or SQLite
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgedeploy.errors import OptionError
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.ingest import parse_input_shapes
from pipeline.quantize import QuantConfig
from pipeline.regression import RegressionPolicy
from pipeline.report import series
from pipeline.workloads import WORKLOADS
from pipeline.workloads.base import Decode
from targets.profiles import DeviceProfile, RuntimeName


class LabModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="Bundled workload name or .onnx path (relative to the lab file).")
    calib_data: str | None = None
    eval_data: str | None = None
    eval_samples: int | None = Field(default=None, ge=1)
    calib_samples: int = Field(default=100, ge=1)
    input_shape: list[str] = Field(default_factory=list)
    batch: int | None = Field(default=None, ge=1)
    decode: Decode | None = Field(default=None, description="eval_data as COCO instances: how outputs read.")
    images: str | None = None
    reference: str | None = Field(default=None, description="The fp32 model of one that came int8.")


class LabFile(BaseModel):
    """A matrix of models x profiles x schemes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    models: list[LabModel] = Field(min_length=1)
    profiles: list[str] = Field(min_length=1)
    schemes: list[Literal["fp32", "fp16", "int8", "dynamic"]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    runtimes: list[RuntimeName] | None = Field(default=None, min_length=1, description="Runtimes to run each "
                                               "scheme with; None = each profile's preferred runtime.")
    bench: BenchmarkSettings = Field(default_factory=BenchmarkSettings)
    regression: RegressionPolicy = Field(default_factory=RegressionPolicy)
    db_url: str | None = None
    source: str = ""

    @field_validator("models", mode="before")
    @classmethod
    def _short_form(cls, models):
        return [{"model": m} if isinstance(m, str) else m for m in models or []]


class LabJob(BaseModel):
    """One cell of the matrix: a run config, and the device it occupies."""

    model_config = ConfigDict(frozen=True)
    device: str
    board: str = Field(default="", description="The board the device's profile reaches (user@host:port, local): "
                                                "jobs of one board wait for each other, whatever their profile.")
    model: str = Field(description="As the lab file names it: a bundled workload's name or the model file's stem.")
    label: str = Field(default="", description="Scheme, and runtime and unit where not TVM on the CPU (its series).")
    config: RunConfig


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_lab(path: Path) -> LabFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise OptionError(f"Cannot read lab file {path}", value=exc.strerror) from exc
    except yaml.YAMLError as exc:
        raise OptionError(f"Lab file {path} is not valid YAML", value=str(exc).splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise OptionError(f"Lab file {path} must hold a mapping", value=type(data).__name__)
    try:
        return LabFile.model_validate({**data, "source": str(path.resolve())})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise OptionError(f"Invalid lab file {path}: field '{'.'.join(map(str, first['loc']))}'",
                          value=repr(first.get("input")), expected=first["msg"]) from exc


def _runtimes_on(profile: DeviceProfile, asked: list[RuntimeName] | None) -> list[RuntimeName]:
    """The lab's runtimes that this board has (a Pi gets no TensorRT job to refuse every night); none asked, or none of
    them there: the profile's preferred one."""
    there = [r for r in asked or [] if profile.has_runtime(r)]
    return there or [profile.preferred_runtime]


def jobs(lab: LabFile) -> list[LabJob]:
    """Expand the matrix; profiles are loaded so a bad one fails before anything runs."""
    from targets.profiles import load_profile

    base = Path(lab.source).parent
    out = []
    for profile_ref in lab.profiles:
        ref = _resolve(base, profile_ref) if profile_ref.endswith((".yaml", ".yml")) else profile_ref
        profile = load_profile(ref)
        device = profile.name
        for item in lab.models:
            model = str(WORKLOADS[item.model].model_path()) if item.model in WORKLOADS else _resolve(base, item.model)
            for scheme, runtime in itertools.product(lab.schemes, _runtimes_on(profile, lab.runtimes)):
                name = item.model if item.model in WORKLOADS else Path(model).stem
                label = series(scheme, runtime, profile.unit_of(runtime))
                out.append(LabJob(device=device, board=profile.board_id(), model=name, label=label,
                                  config=RunConfig(
                    model_path=model, profile=ref, quant=QuantConfig(scheme=scheme), runtime=runtime,
                    calib_data=_resolve(base, item.calib_data), eval_data=_resolve(base, item.eval_data),
                    calib_samples=item.calib_samples, eval_samples=item.eval_samples,
                    input_shapes=parse_input_shapes(item.input_shape), batch=item.batch, decode=item.decode,
                    images=_resolve(base, item.images), reference=_resolve(base, item.reference), bench=lab.bench,
                    regression=lab.regression, db_url=lab.db_url,
                )))
    return out
