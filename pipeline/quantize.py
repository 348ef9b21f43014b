"""Stage 2, quantize: the only module that imports onnxruntime.quantization.

int8 is static QDQ quantization (QuantizeLinear/DequantizeLinear around float ops: the format
TVM's importer reads) calibrated on real samples; fp16 converts weights and compute to half
precision keeping fp32 inputs/outputs; fp32 passes the model through.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16
from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import QuantizationError
from pipeline.hashing import sha256_file
from pipeline.workloads.base import Samples

Scheme = Literal["fp32", "fp16", "int8"]
Calibration = Literal["minmax", "entropy", "percentile"]

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class QuantConfig(BaseModel):
    """How to quantize. Defaults: U8S8 activations/weights, the combination fast on x86 (VPMADDUBSW)."""

    model_config = ConfigDict(frozen=True)
    scheme: Scheme = Field(default="fp32", description="Numeric format of the deployed model.")
    calibration: Calibration = Field(default="minmax", description="How int8 ranges are chosen.")
    per_channel: bool = Field(default=True, description="One weight scale per output channel (else per tensor).")
    activation_type: Literal["uint8", "int8"] = Field(default="uint8", description="int8 activation type.")
    reduce_range: bool = Field(default=False, description="7-bit weights (avoids VPMADDUBSW saturation).")

    def label(self) -> str:
        if self.scheme != "int8":
            return self.scheme
        act = "U8S8" if self.activation_type == "uint8" else "S8S8"
        grain = "per-channel" if self.per_channel else "per-tensor"
        return f"int8 QDQ {act} {self.calibration} {grain}" + (" reduce-range" if self.reduce_range else "")


class QuantizedModel(BaseModel):
    """The model the compiler receives."""

    model_config = ConfigDict(frozen=True)
    path: str
    sha256: str
    config: QuantConfig
    calibration_samples: int = 0
    calibration_source: str = ""


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime advises quant_pre_process on every call; ingest already inferred shapes and
    folded constants, which is what that step does, so the advice is noise on the user's screen."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage() and \
            "run pre-processing" not in record.getMessage()


logging.getLogger().addFilter(_DropPreprocessAdvice())


class _Reader(CalibrationDataReader):
    def __init__(self, samples: Samples) -> None:
        self._rows = iter(range(len(samples)))
        self._samples = samples

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._rows, None)
        if i is None:
            return None
        return {name: arr[i : i + 1] for name, arr in self._samples.inputs.items()}


def _convert(model_path: Path, out: Path, config: QuantConfig, calibration: Samples | None) -> None:
    if config.scheme == "fp16":
        onnx.save(convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True), str(out))
        return
    if calibration is None or len(calibration) == 0:
        raise QuantizationError("int8 needs calibration samples", fix="pass --calib-data PATH")
    quantize_static(
        str(model_path),
        str(out),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=_METHODS[config.calibration],
    )


def quantize(model_path: Path, workdir: Path, config: QuantConfig, calibration: Samples | None) -> QuantizedModel:
    """Write the model for ``config.scheme`` into ``workdir``."""
    model_path = Path(model_path)
    if config.scheme == "fp32":
        return QuantizedModel(path=str(model_path), sha256=sha256_file(model_path), config=config)
    out = workdir / f"model.{config.scheme}.onnx"
    try:
        # onnxruntime's calibrators print progress on stdout, which belongs to --json output.
        with contextlib.redirect_stdout(sys.stderr):
            _convert(model_path, out, config, calibration)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"onnxruntime could not quantize the model to {config.label()}",
            value=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            fix="try another --calibration method or --quant fp32",
        ) from exc
    used = calibration if config.scheme == "int8" and calibration is not None else None
    return QuantizedModel(
        path=str(out), sha256=sha256_file(out), config=config,
        calibration_samples=len(used) if used else 0, calibration_source=used.source if used else "",
    )
