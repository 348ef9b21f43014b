"""Default schedules (pipeline/compiler/tuning/defaults.py): an untuned CPU build gets a vectorised, tiled,
parallel schedule for every kernel without measuring anything, and computes what TVM's plain build computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from pipeline.compiler.build import _cpu_build
from pipeline.compiler.frontend import relax_module, resolve_target
from pipeline.compiler.tuning.defaults import (
    ACCUMULATORS,
    PARALLEL_MIN_FLOPS,
    _blocks,
    decided,
    register_block,
    serial,
    vector_lanes,
)
from pipeline.compiler.tuning.lowering import fused
from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig, QuantizedModel, quantize
from pipeline.workloads import WORKLOADS
from targets.hashing import sha256_file
from targets.profiles import load_profile


def _module(tmp_path: Path, scheme: str = "fp32", profile_name: str = "local"):
    digits = WORKLOADS["digits-cnn"]
    info = ingest(digits.model_path(), tmp_path / "ingest")
    if scheme == "int8":  # 7-bit weights, as the checks choose for vpmaddubsw (x86 without VNNI)
        config = QuantConfig(scheme="int8", reduce_range=True)
        quantized = quantize(Path(info.prepared_path), tmp_path, config, digits.calibration(32))
    else:
        quantized = QuantizedModel(path=info.prepared_path, sha256=sha256_file(Path(info.prepared_path)),
                                   config=QuantConfig(scheme="fp32"))
    profile = load_profile(profile_name)
    mod, _ = relax_module(quantized, info, profile)
    return mod, resolve_target(profile), profile, digits.evaluation(16).inputs["image"]


def _run(executable, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])


def _padded_conv_context(target: tvm.target.Target, epilogue: bool = False, side: int = 16):
    """MetaSchedule's tuning context for a padded 3x3 NHWC conv kernel, 32 -> 64 channels at ``side`` x ``side``
    (``epilogue``: + bias, ReLU)."""
    from tvm.s_tir import meta_schedule as ms

    conv = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, side, side, 32), "float32"))
    w = relax.Var("w", relax.TensorType((64, 3, 3, 32), "float32"))
    b = relax.Var("b", relax.TensorType((64,), "float32"))
    with conv.function("main", [x, w, b]):
        with conv.dataflow():
            out = conv.emit(relax.op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="OHWI"))
            if epilogue:
                out = conv.emit(relax.op.nn.relu(relax.op.add(out, b)))
            out = conv.emit_output(out)
        conv.emit_func_output(out)
    (task,) = [t for t in ms.relax_integration.extract_tasks(fused(conv.get(), target), target)
               if "conv2d" in t.task_name]
    return ms.TuneContext(mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                          search_strategy="replay-trace", rand_state=1)


def test_the_decisions_tile_the_output_channels_by_the_vector_lanes():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    context = _padded_conv_context(target)
    space = context.generate_design_space()[0].trace.simplified(remove_postproc=True)
    _, spatial_extents = _blocks(space)
    assert spatial_extents == {next(iter(spatial_extents)): [1, 16, 16, 64]}  # one tiled block, found by its loops
    assert next(iter(spatial_extents)) >= 0
    trace = decided(space, lanes=16)
    tiles = [[int(v) for v in trace.decisions[inst]] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
    spatial = [t for t in tiles if len(t) == 4]
    assert spatial[-1] == [2, 1, 1, 32]  # 64 output channels: 2 vectors of 16 lanes in registers, innermost
    assert spatial[-2] == [4, 1, 4, 1]  # 16 columns: 4 in registers at a time (8 accumulators)
    assert all(t[1:] == [1, 1, 1] for t in spatial[:-2])  # the rest outermost, run in parallel
    # 3 x 3 x 4 reduction steps for each of 4 pixels is more than LLVM unrolls: the reduction goes outside the block
    assert [t for t in tiles if len(t) != 4] == [[3, 1], [3, 1], [32, 1]]
    parallel = [i for i in trace.insts if i.kind.name == "Annotate" and str(i.attrs[0]) == "meta_schedule.parallel"]
    assert parallel and not [i for i in serial(trace).insts if i in parallel]
    assert PARALLEL_MIN_FLOPS > 0


@pytest.mark.parametrize(("reductions", "extents", "outside"), [
    ((3, 3, 3), (1, 112, 112, 16), True),  # PP-LCNet's stem: 27 taps x channels x 4 pixels (alone: 308 -> 168 us)
    ((3, 3, 64), (1, 40, 40, 64), True),  # a 3x3 conv: 3 x 3 x 4 inner steps x 5 pixels (alone: 4.06 -> 1.65 ms)
    ((1, 1, 256), (1, 14, 14, 256), False),  # a 1x1 conv: 4 steps x 4 pixels, unrolled as it is
    ((3, 3), (1, 112, 112, 32), False),  # a depthwise conv: 9 taps x 4 pixels
    ((512,), (1, 1000), False),  # a dense layer
])
def test_a_reduction_goes_outside_the_register_block_where_the_block_would_not_be_unrolled(reductions, extents,
                                                                                           outside):
    from pipeline.compiler.tuning.defaults import reduction_outside

    assert reduction_outside(list(reductions), register_block(list(extents), lanes=8)) is outside


@pytest.mark.parametrize(("extents", "pixels", "channels"), [
    ((1, 14, 14, 256), [1, 2, 2], 16),  # 2 vectors x 2x2 pixels
    ((1, 7, 7, 512), [1, 1, 7], 8),  # a 7-wide row: 7 pixels, not 4 rows that don't divide it (was 1 pixel)
    ((1, 13, 13, 384), [1, 1, 13], 8),  # YOLOX's smallest scale: a whole 13-wide row (was 1 pixel)
    ((1, 56, 56, 24), [1, 1, 8], 8),  # 24 channels: 3 vectors would be more than OUTPUT_VECTORS
    ((36, 169, 96), [1, 13], 8),  # a batched matmul (Winograd): its batch rows share no weights, never blocked
    ((1, 10), [1], 5),  # channels not a multiple of the lanes: a divisor of them
    ((1, 13, 13, 4), [1, 1, 13], 4),  # YOLOX's 4 box coordinates: half a vector, still a row of pixels
])
def test_the_register_block_holds_the_most_accumulators_that_fit(extents, pixels, channels):
    block = register_block(list(extents), lanes=8)
    assert block == (pixels, channels)
    assert max(1, channels // 8) * int(np.prod(pixels)) <= ACCUMULATORS  # the parametrization's own sanity


def test_lanes_follow_the_profiles_cpu():
    assert vector_lanes(load_profile("x86-server-vnni")) == 16
    assert vector_lanes(load_profile("x86-server")) == 8
    assert vector_lanes(load_profile("raspberry-pi-4")) == 4


def test_default_schedules_compute_what_the_plain_build_computes(tmp_path):
    mod, cpu, profile, x = _module(tmp_path)
    plain = tvm.compile(mod, target=tvm.target.Target(cpu))
    scheduled, counts = _cpu_build(mod, cpu, vector_lanes(profile))
    assert counts["default_scheduled"] == counts["kernels"] > 0
    np.testing.assert_allclose(_run(scheduled, x), _run(plain, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("profile_name", ["local", "x86-server"])
def test_an_int8_build_tensorizes_its_dot_kernels_by_default_and_computes_the_same(tmp_path, profile_name):
    """Every kernel takes a default schedule, those laid out for a dot-product instruction tensorized with it (this
    machine's: vpdpbusd or vpmaddubsw; the AVX2 server's vpmaddubsw on 256 bits, which this machine runs too): the
    library computes what the plain build computes, the integer sums exactly."""
    mod, cpu, profile, x = _module(tmp_path, "int8", profile_name)
    plain = tvm.compile(mod, target=tvm.target.Target(cpu))
    scheduled, counts = _cpu_build(mod, cpu, vector_lanes(profile))
    assert counts["default_scheduled"] == counts["kernels"] > 0
    assembly = scheduled.mod.imports[0].inspect_source("asm") if scheduled.mod.imports else ""
    if profile_name == "x86-server":
        assert "vpmaddubsw" in assembly and "zmm" not in assembly
    else:
        assert "vpdpbusd" in assembly or "vpmaddubsw" in assembly
    np.testing.assert_allclose(_run(scheduled, x), _run(plain, x), rtol=1e-5, atol=1e-4)


def test_a_convs_bias_and_activation_are_computed_in_its_tile():
    """Regression: the default schedule took MetaSchedule's first design space, where a conv's epilogue (bias, ReLU)
    is a loop of its own over the whole output, in a parallel region of its own: the digits CNN's 3x3 convs took
    14 us instead of 10 (AMD EPYC Zen 3). The schedule now computes it inside the conv's tile."""
    from pipeline.compiler.tuning.defaults import default_schedule

    context = _padded_conv_context(tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2}), True)
    schedule = default_schedule(context, context.generate_design_space(), lanes=8)
    kinds = [inst.kind.name for inst in schedule.trace.insts]
    assert "ReverseComputeAt" in kinds and "EnterPostproc" in kinds


@pytest.mark.parametrize(("side", "location"), [(4, -2), (16, -1)])
def test_a_small_convs_padding_is_inlined_a_large_ones_computed_first(side, location):
    """At 4x4 (1.2 MFLOP) the padding is inlined into the conv's loads (-2): a pass of its own over the input, in a
    parallel region of its own, cost the digits CNN's and PP-LCNet's small convs more than the bounds checks. At
    16x16 (19 MFLOP) it is computed first, at the root (-1), as YOLOX's convs measured faster."""
    from pipeline.compiler.tuning.defaults import INLINE_PRODUCERS_MAX_FLOPS, default_schedule

    context = _padded_conv_context(tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2}), True, side)
    flops = 2 * side * side * 64 * 3 * 3 * 32
    assert (flops < INLINE_PRODUCERS_MAX_FLOPS) == (location == -2)
    schedule = default_schedule(context, context.generate_design_space(), lanes=8)
    (sample,) = [inst for inst in schedule.trace.insts if inst.kind.name == "SampleComputeLocation"]
    assert int(schedule.trace.decisions[sample]) == location
    assert ("pad_temp" in schedule.mod.script()) == (location == -1)


def test_around_a_dot_product_intrinsic_the_decisions_block_registers_and_do_not_vectorize():
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.passes.dot import AVX2, dot_matmul
    from pipeline.compiler.passes.dot_intrinsics import search_space

    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    kernel = dot_matmul((1, 28, 28), 64, 128, AVX2).with_attr("global_symbol", "main")
    context = ms.TuneContext(mod=tvm.IRModule({"main": kernel}), target=target, space_generator=search_space(avx2=True),
                             search_strategy="replay-trace", rand_state=1)
    space = next(s for s in context.generate_design_space() if "meta_schedule.auto_tensorize" in str(s.trace))
    trace = decided(space.trace.simplified(remove_postproc=True), lanes=8, dot_lanes=AVX2.lanes)
    tiles = [[int(v) for v in trace.decisions[inst]] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
    spatial = [t for t in tiles if len(t) == 4]
    assert spatial[-1] == [4, 1, 1, 4]  # 128 outputs = 16 tiles of 8 lanes: 4 (32 outputs) in registers
    assert spatial[-2] == [7, 1, 1, 4]  # 28 columns: 4 at a time
    assert "meta_schedule.vectorize" not in str(trace)


def test_a_default_schedule_mutated_by_the_search_still_replays():
    """Regression: tuning measures each kernel's default schedule (tuning.seeded), and the evolutionary search breeds
    from it; its postprocessing was not marked as such, so a mutation that moved the pad's compute location replayed
    the postprocessors' loop fetches too, a TVM check failed ("old_outputs.size() == new_outputs.size()") and the
    whole tuning run stopped."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.defaults import default_schedule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    context = _padded_conv_context(target)
    schedule = default_schedule(context, context.generate_design_space(), lanes=8)
    assert schedule is not None and "EnterPostproc" in str([inst.kind.name for inst in schedule.trace.insts])
    mutator = ms.mutator.MutateComputeLocation()
    mutator._initialize_with_tune_context(context)
    mutated = [trace for trace in (mutator.apply(schedule.trace) for _ in range(20)) if trace is not None]
    assert mutated
    for trace in mutated:
        trace.apply_to_schedule(tvm.s_tir.Schedule(context.mod), remove_postproc=True)


@pytest.mark.parametrize(("side", "parallel"), [(224, True), (16, False)])
def test_a_kernel_that_moves_much_and_computes_little_runs_in_parallel(side, parallel):
    """Regression: PP-LCNet's input transpose (1x3x224x224 fp32 to channels-last, clipped: 0.3 MFLOP, 1.2 MB) ran
    on one thread, under PARALLEL_MIN_FLOPS. A kernel that moves PARALLEL_MIN_BYTES runs in parallel; a small one
    (16x16, 6 KB) stays on one thread."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.defaults import PARALLEL_MIN_BYTES, bytes_moved, default_schedule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, side, side), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit(relax.op.permute_dims(relax.op.clip(x, -2.0, 2.0), [0, 2, 3, 1]))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    (task,) = ms.relax_integration.extract_tasks(fused(bb.get(), target), target)
    assert (bytes_moved(task.dispatched[0]) >= PARALLEL_MIN_BYTES) == parallel
    context = ms.TuneContext(mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                             search_strategy="replay-trace", rand_state=1)
    schedule = default_schedule(context, context.generate_design_space(), lanes=8)
    assert ("T.parallel" in schedule.mod.script()) == parallel
