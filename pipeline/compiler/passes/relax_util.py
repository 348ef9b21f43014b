"""What the Relax passes share: walking and rewriting a module's Relax functions, counting operator calls, adding
the TIR kernels a rewrite calls, and registering MetaSchedule rules for them safely."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax


def int64_shape(shape: tuple[int, ...]) -> list[tvm.tirx.IntImm]:
    """int64 extents, as Relax's own kernels have: FuseTIR refuses to fuse a kernel whose output buffer is
    [1, 16] int32-indexed into an epilogue that reads the same tensor as [1, 16] int64-indexed."""
    return [tvm.tirx.const(d, "int64") for d in shape]


class KernelSet:
    """PrimFuncs a rewrite calls, one per shape, to be added to the module."""

    def __init__(self) -> None:
        self._builder = relax.BlockBuilder()  # gives each kernel's GlobalVar its function type
        self._by_shape: dict[tuple, tvm.ir.GlobalVar] = {}

    def _kernel(self, key: tuple, make: Callable[[], tvm.tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        gvar = self._by_shape.get(key)
        if gvar is None:
            kernel = make()
            gvar = self._by_shape[key] = self._builder.add_func(kernel, kernel.attrs["global_symbol"])
        return gvar

    def _prepare(self) -> None:
        """What building the kernels needs registered in this process (tensor intrinsics, schedule rules)."""

    def added_to(self, mod: tvm.IRModule) -> tvm.IRModule:
        """``mod`` (whose Relax functions call these kernels) with the kernels in it."""
        if not self._by_shape:
            return mod
        self._prepare()
        return tvm.IRModule({**dict(mod.functions.items()), **dict(self._builder.get().functions.items())},
                            attrs=mod.attrs)


def count_calls(mod: tvm.IRModule, wanted: Callable[[relax.Call], bool]) -> int:
    """Calls of an operator (``wanted(call)``) in the module's Relax functions."""
    found = 0

    def visit(expr: relax.Expr) -> None:
        nonlocal found
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and wanted(expr):
            found += 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def map_relax_functions(mod: tvm.IRModule, rewrite: Callable[[relax.Function], relax.Function]) -> tvm.IRModule:
    """The module with ``rewrite`` applied to each of its Relax functions (its TIR kernels as they are)."""
    return tvm.IRModule({gvar: rewrite(func) if isinstance(func, relax.Function) else func
                         for gvar, func in mod.functions.items()}, attrs=mod.attrs)


def static_nhwc_batch_one(x: relax.Expr) -> tuple[int, int, int, int] | None:
    """The shape of a conv's input if it is a known [1, H, W, C], else None (a dynamic or batched input)."""
    shape = x.ty.shape if isinstance(x.ty, relax.TensorType) else None
    if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != 4 or \
            not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values) or int(shape.values[0]) != 1:
        return None
    return tuple(int(d) for d in shape.values)


def transposed_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every permute_dims of a constant replaced by the constant transposed in numpy. Relax's FoldConstant
    builds and runs a kernel for each one it folds: YOLOX's 332 int8 weights took 20 of its 25 s of import."""
    @relax.expr_functor.mutator
    class Transpose(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.permute_dims"
                    and isinstance(call.args[0], tvm.ir.GenericConst)):
                return call
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            return relax.const(np.ascontiguousarray(np.transpose(call.args[0].value.numpy(), axes)))

    return map_relax_functions(mod, Transpose().visit_expr)


def rewrite_convs(mod: tvm.IRModule, kernels: KernelSet,
                  rewrite: Callable[[relax.Call], relax.Expr | None]) -> tvm.IRModule:
    """``mod`` with each conv2d call replaced by what ``rewrite`` makes of it (None: left as it is), and the
    ``kernels`` those calls use added to it."""
    # ConvertLayout left each weight as permute_dims(OIHW constant)
    mod = relax.transform.FoldConstant()(transposed_constants(mod))

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            replaced = rewrite(call)
            return call if replaced is None else replaced

    return relax.transform.Normalize()(kernels.added_to(map_relax_functions(mod, Rewrite().visit_expr)))


def falling_back(rule: Callable, what: str, *, generic: bool = False) -> Callable:
    """``rule`` (a MetaSchedule schedule rule: schedule, block -> schedules) such that, should it fail on a kernel it
    was not written for, it leaves that kernel unscheduled (slow, still right) instead of ending the build or the
    tuning run: MetaSchedule calls rules inside its search. ``generic``: to MetaSchedule's generic rules instead
    (they skip a block while it names a rule of its own). ``what``: the rule's name in the warning."""
    @functools.wraps(rule)
    def safe(sch, block):
        try:
            return rule(sch.copy(), block)
        except Exception as exc:  # noqa: BLE001 (any failure of a schedule primitive)
            logging.getLogger(rule.__module__).warning(
                "%s schedule rule %s failed on %s (left %s): %s", what, rule.__name__,
                sch.mod.get_global_vars()[0].name_hint, "to the generic rules" if generic else "unscheduled",
                str(exc).strip().splitlines()[-1:])
            if generic:
                sch.unannotate(block, "schedule_rule")
            return [sch]

    return safe
