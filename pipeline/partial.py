"""Partial quantization: find the layers int8 hurts most and keep the fewest of them in float.

The ranking is the per-layer quantization error report (pipeline/layer_error.py): every layer that computes on
quantized data, weighted or not, by the worst SQNR among the tensors it reads, each quantization measured alone on
the calibration samples (one pass of the fp32 and the int8 model, not one quantization per layer). The worst are
kept in float, one more at a time and then in growing steps (NVIDIA's TensorRT guidance: a few sensitive layers in
float recover most of the int8 loss), until the whole model's quality on the evaluation samples is within the
accuracy budget. Quality is measured on this host with onnxruntime, its graph optimizations off: the QDQ graph op
by op as ONNX defines it, never onnxruntime's fused int8 kernels, which saturate on x86 CPUs without VNNI
(docs/int8-saturation.md). So the accuracy is the model's own, wherever it runs (speed is not, and is measured on
the device later).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from edgedeploy.errors import QuantizationError
from pipeline.data import PreparedData
from pipeline.ingest import ModelInfo
from pipeline.layer_error import layer_errors
from pipeline.metrics import within_budget
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads.base import Samples

REPORT_SAMPLES = 32  # the ranking needs each tensor's error, not the metric: a few samples show it
SHOWN = 10  # ranking rows the console shows


def float_counts(layers: int) -> list[int]:
    """How many of the worst layers each step keeps in float: 1..8 one at a time, then growing by half (12, 18, 27,
    ...) up to all of them, so a model of 500 layers takes ~20 steps, not 500."""
    counts, k = [], 1
    while k < layers:
        counts.append(k)
        k = k + 1 if k < 8 else (k * 3 + 1) // 2
    return counts + [layers] if layers else []


class LayerSensitivity(BaseModel):
    """One quantized tensor, and the layers kept in float when it is."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="The tensor.")
    op_type: str = Field(description="Of the node that reads it.")
    sqnr_db: float = Field(description="Its quantization's SQNR, alone (lower is worse): pipeline/layer_error.py.")
    layers: tuple[str, ...] = Field(description="The nodes kept in float for it to stay float.")


class PartialStep(BaseModel):
    model_config = ConfigDict(frozen=True)
    kept_float: int = Field(description="The worst tensors kept in float (each with its layers).")
    layers: int = Field(default=0, description="The layers that keeps in float.")
    quality: float
    within_budget: bool


class PartialPlan(BaseModel):
    """What the sensitivity analysis found and which layers stay in float."""

    model_config = ConfigDict(frozen=True)
    metric: str = Field(description="The quality measure: the workload's metric, or agreement with fp32.")
    fp32_quality: float
    full_int8_quality: float
    layers: int = Field(description="Layers that compute on quantized data in full int8 (0 when full int8 was within "
                        "the budget: nothing was ranked).")
    tensors: int = Field(default=0, description="Tensors full int8 quantizes (the ranking's length).")
    ranking: list[LayerSensitivity] = Field(description="Most sensitive first; empty when full int8 was fine.")
    steps: list[PartialStep]
    keep_float: tuple[str, ...]
    within_budget: bool
    reason: str
    seconds: float

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield (f"[bold]partial quantization:[/] {self.reason} ({self.metric}: fp32 {self.fp32_quality * 100:.2f} %, "
               f"full int8 {self.full_int8_quality * 100:.2f} %; {self.seconds:.0f} s)")
        if not self.ranking:
            return
        table = Table(title="worst quantized tensors (SQNR of each quantization alone; lower is worse)",
                      title_justify="left")
        for column in ("tensor", "read by", "SQNR dB", "layers kept in float", f"{self.metric} with the first N"):
            table.add_column(column)
        quality = {s.kept_float: s.quality for s in self.steps}
        for i, tensor in enumerate(self.ranking[:SHOWN], start=1):
            kept = [name for name in tensor.layers if name in self.keep_float]
            table.add_row(tensor.name, tensor.op_type, f"{tensor.sqnr_db:.1f}", ", ".join(kept),
                          f"{quality[i] * 100:.2f} %" if i in quality else "")
        yield table
        if len(self.ranking) > SHOWN:
            yield f"... {len(self.ranking) - SHOWN} more tensors ranked; {len(self.keep_float)} layers kept in float"


class _Evaluator:
    """Runs model variants over the evaluation samples on this host and scores them."""

    def __init__(self, info: ModelInfo, data: PreparedData) -> None:
        self.names = [s.name for s in info.inputs]
        self.batch = info.batch
        self.samples = Samples.load(Path(data.eval_path), self.names)
        self.scoring = data.scoring
        self.labelled = self.scoring.metric_for(self.samples) is not None
        self.reference = self.outputs(Path(info.prepared_path))
        self.reference_quality = self.scoring.accuracy(self.reference, self.samples) if self.labelled else 1.0

    def outputs(self, model: Path, limit: int | None = None) -> np.ndarray:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the model's arithmetic
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        samples = self.samples.head(limit)
        return np.concatenate([session.run(None, feeds)[0] for feeds in samples.batches(self.batch)])


    def metric_name(self) -> str:
        return self.scoring.metric_words if self.labelled else self.scoring.agreement_words()

    def score(self, outputs: np.ndarray, budget: float) -> tuple[float, bool]:
        """(quality, within the budget): the metric when there are labels, else agreement with fp32."""
        agree = self.scoring.agreement(outputs, self.reference)
        if self.labelled:
            value = self.scoring.accuracy(outputs, self.samples)
            return value, within_budget(value, self.reference_quality, agree, budget)
        quality = agree.top1 if agree.top1 is not None else agree.cosine
        return quality, within_budget(None, None, agree, budget)


def plan_partial(info: ModelInfo, data: PreparedData, quant: QuantConfig, *, budget: float,
                 workdir: Path) -> PartialPlan:
    """Rank the layers and choose the fewest to keep in float so that int8 stays within ``budget``."""
    if quant.scheme != "int8":
        raise QuantizationError("Partial quantization is for int8", value=quant.scheme, fix="use --quant int8")
    if not data.calibration_path:
        raise QuantizationError("Partial quantization needs calibration samples", fix="pass --calib-data PATH")
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    evaluator = _Evaluator(info, data)
    calibration = Samples.load(Path(data.calibration_path), evaluator.names)
    ranges = workdir / f"ranges.{quant.calibration}.json"  # one calibration serves every variant below
    prepared = Path(info.prepared_path)
    quant = quant.model_copy(update={"keep_float": ()})

    def variant(config: QuantConfig, name: str) -> Path:
        return Path(quantize(prepared, workdir, config, calibration, calibration_cache=ranges,
                             out_name=name).path)

    full = variant(quant, "full.onnx")
    full_quality, full_within = evaluator.score(evaluator.outputs(full), budget)
    common: dict = {"metric": evaluator.metric_name(), "fp32_quality": evaluator.reference_quality,
                    "full_int8_quality": full_quality}
    if full_within:  # nothing to rank: the per-layer report (two more passes over the samples) is not needed
        return PartialPlan(**common, layers=0, ranking=[], steps=[], keep_float=(), within_budget=True,
                           reason="full int8 is within the accuracy budget: no layer needs float",
                           seconds=time.perf_counter() - started)
    report = layer_errors(prepared, full, calibration.head(REPORT_SAMPLES), batch=info.batch, workdir=workdir)
    ranking = [LayerSensitivity(name=t.tensor, op_type=t.op_type, sqnr_db=t.sqnr_db, layers=t.float_layers)
               for t in report.tensors]
    common["layers"] = len({name for t in report.tensors for name in t.float_layers})
    common["tensors"] = len(ranking)

    def kept(k: int) -> tuple[str, ...]:  # the layers of the k worst tensors, in that order
        return tuple(dict.fromkeys(name for sensitivity in ranking[:k] for name in sensitivity.layers))

    steps: list[PartialStep] = []
    for k in float_counts(len(ranking)):
        outputs = evaluator.outputs(variant(quant.model_copy(update={"keep_float": kept(k)}), f"keep{k}.onnx"))
        quality, within = evaluator.score(outputs, budget)
        steps.append(PartialStep(kept_float=k, layers=len(kept(k)), quality=quality, within_budget=within))
        if steps[-1].within_budget:
            break
    best = next((s for s in steps if s.within_budget), None) or max(steps, key=lambda s: s.quality)
    keep = kept(best.kept_float)
    reason = (f"{len(keep)} of {common['layers']} layers kept in float (for the {best.kept_float} worst of "
              f"{len(ranking)} quantized tensors) bring int8 within the budget" if best.within_budget else
              f"even every layer in float leaves int8 outside the budget; the best ({len(keep)} in float) is used: "
              "consider fp32/fp16 or a larger --accuracy-budget")
    return PartialPlan(**common, ranking=ranking, steps=steps, keep_float=keep, within_budget=best.within_budget,
                       reason=reason, seconds=time.perf_counter() - started)
