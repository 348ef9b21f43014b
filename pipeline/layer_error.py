"""Per-layer quantization error: for every tensor an int8 (QDQ) model quantizes, how much of it the 8 bits keep.

- **activations**: each QuantizeLinear -> DequantizeLinear pair of the int8 model, run on the calibration samples.
  ``sqnr_db`` is that pair's own loss (the tensor before Q against after DQ, in the int8 model: what this
  quantization costs, whatever came before); ``model_sqnr_db`` and ``cosine`` compare the dequantized tensor with the
  fp32 model's same tensor on the same inputs (what has accumulated by then).
- **weights**: each int8 initializer dequantized (per channel where it is) against the fp32 model's weight.

SQNR = 20 log10(||x|| / ||x - x_q||) over all samples, as onnxruntime's qdq_loss_debug defines it; lower is worse
(int8 of a well-spread tensor: ~40 dB; a tensor whose range an outlier stretched: ~10 dB). Both models run in
onnxruntime with its graph optimizations off: the QDQ arithmetic op by op, never its fused int8 kernels (which
saturate on CPUs without VNNI: docs/int8-saturation.md). Sums are kept per batch, so a model's activations are
never all held at once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from pipeline.workloads.base import Samples

SHOWN = 15  # rows the console shows; the result keeps every tensor


class TensorError(BaseModel):
    model_config = ConfigDict(frozen=True)
    tensor: str
    kind: str = Field(description="activation or weight")
    layer: str = Field(description="The node that computes on the quantized tensor (its first reader).")
    op_type: str
    float_layers: tuple[str, ...] = Field(description="The nodes to keep in float for this tensor to stay float: "
                                          "its readers and, for an activation, the node writing it (onnxruntime "
                                          "quantizes a quantized node's output for a float reader too).")
    sqnr_db: float = Field(description="This quantization's own loss, alone: the fp32 tensor against its Q -> DQ with "
                           "the int8 model's scale and zero point; the mean of each channel's SQNR, so a channel "
                           "100x larger than the others can't hide their loss (weights: per tensor). Lower is worse.")
    model_sqnr_db: float | None = Field(default=None, description="Activations: the int8 model's tensor against the "
                                        "fp32 model's (accumulated error).")
    cosine: float | None = Field(default=None, description="Activations: cosine of the same two, over all samples.")


class LayerErrorReport(BaseModel):
    """Every quantized tensor, worst first."""

    model_config = ConfigDict(frozen=True)
    samples: int
    tensors: list[TensorError]
    seconds: float

    def table(self, top: int = SHOWN) -> Table:
        """The ``top`` worst tensors as a table (the title counts them all)."""
        table = Table(title=f"int8 quantization error per tensor, worst first ({len(self.tensors)} tensors, "
                      f"{self.samples} samples; SQNR: lower is worse)", title_justify="left")
        for column in ("tensor", "kind", "read by", "SQNR dB", "vs fp32 dB", "cosine vs fp32"):
            table.add_column(column, justify="right" if "dB" in column or "cosine" in column else "left")
        for t in self.tensors[:top]:
            table.add_row(t.tensor, t.kind, f"{t.layer} ({t.op_type})", f"{t.sqnr_db:.1f}",
                          "" if t.model_sqnr_db is None else f"{t.model_sqnr_db:.1f}",
                          "" if t.cosine is None else f"{t.cosine:.5f}")
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table()
        if len(self.tensors) > SHOWN:
            yield f"... and {len(self.tensors) - SHOWN} more (all of them in the result's JSON)"


def _sqnr(signal: float, noise: float) -> float:
    return 20 * math.log10(max(math.sqrt(signal), 1e-30) / max(math.sqrt(noise), 1e-30))


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.size > 1:  # per channel, along ``axis``
        shape[axis] = -1
    zero = np.zeros_like(scale) if zero is None else zero
    return (q.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)


class _Pair:
    """One Q -> DQ pair of the int8 model: the tensor it quantizes (``source``), the dequantized one (``result``),
    the node that reads it, and the Q node's own scale and zero point (where they are constants)."""

    def __init__(self, source: str, result: str, readers: list[onnx.NodeProto], writer: onnx.NodeProto | None,
                 scale: np.ndarray | None, zero: np.ndarray | None) -> None:
        self.source, self.result, self.reader, self.scale, self.zero = source, result, readers[0], scale, zero
        self.float_layers = tuple(n.name for n in ([writer] if writer is not None else []) + readers)
        self.signal: np.ndarray | float = 0.0  # per channel: ||f||^2
        self.noise: np.ndarray | float = 0.0  # per channel: ||f - QDQ(f)||^2
        self.model_sums = np.zeros(4)  # ||f||^2, ||f - dq||^2, f.dq, ||dq||^2

    def add(self, f: np.ndarray, dq: np.ndarray) -> None:
        axes = _all_but_channel(f)
        alone = _fake_quantize(f, self.scale, self.zero) if self.scale is not None else dq
        self.signal = self.signal + (f * f).sum(axis=axes)
        self.noise = self.noise + ((f - alone) ** 2).sum(axis=axes)
        self.model_sums += [(f * f).sum(), ((f - dq) ** 2).sum(), (f * dq).sum(), (dq * dq).sum()]

    def channel_sqnr(self) -> float:
        """The mean over channels of each channel's SQNR (channels with no signal aside)."""
        signal, noise = np.atleast_1d(self.signal), np.atleast_1d(self.noise)
        live = signal > 0
        if not live.any():
            return _sqnr(0.0, 0.0)
        return float(np.mean([_sqnr(a, b) for a, b in zip(signal[live], noise[live], strict=True)]))


def _all_but_channel(x: np.ndarray) -> tuple[int, ...]:
    """Axes summed over, keeping the channels: axis 1 of NCHW, the last of [N, tokens, features] or [N, features]."""
    if x.ndim < 2:
        return tuple(range(x.ndim))
    channel = 1 if x.ndim == 4 else x.ndim - 1
    return tuple(a for a in range(x.ndim) if a != channel)


def _fake_quantize(f: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear of ``f`` with a per-tensor scale and zero point, as ONNX defines them."""
    info = np.iinfo(zero.dtype if zero is not None else np.uint8)
    z = 0.0 if zero is None else float(zero.reshape(-1)[0])
    s = float(scale.reshape(-1)[0])
    return (np.clip(np.rint(f / s) + z, info.min, info.max) - z) * s


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _activation_pairs(qdq: onnx.ModelProto) -> list[_Pair]:
    weights = {t.name: t for t in qdq.graph.initializer}
    readers = _readers(qdq.graph)
    writers = {name: node for node in qdq.graph.node for name in node.output}
    pairs = []
    for q in qdq.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in weights:
            continue
        scale = numpy_helper.to_array(weights[q.input[1]]) if q.input[1] in weights else None
        zero = (numpy_helper.to_array(weights[q.input[2]]) if len(q.input) > 2 and q.input[2] in weights else None)
        per_tensor = scale is not None and scale.size == 1
        for dq in readers.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear" and readers.get(dq.output[0]):
                pairs.append(_Pair(q.input[0], dq.output[0], readers[dq.output[0]], writers.get(q.input[0]),
                                   scale if per_tensor else None, zero if per_tensor else None))
    return pairs


def _float_weight(dq: onnx.NodeProto, reader: onnx.NodeProto, fp32_nodes: dict[str, onnx.NodeProto],
                  fp32_inits: dict[str, onnx.TensorProto]) -> str | None:
    """The fp32 weight a dequantized one stands for: what the same node reads at the same input, else the name
    onnxruntime's quantizer derived (``w_quantized``, ``w_DequantizeLinear_Output``) from an unnamed node's."""
    original = fp32_nodes.get(reader.name) if reader.name else None
    index = list(reader.input).index(dq.output[0])
    if original is not None and index < len(original.input) and original.input[index] in fp32_inits:
        return original.input[index]
    for name, suffix in ((dq.input[0], "_quantized"), (dq.output[0], "_DequantizeLinear_Output")):
        if name.endswith(suffix) and name[: -len(suffix)] in fp32_inits:
            return name[: -len(suffix)]
    return None


def _weight_errors(fp32: onnx.ModelProto, qdq: onnx.ModelProto) -> list[TensorError]:
    """Each int8 weight, dequantized, against the fp32 weight it stands for."""
    inits = {t.name: t for t in qdq.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node if n.name}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    readers = _readers(qdq.graph)
    errors = []
    for dq in qdq.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or not readers.get(dq.output[0]):
            continue
        reader = readers[dq.output[0]][0]
        name = _float_weight(dq, reader, fp32_nodes, fp32_inits)
        if name is None:
            continue
        weight = numpy_helper.to_array(fp32_inits[name]).astype(np.float64)
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.shape != weight.shape:  # a reshaped weight: not comparable here
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        noise = float(((weight - _dequantize(q, scale, zero, axis)) ** 2).sum())
        errors.append(TensorError(tensor=name, kind="weight", layer=reader.name, op_type=reader.op_type,
                                  float_layers=(reader.name,), sqnr_db=_sqnr(float((weight ** 2).sum()), noise)))
    return errors


def _session(model: onnx.ModelProto, outputs: list[str], path: Path) -> ort.InferenceSession:
    """The model with ``outputs`` added to its graph outputs, saved to ``path`` (a model may pass 2 GB)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
                              for name in dict.fromkeys(outputs) if name not in present)
    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_500_000_000)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def layer_errors(fp32_path: Path | None, qdq_path: Path, samples: Samples, *, batch: int,
                 workdir: Path) -> LayerErrorReport:
    """Every quantized tensor of the int8 model ``qdq_path`` measured on ``samples`` against ``fp32_path`` (None: an
    int8 model with no fp32 original, whose tensors before each Q are taken as the true values)."""
    started = time.perf_counter()
    qdq = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path)) if fp32_path else None
    pairs = _activation_pairs(qdq)
    fp32_tensors = ({o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}) if fp32 \
        else set()
    compared = [p for p in pairs if p.source in fp32_tensors]
    workdir.mkdir(parents=True, exist_ok=True)
    qdq_run = _session(qdq, [p.result for p in pairs] + [p.source for p in pairs if p not in compared],
                       workdir / "layers.int8.onnx")
    fp32_run = _session(fp32, [p.source for p in compared], workdir / "layers.fp32.onnx") if compared else None
    seen = 0
    for feeds in samples.batches(batch):
        got = dict(zip([o.name for o in qdq_run.get_outputs()], qdq_run.run(None, feeds), strict=True))
        if fp32_run is not None:
            got.update(zip([o.name for o in fp32_run.get_outputs()], fp32_run.run(None, feeds), strict=True))
        for pair in pairs:
            pair.add(got[pair.source].astype(np.float64), got[pair.result].astype(np.float64))
        seen += batch
    errors = [TensorError(
        tensor=p.source, kind="activation", layer=p.reader.name, op_type=p.reader.op_type,
        float_layers=p.float_layers, sqnr_db=p.channel_sqnr(),
        model_sqnr_db=_sqnr(p.model_sums[0], p.model_sums[1]) if p in compared else None,
        cosine=float(p.model_sums[2] / max(math.sqrt(p.model_sums[0] * p.model_sums[3]), 1e-30))
        if p in compared else None,
    ) for p in pairs]
    errors += _weight_errors(fp32, qdq) if fp32 else []
    return LayerErrorReport(samples=seen, tensors=sorted(errors, key=lambda t: t.sqnr_db),
                            seconds=time.perf_counter() - started)
