"""Stage 1 of 8, ingest: load the model safely, make its shapes static, count what it costs.

Many exports compute shapes at run time (Shape->Slice->Concat->Reshape, Range anchor grids,
dynamic Pad). TVM 0.27 can't import those, so they are rewritten for the requested input shape:
pin the input dims, infer shapes, let onnxruntime fold constants (ORT_ENABLE_BASIC: standard ops
only). The rewritten model must compute the same outputs, and this stage checks that it does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import OptionError, StaticShapeError
from pipeline.graph_stats import flops, is_prequantized, op_census, parameters, peak_activation_bytes
from pipeline.onnx_safety import DEFAULT_MAX_MODEL_BYTES, load_model_safely, model_digest

# Ops whose presence means shapes are computed while the model runs.
SHAPE_COMPUTING_OPS = frozenset({"Shape", "Size", "Range", "ConstantOfShape", "NonZero"})
# Ops that take a shape-like tensor input that must be a constant for a static import.
SHAPE_INPUT_OPS = {"Reshape": 1, "Expand": 1, "Tile": 1, "Pad": 1, "Resize": 2, "Upsample": 1, "Slice": 1}


class TensorSpec(BaseModel):
    """Name, static shape and numpy dtype of a model input or output."""

    model_config = ConfigDict(frozen=True)
    name: str
    shape: tuple[int, ...]
    dtype: str


def batch_of(specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> int:
    """The samples one inference takes: the inputs' common first dimension (1 where they don't share one, or where
    it is dynamic: -1)."""
    firsts = {spec.shape[0] if spec.shape else None for spec in specs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if first and first > 0 else 1


def sample_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    """One sample of this input: its shape without the batch dimension (an input without one is whole)."""
    return spec.shape[1:] if spec.shape and spec.shape[0] == batch else spec.shape


class ModelInfo(BaseModel):
    """What ingest learned about a model, and the static model the later stages use."""

    model_config = ConfigDict(frozen=True)
    source_path: str = Field(description="The file the user gave.")
    sha256: str = Field(description="sha256 of that file.")
    size_bytes: int
    opset: int
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_census: dict[str, int]
    parameters: int
    weight_bytes: int
    flops: int = Field(description="Per inference: 2 per multiply-add in Conv/Gemm/MatMul, 1 per element elsewhere.")
    peak_activation_bytes: int
    static_rewrite: bool = Field(description="True when run-time shape computation was folded away.")
    static_max_abs_diff: float | None = Field(description="Largest output difference of the rewrite vs the original.")
    prepared_path: str = Field(description="The static-shape model later stages use.")
    prequantized: bool = Field(default=False, description="Already QDQ int8 (a QAT export, another tool's output): "
                               "never quantized again; compiled with integer kernels.")

    reference_path: str | None = Field(default=None, description="--reference: the fp32 model the baseline runs.")
    reference_prepared_path: str | None = Field(default=None, description="Its static-shape model.")

    @property
    def batch(self) -> int:
        """Samples per inference (--batch, --input-shape or the model's own first dimension)."""
        return batch_of(self.inputs)


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``NAME=1,3,224,224`` options."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise OptionError(
                "Cannot read --input-shape", value=spec, expected="NAME=D1,D2,... with positive integers",
                fix="e.g. --input-shape images=1,3,640,640",
            ) from None
        shapes[name] = shape
    return shapes


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def input_specs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """The model's inputs (its weights aside), as they are declared."""
    return _specs(_graph_inputs(model))


def _dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in info.type.tensor_type.shape.dim]


# 1 GiB of fp32 per input: a 200-byte model can declare [100000, 100000] (4e10 bytes) and sink the host
MAX_INPUT_ELEMENTS = 2**28


def resolve_input_shapes(model: onnx.ModelProto, requested: dict[str, tuple[int, ...]],
                         batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Static shape for every input: requested, else the model's own, its dynamic first dim (the batch) ``batch``
    or 1; a ``batch`` the model's fixed first dim contradicts is refused."""
    inputs = _graph_inputs(model)
    known = {i.name for i in inputs}
    for name in requested:
        if name not in known:
            raise OptionError(
                "--input-shape names an input the model doesn't have", value=name,
                expected=f"one of {', '.join(sorted(known))}",
            )
    resolved: dict[str, tuple[int, ...]] = {}
    for info in inputs:
        dims = _dims(info)
        if info.name in requested:
            shape = requested[info.name]
            clash = [i for i, d in enumerate(dims) if isinstance(d, int) and d > 0 and i < len(shape) and shape[i] != d]
            if len(shape) != len(dims) or clash:
                raise OptionError(
                    f"--input-shape for {info.name!r} doesn't fit the model",
                    value=",".join(map(str, shape)), expected=f"a shape like {dims}",
                )
            resolved[info.name] = shape
            continue
        dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        if dynamic and dynamic != [0]:
            raise OptionError(
                f"Input {info.name!r} has dynamic dimensions besides the batch",
                value=dims, fix=f"give them with --input-shape {info.name}=" + ",".join(
                    "1" if i == 0 else (str(d) if isinstance(d, int) and d > 0 else "N") for i, d in enumerate(dims)),
            )
        if batch is not None and dims and not dynamic and dims[0] != batch:
            raise OptionError(
                f"--batch {batch} doesn't fit input {info.name!r}: its first dimension is fixed", value=dims,
                fix=f"leave --batch out (the model's batch is {dims[0]}), or export the model with a dynamic batch",
            )
        resolved[info.name] = tuple((batch or 1) if i == 0 and i in dynamic else int(d) for i, d in enumerate(dims))
    for name, shape in resolved.items():
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS or min(shape, default=1) < 1:
            raise OptionError(
                f"Input {name!r} would be {elements:.3g} elements: too large, or empty, to draw samples of or compile",
                value=",".join(map(str, shape)), expected=f"1 to {MAX_INPUT_ELEMENTS:.3g} elements per input",
                fix=f"give a smaller shape with --input-shape {name}=..., or check the model's declared input shape")
    return resolved


def needs_static_rewrite(model: onnx.ModelProto) -> bool:
    """True when some shape is computed at run time (and TVM's importer would refuse it)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type in SHAPE_COMPUTING_OPS:
            return True
        index = SHAPE_INPUT_OPS.get(node.op_type)
        if index is not None:
            shape_inputs = [n for n in node.input[index:] if n]
            if any(n not in constants for n in shape_inputs):
                return True
    return False


def _pin_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for info in _graph_inputs(pinned):
        dims = info.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[info.name], strict=True):
            dim.Clear()
            dim.dim_value = value
    # Outputs keep whatever inference gives; stale symbolic dims would clash with it.
    for out in pinned.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    return onnx.shape_inference.infer_shapes(pinned, strict_mode=False, data_prop=True)


def sample_inputs(specs: tuple[TensorSpec, ...] | list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs of the right shape and dtype (for equivalence checks)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.random(spec.shape, dtype=np.float32).astype(dtype)
        elif dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 10, spec.shape).astype(dtype)
    return feeds


def _session(model_bytes_or_path, *, optimized_out: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_out is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized_out)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def _specs(infos, fallback_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[TensorSpec, ...]:
    specs = []
    for info in infos:
        ttype = info.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
        if fallback_shapes and info.name in fallback_shapes:
            dims = fallback_shapes[info.name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
        specs.append(TensorSpec(name=info.name, shape=dims, dtype=dtype))
    return tuple(specs)


def make_static(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], out_path: Path, *, tolerance: float = 1e-3
) -> tuple[onnx.ModelProto, float]:
    """Fold run-time shape computation for these input shapes; verify the outputs didn't change."""
    pinned = _pin_inputs(model, shapes)
    try:
        _session(pinned.SerializeToString(), optimized_out=out_path)
    except Exception as exc:
        raise StaticShapeError(
            "onnxruntime could not fold the model's shapes for this input shape",
            value={k: list(v) for k, v in shapes.items()}, fix="check --input-shape", reason=str(exc)[:300],
        ) from exc
    static = onnx.shape_inference.infer_shapes(onnx.load(str(out_path)), strict_mode=False, data_prop=True)
    onnx.save(static, str(out_path))

    feeds = sample_inputs(_specs(_graph_inputs(pinned), shapes))
    reference = _session(model.SerializeToString()).run(None, feeds)
    rewritten = _session(str(out_path)).run(None, feeds)
    worst = 0.0
    for ref, got in zip(reference, rewritten, strict=True):
        if ref.shape != got.shape:
            raise StaticShapeError("The static model's output shape differs from the original's",
                                   value=got.shape, expected=str(ref.shape))
        if ref.size:
            scale = max(1.0, float(np.abs(ref).max()))
            worst = max(worst, float(np.abs(ref.astype(np.float64) - got).max()) / scale)
    if worst > tolerance:
        raise StaticShapeError(
            "The static rewrite changed the model's outputs",
            value=f"relative max abs difference {worst:.3g}", expected=f"at most {tolerance}",
            fix="report this model; pass the original to onnxruntime instead of TVM",
        )
    return static, worst


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name (op type and position): partial quantization and the report
    refer to layers by name, and onnxruntime's quantizer can only exclude a node that has one."""
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def ingest(
    model_path: Path, workdir: Path, *, input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch: int | None = None, max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> ModelInfo:
    """Load, check and measure a model; write the static model later stages use into ``workdir``."""
    model_path = Path(model_path)
    model = load_model_safely(model_path, max_bytes=max_bytes)
    shapes = resolve_input_shapes(model, input_shapes or {}, batch)
    workdir.mkdir(parents=True, exist_ok=True)
    prepared_path = workdir / "model.static.onnx"
    rewrite = needs_static_rewrite(model)
    if rewrite:
        prepared, diff = make_static(model, shapes, prepared_path)
    else:
        prepared, diff = _pin_inputs(model, shapes), None
    name_unnamed_nodes(prepared)
    onnx.save(prepared, str(prepared_path))
    weights, weight_bytes = parameters(prepared)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelInfo(
        source_path=str(model_path.resolve()),
        sha256=model_digest(model_path),
        size_bytes=model_path.stat().st_size,
        opset=opset,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=input_specs(prepared),
        outputs=_specs(prepared.graph.output),
        op_census=op_census(model),
        parameters=weights,
        weight_bytes=weight_bytes,
        flops=flops(prepared),
        peak_activation_bytes=peak_activation_bytes(prepared),
        static_rewrite=rewrite,
        static_max_abs_diff=diff,
        prepared_path=str(prepared_path),
        prequantized=is_prequantized(model),
    )
