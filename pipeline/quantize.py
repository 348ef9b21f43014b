"""Stage 4 of 8, quantize: the only module that imports onnxruntime.quantization.

int8 is static QDQ quantization (QuantizeLinear/DequantizeLinear around float ops: the format
TVM's importer reads) calibrated on real samples; fp16 converts weights and compute to half
precision keeping fp32 inputs/outputs; fp32 passes the model through.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx.version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data
from onnxruntime.transformers.float16 import convert_float_to_float16
from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import QuantizationError
from pipeline.ingest import batch_of, input_specs
from pipeline.workloads.base import Samples
from targets.hashing import sha256_file

Scheme = Literal["fp32", "fp16", "int8", "dynamic"]
Calibration = Literal["minmax", "entropy", "percentile", "mse"]

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "mse": CalibrationMethod.MinMax,  # ranges chosen by _mse_ranges, handed over as a min/max cache
}
MSE_BINS = 2048  # histogram resolution of each tensor for the MSE search
MSE_CANDIDATES = 128  # clipping ranges tried per tensor, from 2 % of the observed range to all of it


class QuantConfig(BaseModel):
    """How to quantize. Defaults: U8S8 activations/weights, the combination fast on x86 (VPMADDUBSW)."""

    model_config = ConfigDict(frozen=True)
    scheme: Scheme = Field(default="fp32", description="Numeric format of the deployed model.")
    calibration: Calibration = Field(default="minmax", description="How int8 ranges are chosen.")
    per_channel: bool = Field(default=True, description="One weight scale per output channel (else per tensor).")
    activation_type: Literal["uint8", "int8"] = Field(default="uint8", description="int8 activation type.")
    reduce_range: bool = Field(default=False, description="7-bit weights (avoids VPMADDUBSW saturation).")
    symmetric_activations: bool = Field(default=False, description="Activation zero points 0 (what TensorRT "
                                        "reads: its int8 is symmetric).")
    percentile: float = Field(default=99.999, gt=50, le=100, description="--calibration percentile: the share of "
                              "each tensor's values its range keeps.")
    format: Literal["qdq", "qoperator"] = Field(
        default="qdq", description="QDQ (QuantizeLinear/DequantizeLinear: TVM and onnxruntime) or QOperator "
        "(QLinearConv, ...: onnxruntime only).")
    keep_float: tuple[str, ...] = Field(
        default=(), description="Partial quantization: layers (node names) left in float, the most sensitive ones.")
    prequantized: bool = Field(default=False, description="The model came QDQ int8: used as it is, not quantized.")

    def label(self) -> str:
        if self.scheme == "dynamic":  # weights int8 ahead of time, activations quantized per run: no calibration
            return f"dynamic int8 {'per-channel' if self.per_channel else 'per-tensor'}" + (
                " reduce-range" if self.reduce_range else "")
        if self.scheme != "int8":
            return self.scheme
        if self.prequantized:
            return "int8 QDQ (prequantized)"
        act = "U8S8" if self.activation_type == "uint8" else "S8S8"
        grain = "per-channel" if self.per_channel else "per-tensor"
        fmt = "QDQ" if self.format == "qdq" else "QOperator"
        method = f"percentile {self.percentile:g}" if self.calibration == "percentile" else self.calibration
        return (f"int8 {fmt} {act} {method} {grain}" + (" reduce-range" if self.reduce_range else "")
                + (" symmetric" if self.symmetric_activations else "")
                + (f" ({len(self.keep_float)} layers float)" if self.keep_float else ""))


class QuantizedModel(BaseModel):
    """The model the compiler receives."""

    model_config = ConfigDict(frozen=True)
    path: str
    sha256: str
    config: QuantConfig
    calibration_samples: int = 0
    calibration_source: str = ""
    cached: bool = Field(default=False, description="Reused from the artifact cache.")


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime advises quant_pre_process on every call; ingest already inferred shapes and
    folded constants, which is what that step does, so the advice is noise on the user's screen."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage() and \
            "run pre-processing" not in record.getMessage()


logging.getLogger().addFilter(_DropPreprocessAdvice())


class _Reader(CalibrationDataReader):
    """The calibration samples, a batch of the model's size at a time."""

    def __init__(self, samples: Samples, model_path: Path) -> None:
        self._batches = samples.batches(batch_of(input_specs(onnx.load(str(model_path), load_external_data=False))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so that every input is produced before it is used.

    The fp16 converter appends its input Casts at the END of the node list; onnxruntime doesn't
    mind, but TVM's importer walks nodes in file order and fails on the first use of a cast output.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise QuantizationError("The converted graph has a cycle or an input nobody produces",
                                    value=[n.name for n in pending[:5]])
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    graph.ClearField("node")
    graph.node.extend(ordered)


# Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) needs opset 13; onnxruntime
# writes it into older models anyway, which the ONNX checker (and so TVM's importer) rejects.
PER_CHANNEL_MIN_OPSET = 13


def _at_least_opset(model_path: Path, workdir: Path, version: int) -> Path:
    model = onnx.load(str(model_path))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if current >= version:
        return model_path
    upgraded = workdir / f"model.opset{version}.onnx"
    onnx.save(onnx.version_converter.convert_version(model, version), str(upgraded))
    return upgraded


def _convert(model_path: Path, out: Path, config: QuantConfig, calibration: Samples | None, *,
             calibration_cache: Path | None = None) -> None:
    if config.scheme == "fp16":
        half = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
        topological_sort(half.graph)
        onnx.save(half, str(out))
        return
    if config.scheme == "dynamic":
        # onnxruntime's dynamic quantization: int8 weights, activations' ranges measured on every run
        # (DynamicQuantizeLinear -> MatMulInteger / ConvInteger); the scheme for transformers and recurrent models.
        quantize_dynamic(str(model_path), str(out), per_channel=config.per_channel, reduce_range=config.reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(config.keep_float) or None)
        return
    if config.calibration == "mse" and calibration is not None and not (calibration_cache and
                                                                        calibration_cache.is_file()):
        calibration_cache = calibration_cache or out.parent / f"{out.stem}.mse-ranges.json"
        _mse_ranges(_at_least_opset(model_path, out.parent, PER_CHANNEL_MIN_OPSET), calibration, calibration_cache)
    cached_ranges = calibration_cache is not None and calibration_cache.is_file()
    if not cached_ranges and (calibration is None or len(calibration) == 0):
        raise QuantizationError("int8 needs calibration samples", fix="pass --calib-data PATH")
    model_path = _at_least_opset(model_path, out.parent, PER_CHANNEL_MIN_OPSET)
    quantize_static(
        str(model_path),
        str(out),
        None if cached_ranges else _Reader(calibration, model_path),
        quant_format=QuantFormat.QDQ if config.format == "qdq" else QuantFormat.QOperator,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=_METHODS[config.calibration],
        nodes_to_exclude=list(config.keep_float) or None,
        calibration_cache_path=calibration_cache,
        extra_options={"ActivationSymmetric": config.symmetric_activations, "CalibPercentile": config.percentile},
    )


def _mse_ranges(model_path: Path, calibration: Samples, cache: Path) -> None:
    """Calibration by minimum mean squared error: every tensor's values on the calibration data (a histogram, as
    onnxruntime's entropy calibrator collects it), and the clipping range, a shrink of the observed [min, max], whose
    8-bit quantization of them has the least squared error: outliers cost less than the resolution they would take
    from everything else. Written as the min/max cache quantize_static reads."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(model_path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": MSE_BINS, "num_quantized_bins": 255})
        calibrator.collect_data(_Reader(calibration, model_path))
        histograms = calibrator.collector.histogram_dict
    ranges = {}
    for name, (counts, edges, low, high, _) in histograms.items():
        centres = (edges[:-1] + edges[1:]) / 2
        best, best_error = (float(low), float(high)), np.inf
        for fraction in np.linspace(0.02, 1.0, MSE_CANDIDATES):
            lo, hi = float(low) * fraction, float(high) * fraction
            scale = max(hi - lo, 1e-12) / 255
            levels = np.clip(np.round((centres - lo) / scale), 0, 255) * scale + lo
            error = float((counts * (centres - levels) ** 2).sum())
            if error < best_error:
                best, best_error = (lo, hi), error
        ranges[name] = TensorData(lowest=np.array([min(best[0], 0.0)], np.float32),  # as MinMax writes them
                                  highest=np.array([max(best[1], 0.0)], np.float32))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)


def quantize(model_path: Path, workdir: Path, config: QuantConfig, calibration: Samples | None, *,
             calibration_cache: Path | None = None,
             out_name: str | None = None) -> QuantizedModel:
    """Write the model for ``config.scheme`` into ``workdir``.

    ``calibration_cache`` keeps the int8 ranges in a file so that many variants of one model calibrate once.
    """
    model_path = Path(model_path)
    if config.scheme == "fp32" or config.prequantized:  # as it is (a prequantized model is QDQ int8 already)
        return QuantizedModel(path=str(model_path), sha256=sha256_file(model_path), config=config)
    out = workdir / (out_name or f"model.{config.scheme}.onnx")
    try:
        # onnxruntime's calibrators print progress on stdout, which belongs to --json output.
        with contextlib.redirect_stdout(sys.stderr):
            _convert(model_path, out, config, calibration, calibration_cache=calibration_cache)
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
