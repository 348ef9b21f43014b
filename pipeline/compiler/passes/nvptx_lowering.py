"""Lowering rules TVM 0.27 lacks for LLVM's NVPTX backend (LLVM 22 in the apache-tvm wheel), registered for the
``nvptx`` target only, above TVM's own.

float16 math: TVM lowers ``exp``, ``tanh``, ``sqrt``, ``floor``, ... to libdevice calls (``__nv_expf``, ``__nv_exp``),
and libdevice has float32 and float64 versions only: TVM stops an fp16 model's build with "Only support float32 or
float64" at the first SiLU of a YOLO model. CUDA C has the same gap and fills it the same way (``hexp`` converts to
float, calls ``expf``, converts back): a Maxwell GPU's fp16 gain is in its half2 multiply-adds, not in its special-
function unit, which works in float32 anyway. float32/float64 stay exactly as TVM had them.

The block barrier: TVM emits ``llvm.nvvm.barrier.cta.sync.aligned.all()`` without the barrier number that intrinsic
takes since LLVM 21, and LLVM's verifier rejects every kernel with a shared-memory reduction.
"""

from __future__ import annotations

import functools

from tvm import tirx

# The ops TVM's nvptx rules send to libdevice (src/backend/cuda/codegen/llvm/intrin_rule_nvptx.cc).
LIBDEVICE_OPS = ("floor", "ceil", "round", "nearbyint", "trunc", "fabs", "exp", "exp2", "exp10", "erf", "fma", "log",
                 "log2", "log10", "sqrt", "pow", "tanh", "tan", "cos", "cosh", "sin", "sinh", "atan")
_LEVEL = 30  # above the builtin rules' 10: ours decide for nvptx


def _libdevice(name: str, call: tirx.Call) -> tirx.PrimExpr:
    dtype = str(call.ty.dtype)
    if dtype == "float16":
        args = [tirx.Cast("float32", arg) for arg in call.args]
        return tirx.Cast("float16", tirx.call_pure_extern("float32", f"__nv_{name}f", *args))
    if dtype not in ("float32", "float64"):
        return call  # TVM's own rule says what is wrong
    return tirx.call_pure_extern(dtype, f"__nv_{name}{'f' if dtype == 'float32' else ''}", *call.args)


@functools.cache
def register_nvptx_lowering() -> None:
    """Once per process: float16 through float32 for every libdevice op, and the barrier with its argument."""
    for name in LIBDEVICE_OPS:
        tirx.op.register_intrin_lowering(f"tirx.{name}", "nvptx", f=functools.partial(_libdevice, name), level=_LEVEL)
    tirx.op.register_intrin_lowering("tirx.tvm_storage_sync", "nvptx", f=_barrier, level=_LEVEL)


def _barrier(call: tirx.Call) -> tirx.PrimExpr:
    """``__syncthreads()`` as LLVM 21 spells it: barrier 0 of the block."""
    scope = getattr(call.args[0], "value", "")
    if scope not in ("shared", "shared.dyn"):
        return call
    return tirx.call_llvm_intrin("void", "llvm.nvvm.barrier.cta.sync.aligned.all", tirx.const(0, "int32"))
