"""Partial quantization: find the layers int8 hurts most and keep the fewest of them in float.

Per-layer sensitivity, as in NVIDIA's TensorRT guidance (leaving 2-10 sensitive layers in float recovers most of the
int8 loss): each weighted layer is quantized ALONE, with the ranges of one shared calibration, and the error that
adds to the model's output against the fp32 reference is measured on this host with onnxruntime, its graph
optimizations off: the QDQ graph op by op as ONNX defines it, never onnxruntime's fused int8 kernels, which saturate
on x86 CPUs without VNNI (docs/int8-saturation.md). So the accuracy is the model's own, wherever it runs (speed is
not, and is measured on the device later). Layers are ranked by that error; the most sensitive are kept in float,
one more at a time, until the whole model's quality on the evaluation samples is within the accuracy budget.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from edgedeploy.errors import QuantizationError
from pipeline.data import PreparedData
from pipeline.ingest import ModelInfo
from pipeline.metrics import within_budget
from pipeline.quantize import QuantConfig, quantize, weighted_layers
from pipeline.workloads.base import Samples

MAX_FLOAT_LAYERS = 10  # beyond that, int8 isn't the format for this model: say so rather than keep going
PROBE_SAMPLES = 32  # the ranking needs a relative error per layer, not the metric: a few samples show it


class LayerSensitivity(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    op_type: str
    error: float = Field(description="Relative squared output error (vs fp32) with only this layer in int8.")


class PartialStep(BaseModel):
    model_config = ConfigDict(frozen=True)
    kept_float: int
    quality: float
    within_budget: bool


class PartialPlan(BaseModel):
    """What the sensitivity analysis found and which layers stay in float."""

    model_config = ConfigDict(frozen=True)
    metric: str = Field(description="The quality measure: the workload's metric, or agreement with fp32.")
    fp32_quality: float
    full_int8_quality: float
    layers: int = Field(description="Weighted layers in the model.")
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
        table = Table(title="most sensitive layers (output error with only that layer in int8)",
                      title_justify="left")
        for column in ("layer", "op", "error", "kept in float", f"{self.metric} with the first N in float"):
            table.add_column(column)
        quality = {s.kept_float: s.quality for s in self.steps}
        for i, layer in enumerate(self.ranking[:MAX_FLOAT_LAYERS], start=1):
            table.add_row(layer.name, layer.op_type, f"{layer.error:.3g}", "yes" if layer.name in self.keep_float
                          else "", f"{quality[i] * 100:.2f} %" if i in quality else "")
        yield table


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

    def relative_error(self, outputs: np.ndarray) -> float:
        ref = self.reference[: len(outputs)].reshape(len(outputs), -1).astype(np.float64)
        got = outputs.reshape(len(outputs), -1).astype(np.float64)
        return float(np.mean(((got - ref) ** 2).sum(1) / np.maximum((ref ** 2).sum(1), 1e-30)))


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

    def variant(config: QuantConfig, name: str, only: list[str] | None = None) -> Path:
        return Path(quantize(prepared, workdir, config, calibration, only=only, calibration_cache=ranges,
                             out_name=name).path)

    full_quality, full_within = evaluator.score(evaluator.outputs(variant(quant, "full.onnx")), budget)
    common = {"metric": evaluator.metric_name(), "fp32_quality": evaluator.reference_quality,
              "full_int8_quality": full_quality}
    layers = weighted_layers(onnx.load(str(prepared)))
    if full_within:
        return PartialPlan(**common, layers=len(layers), ranking=[], steps=[], keep_float=(), within_budget=True,
                           reason="full int8 is within the accuracy budget: no layer needs float",
                           seconds=time.perf_counter() - started)

    ranking = sorted(
        (LayerSensitivity(name=name, op_type=op, error=evaluator.relative_error(
            evaluator.outputs(variant(quant, "probe.onnx", only=[name]), limit=PROBE_SAMPLES)))
         for name, op in layers),
        key=lambda layer: -layer.error)
    steps: list[PartialStep] = []
    for k in range(1, min(MAX_FLOAT_LAYERS, len(ranking)) + 1):
        keep = tuple(layer.name for layer in ranking[:k])
        outputs = evaluator.outputs(variant(quant.model_copy(update={"keep_float": keep}), f"keep{k}.onnx"))
        quality, within = evaluator.score(outputs, budget)
        steps.append(PartialStep(kept_float=k, quality=quality, within_budget=within))
        if steps[-1].within_budget:
            break
    best = next((s for s in steps if s.within_budget), None) or max(steps, key=lambda s: s.quality)
    keep = tuple(layer.name for layer in ranking[: best.kept_float])
    reason = (f"{best.kept_float} of {len(layers)} layers kept in float bring int8 within the budget"
              if best.within_budget else
              f"even {len(steps)} layers in float leave int8 outside the budget; the best ({best.kept_float} in "
              f"float) is used: consider fp32/fp16 or a larger --accuracy-budget")
    return PartialPlan(**common, layers=len(layers), ranking=ranking, steps=steps, keep_float=keep,
                       within_budget=best.within_budget, reason=reason, seconds=time.perf_counter() - started)
