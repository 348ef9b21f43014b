"""Integer kernels for QDQ models in TVM Relax: turn fake-quant conv2d/matmul into int8 x int8 -> int32.

TVM 0.27's ONNX importer maps DequantizeLinear/QuantizeLinear to ``R.dequantize``/``R.quantize`` and keeps
every Conv/Gemm/MatMul in float, so a QDQ model computes exactly what the fp32 model computes (plus the
rounding): as slow as fp32. :func:`integerize` rewrites, before any constant folding,

    [add(] conv2d(dequantize(xq, sx, zx), dequantize(Wq, sw, 0)) [, dequantize(bq, sx*sw, 0))]       (Conv)
    [add(] matmul(dequantize(xq, sx, zx), [permute_dims](dequantize(Wq, sw, 0))) [, ...bias)]  (MatMul, Gemm)

into

    acc = conv2d(xq, Wq, out_dtype="int32")               # the heavy op: 8-bit inputs, 32-bit accumulation
    y   = float32(acc + bq - zx * sum(Wq)) * (sx * sw)    # bias and zero-point term in int32 (exact), rescale

onnxruntime quantizes a bias to int32 with scale sx*sw, i.e. in the accumulator's units, so it is added
before the rescale, as its own QLinearConv does; a bias with any other scale stays a float add after ``y``.
``y`` is the float tensor the original op produced, so what follows is untouched: usually the next layer's
``quantize``. TVM fuses subtract/astype/multiply/quantize into the conv's epilogue, which makes the chain
int8 -> int32 accumulate -> rescale -> requantize to the next int8 tensor into one kernel.

Zero points: weights must be symmetric (zero point 0, what onnxruntime writes for QInt8 weights); the
activation zero point may be anything. A uint8 activation with zx != 0 stays uint8 (uint8 x int8 is also
the operand pair x86 VNNI's vpdpbusd multiplies) and its zero point is subtracted afterwards as the
constant conv(zx, W) = zx * sum(W) per output channel. That identity only holds where every input the
window sees is a real pixel: the float conv pads with 0.0, which in the quantized domain is the value zx,
not 0. So a padded conv with zx != 0 pads explicitly with zx first and convolves unpadded. (The
alternative, subtracting zx in int16/int32 before the conv, is exact too but doubles or quadruples the
bytes moved and gives up the 8-bit dot-product instructions.)

Left in float: every other op (pooling, activations, residual adds, ...) and every conv/matmul whose
weights are not constant symmetric int8 or whose activation scale is not per tensor. With ``narrow_convs_in_float``
(CPU targets), also every conv that sums fewer than 4 input channels per output (depthwise convs, a stem on 3
colour channels): 8-bit arithmetic pays through the dot-product instructions (vpdpbusd, vpmaddubsw, ARM sdot),
which multiply 4 (or 2) adjacent input channels and add them into one int32; a conv with nothing to sum over
channels gets none of that and pays for widening every byte to int32 and for the zero-point padding instead.
Measured, tuned, PP-LCNet on the x86 lab device: a 3x3 depthwise conv 90 us in int8 vs 34 us in float, the
3-channel stem 579 vs 108 us, and the input's quantize+pad kernel 1.4 ms (docs/lab-x86/channels-last.md). Such a
conv computes in float on the dequantized tensor, exactly what onnxruntime's QDQ graph describes, and the
quantize after it still makes the next layer's int8 input. On CPU targets :func:`drop_float_round_trips` then
removes the quantize -> dequantize pairs that only float ops read: 8-bit rounding where an integer kernel reads
the tensor, nowhere else.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from pipeline.compiler.passes.dot import DotKernels, DotLayout, count_dot_ops, exact, fits
from pipeline.compiler.passes.relax_util import count_calls, map_relax_functions

__all__ = ["count_integer_ops", "drop_float_round_trips", "integerize"]

_INT8 = ("int8", "uint8")
_FLOAT_OUT = ("None", "", "void", "float32")  # out_dtype unset (the importer's choice: the input's) or float32


def _const(expr: relax.Expr) -> np.ndarray:
    return expr.value.numpy()  # TVM 0.27 constants are tvm.ir.GenericConst (the tensor in .value)


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _per_channel(scale: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """The dequantize scale broadcast to the weight's full shape (``axis`` is ignored for a scalar)."""
    if scale.size == 1:
        return np.full(shape, scale.reshape(()), np.float32)
    view = [1] * len(shape)
    view[axis] = scale.size
    return np.broadcast_to(scale.reshape(view), shape)


def _weight(dq: relax.Call) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weights, their per-element float scale) of a constant symmetric dequantize, else None."""
    wq, scale, zero = (_const(a) for a in dq.args)
    if wq.dtype != np.int8 or np.any(zero != 0):
        return None
    return wq, _per_channel(scale.astype(np.float32), int(dq.attrs.axis), wq.shape)


def _activation(dq: relax.Call) -> tuple[relax.Expr, float, int] | None:
    """(int8/uint8 tensor, scale, zero point) of a per-tensor dequantize of a computed tensor, else None."""
    xq, scale, zero = dq.args
    if _dtype(xq) not in _INT8 or _const(scale).size != 1 or _const(zero).size != 1:
        return None
    return xq, float(_const(scale).reshape(())), int(_const(zero).reshape(()))


def _uniform(scale: np.ndarray, axes: tuple[int, ...]) -> np.ndarray | None:
    """The scale as one value per output channel if it doesn't vary over ``axes`` (the reduced ones)."""
    first = scale[tuple(slice(0, 1) if i in axes else slice(None) for i in range(scale.ndim))]
    return first if np.all(scale == first) else None


def _bias(b_dq: relax.Call, scale: np.ndarray) -> np.ndarray | None:
    """The int32 bias as-is when its dequantize scale is the accumulator's (sx*sw, what onnxruntime writes)."""
    bq, sb, zb = (_const(a) for a in b_dq.args)
    if bq.dtype != np.int32 or np.any(zb != 0) or bq.size != scale.size or \
            not np.allclose(np.broadcast_to(sb, scale.shape), scale, rtol=1e-5, atol=0):
        return None
    return bq.astype(np.int64).reshape(scale.shape)


def _static_shape(expr: relax.Expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr) or \
            not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return None
    return [int(d) for d in ty.shape.values]


# vpdpbusd and ARM's sdot multiply 4 adjacent bytes and add them into one int32 lane.
DOT_PRODUCT_CHANNELS = 4


def _conv(call: relax.Call, x_dq: relax.Call, w_dq: relax.Call, narrow_in_float: bool = False
          ) -> tuple[relax.Expr, ...] | None:
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") or \
            str(a.out_dtype) not in _FLOAT_OUT:
        return None
    act, weight = _activation(x_dq), _weight(w_dq)
    if act is None or weight is None:
        return None
    xq, sx, zx = act
    wq, sw = weight
    if narrow_in_float and wq.shape[1] < DOT_PRODUCT_CHANNELS:  # OIHW: I = input channels per group
        return None
    sw_out = _uniform(sw, (1, 2, 3))  # [O,1,1,1]: one scale per output channel
    if sw_out is None:
        return None
    padding = [int(p) for p in a.padding]  # top, left, bottom, right
    if zx != 0 and any(padding):
        top, left, bottom, right = padding
        xq = relax.op.nn.pad(xq, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx))
        padding = [0, 0, 0, 0]
    acc = relax.op.nn.conv2d(xq, relax.const(wq), strides=a.strides, padding=padding, dilation=a.dilation,
                             groups=a.groups, out_dtype="int32")
    # conv(zx, W)[o] = zx * sum of W[o] over its input channels and window.
    return acc, zx * wq.astype(np.int64).sum(axis=(1, 2, 3)), sx * sw_out.reshape(-1), (1, -1, 1, 1)


def _matmul(call: relax.Call, x_dq: relax.Call, w_dq: relax.Call, perm: relax.Call | None,
            dot: DotKernels | None = None) -> tuple | None:
    if str(call.attrs.out_dtype) not in _FLOAT_OUT:
        return None
    act, weight = _activation(x_dq), _weight(w_dq)
    if act is None or weight is None or weight[0].ndim != 2:
        return None
    xq, sx, zx = act
    wq, sw = weight
    if perm is not None:  # Gemm with transB: the importer transposes the [N,K] weight; do it on the constant
        axes = None if perm.attrs.axes is None else [int(i) for i in perm.attrs.axes]
        wq, sw = np.ascontiguousarray(np.transpose(wq, axes)), np.transpose(sw, axes)
    sw_out = _uniform(sw, (0,))  # weight is [K,N]: one scale per output column
    if sw_out is None:
        return None
    shape = _static_shape(xq)
    if dot and shape is not None and len(shape) == 2 and dot.layout.reads(_dtype(xq)) and \
            fits(*wq.shape, dot.layout) and exact(wq.T, dot.layout):  # weight [K,N] -> [N,K] rows to pack
        acc = dot.call(xq, _dtype(xq), (shape[0],), np.ascontiguousarray(wq.T))
    else:
        acc = relax.op.matmul(xq, relax.const(wq), out_dtype="int32")
    return acc, zx * wq.astype(np.int64).sum(axis=0), sx * sw_out.reshape(-1), (-1,)


def _patterns() -> dict[str, DFPattern]:
    p = {"x_dq": is_op("relax.dequantize")(wildcard(), is_const(), is_const()),
         "w_dq": is_op("relax.dequantize")(is_const(), is_const(), is_const()),
         "b_dq": is_op("relax.dequantize")(is_const(), is_const(), is_const())}
    p["w_t"] = is_op("relax.permute_dims")(p["w_dq"])
    p["conv"] = is_op("relax.nn.conv2d")(p["x_dq"], p["w_dq"])
    p["matmul"] = is_op("relax.matmul")(p["x_dq"], p["w_dq"] | p["w_t"])
    # The importer adds a Conv's bias as reshape(bias, [1,O,1,1]), a Gemm's as is.
    bias = is_op("relax.reshape")(p["b_dq"], wildcard()) | p["b_dq"]
    p["with_bias"] = is_op("relax.add")(p["conv"] | p["matmul"], bias)
    p["without_bias"] = p["conv"] | p["matmul"]
    return p


def count_integer_ops(mod: tvm.IRModule) -> int:
    """conv2d/matmul calls in the Relax functions that take 8-bit inputs and accumulate in int32."""
    return count_calls(mod, lambda call: call.op.name in ("relax.nn.conv2d", "relax.matmul")
                       and str(call.attrs.out_dtype) == "int32" and all(_dtype(arg) in _INT8 for arg in call.args))


@relax.expr_functor.mutator
class _QuantParamsAsTensors(relax.PyExprMutator):
    """A scalar scale or zero point of a quantize/dequantize becomes a one-element tensor.

    TVM's legalization writes a scalar constant into the kernel as a literal, so layers that differ only in
    their scales (every layer: each has its own) become distinct kernels, and MetaSchedule tunes each apart:
    PP-LCNet's five identical depthwise convs were five tuning tasks. Read from a one-element buffer, the
    value is the same float (same division, same rounding) and identical layers share one kernel."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.quantize", "relax.dequantize")) or \
                isinstance(call.args[0], tvm.ir.GenericConst):  # a constant's (de)quantize is folded anyway
            return call
        scalars = [i for i, arg in enumerate(call.args)
                   if i and isinstance(arg, tvm.ir.GenericConst) and _const(arg).ndim == 0]
        if not scalars:
            return call
        args = [relax.const(_const(arg).reshape(1)) if i in scalars else arg for i, arg in enumerate(call.args)]
        return relax.Call(call.op, args, call.attrs)


def integerize(mod: tvm.IRModule, *, dot: DotLayout | None = None, narrow_convs_in_float: bool = False
               ) -> tuple[tvm.IRModule, int]:
    """Rewrite QDQ conv2d/matmul into integer ones; returns the new module and how many ops became integer.
    With ``narrow_convs_in_float``, convs over fewer than 4 input channels per group stay float (see above).
    With ``dot`` (VNNI or SDOT), matmuls that fit become kernels laid out for that dot-product instruction
    (passes.dot); convs do once the network is channel-last (``passes.dot.dot_convs``).

    Run it on what ``relax.frontend.onnx.from_onnx(..., keep_params_in_input=False)`` returns, before
    ``FoldConstant`` (which turns the int8 weights' dequantize into plain float constants).
    """
    p = _patterns()
    kernels = DotKernels(dot) if dot else None

    def rewriter(orig: relax.Call, matched) -> relax.Expr:
        if p["conv"] in matched:
            core = _conv(matched[p["conv"]], matched[p["x_dq"]], matched[p["w_dq"]], narrow_convs_in_float)
        else:
            core = _matmul(matched[p["matmul"]], matched[p["x_dq"]], matched[p["w_dq"]], matched.get(p["w_t"]),
                           kernels)
        if core is None:
            return orig  # returning the call unchanged leaves it in float
        acc, correction, scale, shape = core
        if p["b_dq"] in matched:
            # An int32 bias quantized with scale sx*sw is in the accumulator's units: add it there, exactly,
            # as onnxruntime's QLinearConv does. Any other bias: leave the add to the bias-less pass.
            bias = _bias(matched[p["b_dq"]], scale)
            if bias is None:
                return orig
            correction = correction - bias
        # Zero-point term and bias are subtracted while still in int32 (exact); then one float multiply.
        if np.any(correction != 0):
            acc = relax.op.subtract(acc, relax.const(correction.reshape(shape).astype(np.int32)))
        return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.reshape(shape).astype(np.float32)))

    before = count_integer_ops(mod) + count_dot_ops(mod)
    out = mod
    # With-bias first: once a conv is rewritten alone, its bias add no longer matches.
    for pattern in (p["with_bias"], p["without_bias"]):
        out = map_relax_functions(out, functools.partial(relax.dpl.rewrite_call, pattern, rewriter))
        # Drop what the rewrite orphaned (the weights' float dequantize, a bias-less conv a bias add fed on).
        out = relax.transform.DeadCodeElimination()(out)
    if kernels:
        out = kernels.added_to(out)
    out = map_relax_functions(out, _QuantParamsAsTensors().visit_expr)
    return out, count_integer_ops(out) + count_dot_ops(out) - before


def drop_float_round_trips(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``dequantize(quantize(x, s, z), s, z)`` becomes ``clip(x, (qmin - z) * s, (qmax - z) * s)`` wherever it is still
    there after :func:`integerize`: the clamp stays, the rounding goes.

    An integer kernel reads the 8-bit tensor ``quantize`` makes, not the dequantized one, so what is left of such a
    round trip feeds only float ops: the activations between layers (PP-LCNet's HardSwish, exported as
    x * HardSigmoid(x), is conv -> Q -> DQ -> HardSigmoid -> Q -> DQ -> Mul -> Q -> DQ -> next conv), the convs kept in
    float, residual adds, the network's output. In onnxruntime each pair is what tells its kernels which ops to run
    in 8 bits; in the compiled network it computes a rounding and a clamp, six operations per element, in every
    conv's epilogue (PP-LCNet: three per layer). The clamp must stay: onnxruntime's quantizer removes a Relu (or a
    Clip) in front of a QuantizeLinear whose range already starts at 0, so the pair's clamp IS that ReLU (the digits
    CNN's top-1 fell from 99 % to 71 % without it). The rounding goes: the float ops compute on unrounded values, and
    only the tensors an integer kernel reads are rounded to 8 bits; with fewer roundings the outputs lie closer to
    fp32's than onnxruntime's int8 outputs do (no longer within one quantization step of them). Per-tensor pairs
    only. Returns the module and how many round trips lost their rounding.
    """
    quantize = is_op("relax.quantize")(wildcard(), is_const(), is_const())
    round_trip = is_op("relax.dequantize")(quantize, is_const(), is_const())
    dropped = 0

    def scalar(expr: relax.Expr) -> np.ndarray | None:
        value = _const(expr)
        return value.reshape(()) if value.size == 1 else None

    def rewriter(orig: relax.Call, matched) -> relax.Expr:
        nonlocal dropped
        q, dq = matched[quantize], matched[round_trip]
        x, scale, zero = q.args[0], scalar(q.args[1]), scalar(q.args[2])
        if scale is None or zero is None or scale != scalar(dq.args[1]) or zero != scalar(dq.args[2]) or \
                _dtype(q) not in _INT8 or _dtype(x) != "float32" or _dtype(dq) != "float32":
            return orig  # per-axis, a requantize into other units, or another type: left as it is
        info = np.iinfo(_dtype(q))
        low, high = ((np.float32(bound) - np.float32(zero)) * np.float32(scale) for bound in (info.min, info.max))
        dropped += 1
        return relax.op.minimum(relax.op.maximum(x, relax.const(low, "float32")), relax.const(high, "float32"))

    out = map_relax_functions(mod, functools.partial(relax.dpl.rewrite_call, round_trip, rewriter))
    return relax.transform.DeadCodeElimination()(out), dropped
