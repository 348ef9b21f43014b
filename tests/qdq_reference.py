"""What a QDQ model computes by its own definition, exactly and on any CPU: the reference the integer-kernel tests
judge TVM by.

onnxruntime's int8 run of the model is not that reference: on an x86 CPU without VNNI its u8 x s8 kernels multiply
through VPMADDUBSW, whose 16-bit pair sums saturate, and its outputs drift by many quantization steps
(tests/pipeline/test_ort_int8_saturation.py shows it on an emulated Haswell). Here the same graph runs in ONNX's own
reference implementation (``onnx.reference``, numpy), every float in it widened to float64. A dequantized value is
an integer (|q - zero point| <= 255, or an int32 bias, dequantized here in float64 as onnx.reference would round it
through float32) times a float32 scale: exact in float64. A sum of K products
of two such values is off by about K * 2**-53 of its size, some 1e-12 of a quantization step here, so every
QuantizeLinear rounds as exact integer arithmetic would, whatever CPU runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

# onnx.reference implements QuantizeLinear/DequantizeLinear from opset 19 on. For the ops these tests use (Q/DQ of
# uint8/int8, Conv, Gemm, MatMul, pooling, Clip, HardSigmoid, Mul, Flatten, Relu) opsets 13-19 define the same
# arithmetic, so the reference reads the graph as opset 19.
_REFERENCE_OPSET = 19


def _dequantize_int32_constants(model: onnx.ModelProto) -> None:
    """Each DequantizeLinear of a constant int32 tensor (a bias) replaced by its value in float64: onnx.reference
    casts the integers to float32 first, which rounds those above 2**24."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or inits.get(node.input[0], np.zeros(0, np.int8)).dtype != np.int32:
            continue
        x = inits[node.input[0]].astype(np.float64)
        scale = inits[node.input[1]].astype(np.float64)
        zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        if scale.size > 1:  # per channel, along the node's axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
            shape = [1] * x.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero = np.reshape(zero, shape) if np.ndim(zero) else zero
        name = f"{node.output[0]}.float64"
        model.graph.initializer.append(numpy_helper.from_array((x - zero) * scale, name))
        node.op_type, node.input[:] = "Identity", [name]
        del node.attribute[:]


class QdqReference:
    """Runs like an ``onnxruntime.InferenceSession`` (``run(None, feeds)``), returns float32 like the model."""

    def __init__(self, path: str | Path) -> None:
        model = onnx.load(str(path))
        _dequantize_int32_constants(model)
        for i, tensor in enumerate(model.graph.initializer):
            array = numpy_helper.to_array(tensor)
            if array.dtype == np.float32:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(np.float64), tensor.name))
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, _REFERENCE_OPSET)
        self._evaluator = ReferenceEvaluator(model)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        wide = {name: x.astype(np.float64) if x.dtype == np.float32 else x for name, x in feeds.items()}
        return [y.astype(np.float32) if y.dtype == np.float64 else y
                for y in self._evaluator.run(output_names, wide)]
