"""The module as MetaSchedule sees it: Relax decomposed for inference, lowered to TIR and fused into kernels
exactly as compile_relax does (tuning.search tunes those kernels, tuning.defaults schedules them), and its logger
made safe to configure again."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import tvm


def register_cpu_rules(target: tvm.target.Target) -> None:
    """What TVM must know before it lowers, schedules or tunes a module for the CPU ``target``: the target's tensor
    intrinsics only (compiler.intrinsics: before MetaSchedule imports every target's), the Winograd transforms' and
    max pooling's schedule rules (passes.winograd, passes.pooling), and that every int8 epilogue's round vectorizes
    (passes.epilogue). Registered once per process."""
    from pipeline.compiler.intrinsics import load_tensor_intrinsics
    from pipeline.compiler.passes.epilogue import make_rounding_vectorizable
    from pipeline.compiler.passes.pooling import register_pool_rule
    from pipeline.compiler.passes.winograd import register_schedule_rules

    load_tensor_intrinsics(target)
    register_schedule_rules()
    register_pool_rule()
    make_rounding_vectorizable()


def decompose(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops only (batch norm etc. decomposed for inference): what MetaSchedule's compile_relax fuses itself."""
    from tvm import relax

    with target:
        return tvm.ir.transform.Sequential([
            relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()])(mod)


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Lower Relax ops to TIR and fuse them, exactly as compile_relax does before it applies the database."""
    from tvm import relax

    with target:
        return tvm.ir.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)


def fused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The kernels both MetaSchedule (tasks to tune) and dlight (to bind to GPU threads) work on."""
    return fuse(decompose(mod, target), target)


@contextlib.contextmanager
def unnamed_handlers_detached(name: str = "tvm.s_tir.meta_schedule") -> Iterator[None]:
    """MetaSchedule configures its logger again on every run by listing that logger's handlers BY NAME, and fails
    on one without a name ('NoneType' object has no attribute 'format'): pytest >= 9 attaches its capture handlers
    to every non-propagating logger, so a second tuning in one test session broke. Detach those meanwhile."""
    logger = logging.getLogger(name)
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)
