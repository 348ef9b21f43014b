"""Op census, parameter count, FLOPs and peak activation memory of a static-shape ONNX model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.onnx_safety import iter_tensors


@dataclass(frozen=True)
class PlacedNode:
    """A node and where it is: "" in the main graph, else e.g. "If 'cond' then_branch" or "function 'Block'"."""

    node: onnx.NodeProto
    where: str = ""

    def named(self) -> str:
        n = self.node
        return f"{n.name or '<unnamed>'} ({n.op_type})" + (f" in {self.where}" if self.where else "")


def _in_graph(graph: onnx.GraphProto, where: str) -> Iterator[PlacedNode]:
    for node in graph.node:
        yield PlacedNode(node, where)
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                inner = f"{node.op_type} '{node.name or '<unnamed>'}' {attribute.name}"
                yield from _in_graph(body, f"{where} > {inner}" if where else inner)


def every_node(model: onnx.ModelProto) -> Iterator[PlacedNode]:
    """Every node of the model with where it is: the main graph, the bodies of If/Loop/Scan (nested), and the
    model's local functions, whose calls are not ops of their own (:func:`function_calls`)."""
    yield from _in_graph(model.graph, "")
    for function in model.functions:
        yield from _in_graph(onnx.GraphProto(node=function.node), f"function '{function.name}'")


def function_calls(model: onnx.ModelProto) -> frozenset[tuple[str, str]]:
    """(domain, name) of the model's local functions: a node with that op calls one (its body is checked instead)."""
    return frozenset((f.domain, f.name) for f in model.functions)


# A weight dequantized into one of these is QDQ quantization (a QAT export, or another tool's output).
_QUANTIZED_CONSUMERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def is_prequantized(model: onnx.ModelProto) -> bool:
    """True for a QDQ model: a DequantizeLinear of a constant feeds a Conv/MatMul/Gemm (its weights are int8 already),
    or quantization pairs surround the graph's activations. Such a model is never quantized again."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    dequantized_weights = {n.output[0] for n in model.graph.node
                           if n.op_type == "DequantizeLinear" and n.input and n.input[0] in constants}
    feeds = any(n.op_type in _QUANTIZED_CONSUMERS and dequantized_weights & set(n.input) for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    return feeds or {"QuantizeLinear", "DequantizeLinear"} <= ops


def widest_int8_weight(model: onnx.ModelProto) -> int:
    """The largest magnitude among the int8 constants a DequantizeLinear reads (a QDQ model's weights), 0 where
    there are none: at most 64 for 7-bit weights (onnxruntime's reduce_range), up to 128 for 8-bit ones."""
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input}
    widest = 0
    for tensor in model.graph.initializer:
        if tensor.name in dequantized and tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor).astype(np.int16)
            widest = max(widest, int(np.abs(values).max(initial=0)))
    return widest


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op ('domain::Op' for non-default domains), most frequent first."""
    names = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return dict(names.most_common())


def parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(number of weights, bytes of weights) over initializers and Constant tensors."""
    count = nbytes = 0
    for tensor in iter_tensors(model.graph):
        elems = int(np.prod(tensor.dims)) if tensor.dims else 1
        count += elems
        nbytes += elems * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count, nbytes


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, element size) for every tensor whose shape is fully known."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    infos = list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)
    for info in infos:
        ttype = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if ttype.HasField("shape") and all(d >= 0 for d in dims) and ttype.elem_type:
            itemsize = helper.tensor_dtype_to_np_dtype(ttype.elem_type).itemsize
            out[info.name] = (tuple(dims), itemsize)
    for init in model.graph.initializer:
        out[init.name] = (tuple(init.dims), helper.tensor_dtype_to_np_dtype(init.data_type).itemsize)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def flops(model: onnx.ModelProto) -> int:
    """Floating-point operations of one inference: 2 per multiply-add in Conv/ConvTranspose/Gemm/MatMul,
    1 per output element for every other op whose output shape is known."""
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        out_elems = int(np.prod(out[0]))
        if node.op_type == "Conv" and node.input[1] in shapes:
            w = shapes[node.input[1]][0]  # [Cout, Cin/group, kh, kw]
            total += 2 * out_elems * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose" and node.input[0] in shapes and node.input[1] in shapes:
            x_elems = int(np.prod(shapes[node.input[0]][0]))
            w = shapes[node.input[1]][0]  # [Cin, Cout/group, kh, kw]
            total += 2 * x_elems * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            a = shapes[node.input[0]][0]
            k = a[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else a[-1]
            total += 2 * out_elems * int(k)
        else:
            total += out_elems
    return total


def peak_activation_bytes(model: onnx.ModelProto) -> int:
    """Peak bytes of live intermediate tensors, running the nodes in file (topological) order."""
    shapes = _shapes(model)
    weights = {t.name for t in model.graph.initializer}
    size = {name: int(np.prod(s)) * item for name, (s, item) in shapes.items() if name not in weights}
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    for out in model.graph.output:
        last_use[out.name] = len(model.graph.node)
    live = {i.name for i in model.graph.input if i.name not in weights}
    current = peak = sum(size.get(n, 0) for n in live)
    for i, node in enumerate(model.graph.node):
        for name in node.output:
            if name and name not in live:
                live.add(name)
                current += size.get(name, 0)
        peak = max(peak, current)
        for name in list(live):
            if last_use.get(name, -1) <= i:
                live.discard(name)
                current -= size.get(name, 0)
    return peak

