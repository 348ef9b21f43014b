"""The max-pooling schedule rule (pipeline/compiler/passes/pooling.py): TVM registers none for CPUs, so a pool kept
a scalar loop nest, untuned and tuned; the rule vectorizes its channels and computes what the plain kernel does."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pipeline.compiler.passes.pooling import register_pool_rule, schedule_pool
from pipeline.compiler.tuning.defaults import default_schedules
from pipeline.compiler.tuning.lowering import fused

TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _pool_module(shape: tuple[int, ...], size: int, stride: int, padding: int) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.max_pool2d(x, pool_size=size, strides=stride, padding=padding,
                                                             layout="NHWC"))
        builder.emit_func_output(out)
    return builder.get()


def _out_shape(shape: tuple[int, ...], size: int, stride: int, padding: int) -> tuple[int, ...]:
    n, h, w, c = shape
    return n, (h + 2 * padding - size) // stride + 1, (w + 2 * padding - size) // stride + 1, c


def _kernel(mod: tvm.IRModule) -> tvm.IRModule:
    lowered = fused(mod, tvm.target.Target(TARGET))
    (gvar,) = [g for g in lowered.get_global_vars() if "pool" in g.name_hint]
    return tvm.IRModule({"main": lowered[gvar].with_attr("global_symbol", "main")})


@pytest.mark.parametrize(("shape", "size", "stride", "padding"), [
    ((1, 13, 13, 192), 13, 1, 6),  # YOLOX's widest spatial pyramid pool
    ((1, 9, 9, 24), 3, 2, 1),  # strided, 24 channels (8-wide vectors)
    ((1, 6, 6, 3), 2, 2, 0),  # 3 channels: no vector divides them, still scheduled and right
])
def test_the_rule_vectorizes_the_channels_and_computes_the_plain_kernels_result(shape, size, stride, padding):
    kernel = _kernel(_pool_module(shape, size, stride, padding))
    sch = tvm.s_tir.Schedule(kernel)
    (scheduled,) = schedule_pool(sch, sch.get_sblock("pool_max"))
    if shape[-1] % 8 == 0:
        assert "T.vectorized" in scheduled.mod.script()
    assert "meta_schedule.parallel" in scheduled.mod.script()  # the postprocessing runs the pixels in parallel
    target = tvm.target.Target(TARGET)
    outputs = []
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    for module in (kernel, scheduled.mod):
        library = tvm.compile(module, target=target)
        result = tvm.runtime.tensor(np.zeros(_out_shape(shape, size, stride, padding), "float32"))
        library["main"](tvm.runtime.tensor(x), result)
        outputs.append(result.numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize(("shape", "size"), [
    ((1, 13, 13, 192), 5),  # parallel (over PARALLEL_MIN_FLOPS)
    ((1, 8, 8, 32), 2),  # the digits CNN's: too small to wake the thread pool for, serial
])
def test_an_untuned_build_schedules_its_pools_with_the_rule_and_computes_the_same(shape, size):
    """Through MetaSchedule's design space and postprocessing, as default_schedules builds every kernel: the
    pool's record is the rule's (reordered, no rfactor), and the library computes what the plain build does."""
    from tvm.s_tir import meta_schedule as ms

    register_pool_rule()
    target = tvm.target.Target(TARGET)
    mod = _pool_module(shape, size, 1, size // 2)
    database, scheduled, kernels, _ = default_schedules(mod, target, lanes=8)
    assert scheduled == kernels >= 1
    traces = [str(record.trace) for record in database.get_all_tuning_records()]
    assert any("pool_max" in trace and "sch.reorder(" in trace and "rfactor" not in trace for trace in traces)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    outputs = []
    for library in (tvm.compile(mod, target=target), ms.relax_integration.compile_relax(database, mod, target, None)):
        vm = relax.VirtualMachine(library, tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_pool_the_rule_was_not_written_for_goes_to_the_generic_rules():
    """A 1-D pool (4 loops): MetaSchedule's generic rules schedule it, as before the rule (not left unscheduled)."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 16), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.max_pool1d(x, pool_size=3, padding=1, layout="NWC"))
        builder.emit_func_output(out)
    register_pool_rule()
    database, scheduled, kernels, _ = default_schedules(builder.get(), tvm.target.Target(TARGET), lanes=8)
    assert scheduled == kernels >= 1
    traces = [str(record.trace) for record in database.get_all_tuning_records()]
    assert any("pool_max" in trace and "sch.reorder(" not in trace for trace in traces)
