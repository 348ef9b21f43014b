"""Channel-last networks for CPU targets: Relax's ConvertLayout, made to reach through the whole network.

ONNX models are NCHW with OIHW weights. A CPU kernel vectorizes best along the axis that is contiguous in both
the output and the weights: with NHWC activations and HWIO weights that is the output channel, and each conv
becomes a small GEMM (pixels x input channels x output channels) with one broadcast and one vector load per
multiply-add. In NCHW it vectorizes along a row of pixels instead (strided for a stride-2 conv, 7 wide at the
end of a network). Measured on the x86 lab device, 128 MetaSchedule trials each, PP-LCNet's 3x3 depthwise conv
ran 40 us in NHWC against 95 us in NCHW (the NCHW one had reached 74 us after an hour of tuning).

``relax.transform.ConvertLayout`` converts conv2d and every op with a layout rule; it leaves the others in
NCHW and puts permutes around them, which cost as much as the layers between them. Three ops of quantized
and MobileNet-style networks have no rule in TVM 0.27, so before it runs they are rewritten into ops that do,
computing the same values:

- ``clip(x, lo, hi)`` -> ``maximum(minimum(x, hi), lo)`` (HardSigmoid/HardSwish), and the importer's
  ``call_tir(maximum/minimum)`` of a Clip with its bounds as inputs (ReLU6) -> the Relax ops;
- per-tensor ``quantize``/``dequantize`` of a computed tensor -> the elementwise arithmetic of TVM's own
  legalization (``relax/transform/legalize_ops/qdq.py``), operation for operation;

and after it, ``nn.pad`` (which integer convs with a non-zero activation zero point pad with explicitly,
passes.int8) is moved inside the permutes that ConvertLayout wrapped around it.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from pipeline.compiler.passes.relax_util import count_calls, map_relax_functions

__all__ = ["channels_last", "count_permutes"]

DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _scalar(expr: relax.Expr) -> np.ndarray | None:
    """The value of a constant with one element (a per-tensor scale or zero point), else None."""
    if not isinstance(expr, tvm.ir.GenericConst):
        return None
    value = expr.value.numpy()
    return value.reshape(1) if value.size == 1 else None


def _const(value: np.ndarray, dtype: str, like: relax.Expr) -> relax.Constant:
    """A one-element tensor of ``like``'s rank. Not a scalar: legalization writes scalars into the kernel as
    literals, which makes layers differing only in their scales distinct kernels and tuning tasks (see
    passes.int8). Not of shape [1] either: ConvertLayout's rule for binary ops keeps an operand of lower
    rank in the original layout, with permutes around the op."""
    return relax.const(np.asarray(value, dtype=dtype).reshape([1] * like.ty.ndim))


def _quantize(x: relax.Expr, scale: np.ndarray, zero: np.ndarray, out_dtype: str) -> relax.Expr:
    """clip_cast(round(x / scale) + zero, out_dtype), as TVM legalizes relax.quantize."""
    info = np.iinfo(out_dtype)
    value = relax.op.add(relax.op.round(relax.op.divide(x, _const(scale, "float32", x))),
                         _const(zero, "float32", x))
    value = relax.op.maximum(relax.op.minimum(value, _const(info.max, "float32", x)),
                             _const(info.min, "float32", x))
    return relax.op.astype(value, out_dtype)


def _dequantize(x: relax.Expr, scale: np.ndarray, zero: np.ndarray) -> relax.Expr:
    """float32(int32(x) - zero) * scale, as TVM legalizes relax.dequantize to float32."""
    shifted = relax.op.subtract(relax.op.astype(x, "int32"), _const(zero, "int32", x))
    return relax.op.multiply(relax.op.astype(shifted, "float32"), _const(scale, "float32", x))


def _bound_as_op(call: relax.Call) -> relax.Expr | None:
    """The importer's Clip with its bounds as inputs (opset >= 11: ReLU6 in most MobileNet exports) is
    ``call_tir(topi.maximum/minimum, (x, scalar bound))``, a kernel ConvertLayout can't see into: the Relax op."""
    callee, args = call.args[0], call.args[1]
    op = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}.get(callee.name_hint.rstrip("0123456789"))
    if op is None or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    x, bound = args.fields
    if not isinstance(bound, tvm.ir.GenericConst) or bound.ty.ndim != 0 or x.ty.dtype != bound.ty.dtype or \
            not tvm_ffi.structural_equal(x.ty, call.ty):
        return None
    return op(x, bound)


@relax.expr_functor.mutator
class _WithLayoutRules(relax.PyExprMutator):
    """clip and per-tensor quantize/dequantize as elementwise ops that ConvertLayout can carry through."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name = call.op.name
        if name == "relax.call_tir":
            as_op = _bound_as_op(call)
            return call if as_op is None else as_op
        if name == "relax.clip":
            dtype = str(call.ty.dtype)
            low, high = (relax.const(arg.value, dtype) for arg in call.args[1:])
            return relax.op.maximum(relax.op.minimum(call.args[0], high), low)
        if name not in ("relax.quantize", "relax.dequantize") or isinstance(call.args[0], tvm.ir.GenericConst):
            return call  # a constant's (de)quantize is folded into a constant anyway
        scale, zero = _scalar(call.args[1]), _scalar(call.args[2])
        if scale is None or zero is None:
            return call  # per channel: stays, with permutes around it
        out_dtype = str(call.attrs.out_dtype)
        if name == "relax.quantize" and out_dtype in ("int8", "uint8"):
            return _quantize(call.args[0], scale, zero, out_dtype)
        if name == "relax.dequantize" and out_dtype == "float32" and str(call.args[0].ty.dtype) in ("int8", "uint8"):
            return _dequantize(call.args[0], scale, zero)
        return call


def _pad_inside_permutes(mod: tvm.IRModule) -> tvm.IRModule:
    """permute(pad(permute(x, to NCHW), widths), to NHWC) -> pad(x, the same widths in NHWC order)."""
    inner = is_op("relax.permute_dims")(wildcard())
    pad = is_op("relax.nn.pad")(inner)
    pattern = is_op("relax.permute_dims")(pad)

    def rewrite(call: relax.Call, matched) -> relax.Expr:
        into, padded = matched[inner], matched[pad]
        axes = [[int(i) for i in p.attrs.axes] if p.attrs.axes is not None else None for p in (into, call)]
        if axes != [TO_NCHW, TO_NHWC]:
            return call
        widths = [int(w) for w in padded.attrs.pad_width]  # (before, after) per NCHW axis
        pairs = [widths[2 * axis: 2 * axis + 2] for axis in TO_NHWC]
        return relax.op.nn.pad(into.args[0], [w for pair in pairs for w in pair],
                               pad_mode=padded.attrs.pad_mode, pad_value=float(padded.attrs.pad_value))

    return map_relax_functions(mod, lambda func: relax.dpl.rewrite_call(pattern, rewrite, func))


def channels_last(mod: tvm.IRModule) -> tvm.IRModule:
    """The same network with NHWC activations and HWIO conv weights (permutes at its inputs and outputs)."""
    mod = relax.transform.FoldConstant()(mod)  # a Clip's bounds arrive as where(isnan(bound), inf, bound)
    mod = relax.transform.Normalize()(map_relax_functions(mod, _WithLayoutRules().visit_expr))
    mod = relax.transform.ConvertLayout(DESIRED_LAYOUTS)(mod)
    mod = _pad_inside_permutes(relax.transform.Normalize()(mod))
    return relax.transform.DeadCodeElimination()(relax.transform.Normalize()(mod))


def count_permutes(mod: tvm.IRModule) -> int:
    """permute_dims left at run time (those of weights and biases fold into constants)."""
    return count_calls(relax.transform.FoldConstant()(mod), lambda call: call.op.name == "relax.permute_dims")
