"""What one `deploy run` is asked to do: every option, validated, in one frozen object."""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.benchmark import BenchmarkSettings
from pipeline.quantize import QuantConfig
from pipeline.regression import RegressionPolicy
from pipeline.workloads.base import Decode
from targets.profiles import DeviceProfile, RuntimeName


def edgedeploy_home() -> Path:
    """Where runs and local devices live: $EDGEDEPLOY_HOME, default ~/.cache/edgedeploy."""
    return Path(os.environ.get("EDGEDEPLOY_HOME", "~/.cache/edgedeploy")).expanduser()


TRIALS_WITHIN_MINUTES = 1000  # a time budget without a trial count: the clock ends the run, not this


class RunConfig(BaseModel):
    """Inputs of one pipeline run."""

    model_config = ConfigDict(frozen=True)
    model_path: str = Field(description="The .onnx file.")
    profile: str = Field(default="local", description="Profile name or YAML path.")
    runtime: RuntimeName | None = Field(default=None, description="What runs the model on the device; None = the "
                                        "profile's preferred runtime.")
    quant: QuantConfig = Field(default_factory=QuantConfig)
    calib_data: str | None = Field(default=None, description=".npz or image folder for int8 calibration.")
    eval_data: str | None = Field(default=None, description=".npz or image folder to evaluate on.")
    calib_samples: int = Field(default=100, ge=1, description="Calibration samples to use.")
    eval_samples: int | None = Field(default=None, ge=1, description="Cap on evaluation samples.")
    input_shapes: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    decode: Decode | None = Field(default=None, description="How a detector's outputs read, for COCO annotations "
                                  "(--eval-data instances.json): yolov5, yolov8 or yolox.")
    images: str | None = Field(default=None, description="The COCO annotations' images (default: beside the .json).")
    reference: str | None = Field(default=None, description="The fp32 model the accuracy is measured against (the "
                                  "baseline on the device, the float side of `deploy inspect`): for an int8 model "
                                  "that came quantized; None = the model itself.")
    batch: int | None = Field(default=None, ge=1, description="Samples per inference, for a model whose first "
                              "dimension is dynamic; None = the model's own batch, else 1.")
    max_model_mb: int = Field(default=2048, ge=1, description="Size cap for the model file.")
    bench: BenchmarkSettings = Field(default_factory=BenchmarkSettings)
    regression: RegressionPolicy = Field(default_factory=RegressionPolicy)
    tune_trials: int = Field(default=0, ge=0, description="MetaSchedule trials per task (0 = no tuning).")
    tune_minutes: float | None = Field(default=None, gt=0, description="Time budget of a tuning run; alone, it "
                                       f"allows up to {TRIALS_WITHIN_MINUTES} trials per task.")
    tuning_check: bool = Field(default=True, description="A tuned TVM build for the CPU is measured on the device "
                               "in turns with the build before its tuning, and the faster ships (pipeline."
                               "tuning_check); False ships the tuned one unmeasured (a lab that studies the tuning).")
    partial: bool = Field(default=False, description="int8: keep the most sensitive layers in float until the "
                          "accuracy budget is met (per-layer sensitivity).")
    auto: bool = Field(default=False, description="--quant auto: measure every allowed candidate, ship the best.")
    accuracy_budget: float = Field(default=0.01, ge=0, description="Allowed drop of the workload's metric (0.01 = "
                                   "1 point); without labels, of top-1 agreement with fp32.")
    db_url: str | None = Field(default=None, description="Results database; None = $EDGEDEPLOY_DB_URL or SQLite.")
    run_id: str = Field(default="", description="Filled in when empty.")

    @model_validator(mode="before")
    @classmethod
    def _trials_for_a_time_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tune_minutes") and not data.get("tune_trials"):
            return {**data, "tune_trials": TRIALS_WITHIN_MINUTES}
        return data

    def runtime_on(self, profile: DeviceProfile) -> RuntimeName:
        """The runtime this run uses on ``profile``: the one asked for, else the profile's preferred one."""
        return self.runtime or profile.preferred_runtime

    def with_run_id(self) -> RunConfig:
        if self.run_id:
            return self
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        scheme = "auto" if self.auto else self.quant.scheme
        # A file name can hold anything (spaces, quotes, a backslash, a newline): the run id goes into paths on the
        # device and into its commands, so it keeps letters, digits, - _ . only.
        name = _slug(Path(self.model_path).stem)[:32]
        profile = _slug(Path(self.profile).stem)[:24]
        return self.model_copy(update={"run_id": f"{stamp}-{name}-{profile}-{scheme}-{secrets.token_hex(2)}"})

    def run_dir(self) -> Path:
        return edgedeploy_home() / "runs" / self.run_id


def _slug(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9._-] as _, and no leading dot (a hidden file)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "model"
