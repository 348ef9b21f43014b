"""exp and sigmoid for CPU kernels as vector code, not one libm call per element.

TVM 0.27 lowers ``exp`` (and ``sigmoid``, 1 / (1 + exp(-x))) to LLVM's ``llvm.exp`` intrinsic, and LLVM,
without a vector math library, turns a vector ``llvm.exp`` back into one scalar ``expf`` call per lane. On the
x86 lab device, one 1 Mi-element kernel each, vectorized 16 wide, 2 threads (bench/fast_sigmoid.py): TVM's
``exp`` 2.4 ns per element and ``sigmoid`` 2.9, these 0.28 and 0.40, a multiply 0.21. A SiLU (x * sigmoid(x))
follows every conv of a YOLOX-style detector, fused into the conv's kernel, so its cost is paid in the conv
kernels: a YOLOX int8 1x1 conv 48 -> 48 at 52x52 (12.5 MOP of dot products) took 1.14 ms, 11 GOP/s, of which
its 130 K sigmoids at 2.9 ns were ~0.38 ms.

:func:`fast_exp` is TOPI's ``fast_exp`` (Cephes' range reduction to 2^n * e^f, |f| <= ln2/2, and a degree-7
polynomial for e^f; here with ln2 in two parts, Cody-Waite), written as one expression so it inlines into
whatever kernel the op fuses with and vectorizes there: float32 relative error below 1e-7 over its range (8e-8
measured), inputs clamped to +-88.38 (where float32's exp overflows or underflows anyway). :func:`fast_math`
replaces every float32 ``relax.sigmoid`` and ``relax.exp`` of a module with a kernel computing it so; run on CPU
targets only (a GPU has its own exp).

:func:`multiply_by_reciprocal` does for requantization what onnxruntime's own int8 kernels do: a quantize,
``round(x / scale)``, divides every element (vdivps: ~10x a multiply's throughput), and an int8 network has one
or more per layer (YOLOX: conv -> Q -> DQ -> sigmoid -> Q -> DQ -> mul -> Q, all fused into the conv's kernel). With
a constant scale it becomes ``round(x * (1 / scale))``, and a constant rescale in front of it (the integer
accumulator's ``* sx*sw``) joins it as one multiplier ``sx*sw/sy``, as onnxruntime's QLinearConv requantizes
(MLAS's QuantizeLinear divides; it too multiplied by the reciprocal once, and onnx-mlir does under fast-math).
The quotient can differ in its last bit, so an element lying within that of a rounding tie can land one
quantization step away from a dividing QuantizeLinear's result.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from pipeline.compiler.passes.relax_util import map_relax_functions

__all__ = ["fast_exp", "fast_math", "fast_sigmoid", "multiply_by_reciprocal"]

_LOG2E = 1.44269504088896341
# ln2 in two parts (Cody-Waite): n * _LN2_HIGH is exact in float32 for every n in range, so e^f keeps its
# precision at large |x| (one-part ln2, as TOPI has it, errs by 4e-6 relative near +-87).
_LN2_HIGH, _LN2_LOW = 0.693359375, -2.12194440e-4
_CLAMP = 88.3762626647950  # beyond it float32 exp is inf / 0 anyway
# Cephes' expf polynomial for e^f on |f| <= ln2/2, highest degree first (TOPI's fast_exp_float32).
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 expression: 2^n from the exponent bits, e^f from a polynomial; no calls, no branches."""
    x = tirx.max(tirx.min(x, _f32(_CLAMP)), _f32(-_CLAMP))
    n = tirx.floor(x * _f32(_LOG2E) + _f32(0.5))
    f = x - n * _f32(_LN2_HIGH) - n * _f32(_LN2_LOW)
    poly = _f32(_POLY[0])
    for c in _POLY[1:]:
        poly = poly * f + _f32(c)
    e_f = poly * f * f + f + _f32(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left((n + _f32(127.0)).astype("int32"), tirx.const(23, "int32")))
    return two_n * e_f


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """1 / (1 + e^-x), through :func:`fast_exp` (saturates cleanly: 0 and 1 at the clamps)."""
    return _f32(1.0) / (_f32(1.0) + fast_exp(-x))


_REPLACED = {"relax.sigmoid": ("fast_sigmoid", fast_sigmoid), "relax.exp": ("fast_exp", fast_exp)}


def _elementwise(name: str, scalar):
    def compute(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *i: scalar(x(*i)), name=name)
    return compute


def fast_math(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with every float32 sigmoid/exp computed by :func:`fast_sigmoid`/:func:`fast_exp` kernels (which
    fuse like the ops they replace: elementwise), and how many calls were replaced."""
    replaced = 0

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            nonlocal replaced
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _REPLACED) or \
                    str(call.args[0].ty.dtype) != "float32":
                return call
            name, scalar = _REPLACED[call.op.name]
            replaced += 1
            return self.builder_.call_te(_elementwise(name, scalar), call.args[0], primfunc_name_hint=name)

    rewrite = Rewrite(mod)
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewrite.builder_.update_func(gvar, rewrite.visit_expr(func))
    return relax.transform.Normalize()(rewrite.builder_.get()), replaced


def multiply_by_reciprocal(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with every ``round(x / c)`` of a constant float32 ``c`` (a quantize) computed as ``round(x * (1/c))``,
    folding a constant multiply of x (a rescale) into that multiplier; and how many were rewritten."""
    value, scale, rescaled, factor = wildcard(), is_const(), wildcard(), is_const()
    folded = is_op("relax.round")(is_op("relax.divide")(is_op("relax.multiply")(rescaled, factor), scale))
    plain = is_op("relax.round")(is_op("relax.divide")(value, scale))
    rewritten = 0

    def constant(expr: tvm.ir.GenericConst) -> np.ndarray | None:
        array = expr.value.numpy()
        return array if array.dtype == np.float32 else None

    def rewrite_folded(call: relax.Call, matched) -> relax.Expr:
        nonlocal rewritten
        c, a = constant(matched[scale]), constant(matched[factor])
        if c is None or a is None or c.size != 1:
            return call
        rewritten += 1
        multiplier = (a * (np.float32(1) / c)).astype(np.float32)  # float32 throughout, as onnxruntime computes it
        return relax.op.round(relax.op.multiply(matched[rescaled], relax.const(multiplier)))

    def rewrite_plain(call: relax.Call, matched) -> relax.Expr:
        nonlocal rewritten
        c = constant(matched[scale])
        if c is None:
            return call
        rewritten += 1
        return relax.op.round(relax.op.multiply(matched[value], relax.const(np.float32(1) / c)))

    mod = relax.transform.FoldConstant()(mod)  # ConvertLayout leaves the scales as permute_dims(constant)
    mod = map_relax_functions(mod, lambda func: relax.dpl.rewrite_call(folded, rewrite_folded, func))
    mod = map_relax_functions(mod, lambda func: relax.dpl.rewrite_call(plain, rewrite_plain, func))
    return relax.transform.DeadCodeElimination()(relax.transform.Normalize()(mod)), rewritten
