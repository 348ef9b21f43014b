"""Default schedules: every CPU kernel of an untuned build gets a reasonable schedule without a single measurement.

TVM 0.27 leaves an untuned CPU kernel a naive loop nest (one thread, no vectors, no tiling): 0.005-0.13x of
onnxruntime fp32. Here each kernel takes MetaSchedule's own design space for the target (multi-level tiling
SSRSRS, parallel outer loops, vectorised inner ones, unrolling: the space tuning searches), and instead of sampling
its decisions at random or timing candidates, they are set from the profile:

- a register block of output pixels x output channels, as many accumulators as the registers hold
  (:func:`register_block`): the innermost output axis (output channels of a conv, columns of a matmul) in one or two
  vectors of the lanes (16 fp32 in AVX-512, 8 in AVX2, 4 in NEON), the pixels (a conv's rows and columns, a
  matmul's rows; never a batch axis, whose rows share no weights) tiled by divisors of their extents, up to
  ACCUMULATORS in all; each loaded weight vector is shared by every pixel, each broadcast input by every vector;
- what is left of every spatial axis stays in the outermost tile, which MetaSchedule's postprocessing fuses and
  runs in parallel on the profile's cores;
- reduction axes in tiles of up to 4 inside the register block, unrolled with it up to 64 steps; where the block's
  pixels times those tiles would exceed the 64 (a 3x3 conv: 3 x 3 x 4 taps and channels per pixel), the whole
  reduction outside the block instead (:func:`reduction_outside`); producers (padding) computed at the root, or in a
  small kernel (under INLINE_PRODUCERS_MAX_FLOPS) inlined into its loads;
- the epilogue (bias, activation, requantize) computed inside the tile, not in a pass of its own.

A kernel laid out for a dot-product instruction (passes.dot: VNNI, vpmaddubsw, sdot, NEON) takes the tensorizing
design space instead (passes.dot_intrinsics), the intrinsic innermost: around it a register block of up to 4 rows x
32 outputs, one intrinsic per accumulator, and no vectorize annotation (the body is vector code already; LLVM can't
widen it again). PP-LCNet int8 untuned went from 20 of 38 kernels scheduled, 0.03-0.05x of onnxruntime fp32, to
38 of 38, 0.65x (AMD EPYC, VNNI).

Then MetaSchedule's postprocessors for the target make each a concrete schedule (what tuning does to a candidate)
and the build applies them as a database would. A kernel whose space or postprocessing fails, or whose vectorised
loop would still hold an intrinsic's body, keeps TVM's default. Small kernels (under PARALLEL_MIN_FLOPS and
PARALLEL_MIN_BYTES) run on one thread.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import tvm

from targets.profiles import DeviceProfile

# The register block: AVX2 has 16 vector registers; a block of A accumulators needs its weight vectors (up to
# OUTPUT_VECTORS) and a broadcast input beside them. Measured on an AVX2 AMD EPYC (2026-12-07, untuned fp32 against
# onnxruntime fp32, side by side): the former 4 rows x 1 vector (1 row in a 7-wide layer, where 4 doesn't divide)
# PP-LCNet 0.36x, YOLOX 0.37x; 12 accumulators, 2 vectors 0.85x / 0.53x; 13 (a 13-wide row, YOLOX's every scale)
# 0.78-0.86x / 0.62x; 14 or 3-4 vectors slower (spills). The same block on 32-register ISAs (AVX-512, NEON) is
# smaller than they could hold, and still larger than before.
ACCUMULATORS = 13
OUTPUT_VECTORS = 2
REGISTER_ROWS = 4  # around a dot-product intrinsic (its own tiles are wider: _dot_tiles)
REDUCTION_TILE = 4
UNROLL = 64
# Below both, a kernel runs on one thread: waking the pool costs ~5-20 us, what 1e5-1e6 operations take on one core,
# or moving 50-200 KB. The bytes count for kernels that move data and compute next to nothing: PP-LCNet's input
# transpose (1x3x224x224 fp32 to channels-last, 1.2 MB in and out, 0.3 MFLOP of clipping) ran ~0.1 ms on one core.
PARALLEL_MIN_FLOPS = 500_000
PARALLEL_MIN_BYTES = 256 * 1024
# Below this, a kernel's producers (a conv's padding) are inlined into its loads rather than written out first: at
# the root the padding is a pass of its own over the input, in a parallel region of its own, which cost a small
# kernel more than the bounds checks in its loads. Side by side, untuned fp32 (AMD EPYC Zen 3, 2026-12-07): digits
# CNN 0.87x -> 0.72x of onnxruntime's time, PP-LCNet (depthwise convs of 1.8-3.6 MFLOP) 1.22x -> 1.05x; YOLOX (convs
# of 10-700 MFLOP) unchanged, and 1.30x -> 1.43x with every padding inlined.
INLINE_PRODUCERS_MAX_FLOPS = 5_000_000


def vector_lanes(profile: DeviceProfile) -> int:
    """32-bit lanes of the widest vector register the profile's CPU has."""
    features = set(profile.cpu.features)
    if profile.cpu.arch == "x86_64":
        return 16 if "avx512f" in features else 8 if "avx2" in features or "avx" in features else 4
    return 4  # NEON (aarch64), and a safe width elsewhere


def vector_lanes_of(target: tvm.target.Target) -> int:
    """32-bit lanes of the widest vector register LLVM's target has (a tuned build's kernels no trial reached)."""
    def has(feature: str) -> bool:
        return bool(tvm.target.codegen.target_has_features([feature], target))

    return 16 if has("avx512f") else 8 if has("avx2") else 4


def _largest_divisor(extent: int, at_most: int) -> int:
    return next(f for f in range(max(1, min(extent, at_most)), 0, -1) if extent % f == 0)


def register_block(extents: list[int], lanes: int) -> tuple[list[int], int]:
    """For a block's spatial loops (``extents``, outermost first, output channels last): how many of each axis's
    pixels the register block holds, and the output channels it holds (1 or 2 vectors of ``lanes``; where the channels
    are not a multiple of the lanes, the largest divisor of them under a vector, as one accumulator). The most
    accumulators within ACCUMULATORS, then the fewest loads per multiply-add (weight vectors + broadcast inputs)."""
    if not extents:  # a block that tiles only reductions
        return [], 1
    channels = extents[-1]
    # The first axis of a block with 3 or more is a batch (a batched matmul's, whose rows share no weights; a conv's
    # N, which is 1): only the others are pixels.
    pixel_axes = range(1 if len(extents) >= 3 else 0, len(extents) - 1)
    widths = [(v, v * lanes) for v in range(1, OUTPUT_VECTORS + 1) if channels % (v * lanes) == 0] or \
        [(1, _largest_divisor(channels, lanes))]

    def candidate(vectors: int, width: int) -> tuple[tuple[int, int], list[int], int]:
        pixels, budget = [1] * (len(extents) - 1), ACCUMULATORS // vectors
        for axis in reversed(pixel_axes):  # the innermost pixels first (contiguous inputs)
            pixels[axis] = _largest_divisor(extents[axis], budget)
            budget //= pixels[axis]
        held = math.prod(pixels)
        return (vectors * held, -(vectors + held)), pixels, width

    _, pixels, width = max((candidate(*w) for w in widths), key=lambda c: c[0])  # the first of equals, as before
    return pixels, width


def _reduction_tile(extent: int) -> int:
    return _largest_divisor(extent, REDUCTION_TILE)


def reduction_outside(reductions: list[int], block: tuple[list[int], int]) -> bool:
    """Does the block's whole reduction (its loops' ``reductions`` extents) go outside its register block
    (``block``: :func:`register_block`'s)? Inside it, each register-block pixel runs the reduction's inner tiles
    (up to REDUCTION_TILE per loop), and LLVM keeps the accumulators in registers and shares each loaded weight
    vector between the pixels only where it unrolls the pixels and tiles together, up to UNROLL steps. Past that (a
    3x3 conv: 3 x 3 x 4 steps per pixel, 4-5 pixels) the block stays a loop and every step loads and stores its
    accumulator and reloads its weights: the reduction goes outside, each step of it one multiply-add per
    accumulator. Kernels alone, one thread, AMD EPYC Zen 3 AVX2 (2026-12-07, docs/performance.md): PP-LCNet's stem
    (3x3 stride 2, 3 -> 16 channels, 224 x 224) 308 -> 168 us; 3x3 convs 32 -> 64 at 80 x 80 stride 2 1.94 -> 0.85
    ms, 64 -> 64 at 40 x 40 4.06 -> 1.65 ms. A 1x1 conv (4 steps x up to 6 pixels, unrolled either way) ran 7 %
    slower outside, which is why blocks that unroll keep their inner tiles."""
    pixels, _ = block
    return math.prod(_reduction_tile(extent) for extent in reductions) * math.prod(pixels) > UNROLL


def _tiles(extent: int, parts: int, axis: int, block: tuple[list[int], int],
           outside: bool = False) -> list[int] | None:
    """The tile sizes of one loop: ``axis`` counts the block's spatial loops (tiled in 4), -1 a reduction loop;
    ``block``: :func:`register_block`'s; ``outside``: :func:`reduction_outside`'s."""
    if parts == 2:  # a reduction loop: small inner tiles, or all of it outside the register block
        inner = 1 if outside else _reduction_tile(extent)
        return [extent // inner, inner]
    if parts != 4:
        return None
    pixels, channels = block
    if axis == len(pixels):  # the output channels: innermost, vectorised
        return [extent // channels, 1, 1, channels]
    return [extent // pixels[axis], 1, pixels[axis], 1]  # the rest outermost: fused and run in parallel


def _dot_tiles(extent: int, parts: int, axis: int, spatial_axes: int, lanes: int) -> list[int] | None:
    """The tile sizes of one loop around a dot-product intrinsic (its own ``lanes`` outputs x 4 inputs are inside):
    a register block of up to 4 rows x 32 outputs' tiles, innermost and unvectorized (each step is one intrinsic
    on its own accumulator; the broadcast activations and loaded weight tiles are shared)."""
    if parts == 2:
        inner = _reduction_tile(extent)
        return [extent // inner, inner]
    if parts != 4:
        return None
    if axis == spatial_axes - 1:  # output tiles of the intrinsic's lanes
        tiles = _largest_divisor(extent, max(1, 32 // lanes))
        return [extent // tiles, 1, 1, tiles]
    if axis == spatial_axes - 2:
        rows = _largest_divisor(extent, REGISTER_ROWS)
        return [extent // rows, 1, 1, rows]
    return [extent, 1, 1, 1]


def _tensorized(trace) -> bool:  # MetaSchedule marked a block for its dot-product intrinsic
    return any(inst.kind.name == "Annotate" and str(inst.attrs[0]) == "meta_schedule.auto_tensorize"
               for inst in trace.insts)


def _without(trace, annotation: str):
    keep = [inst for inst in trace.insts if not (inst.kind.name == "Annotate" and str(inst.attrs[0]) == annotation)]
    return tvm.s_tir.Trace(keep, {inst: decision for inst, decision in trace.decisions.items() if inst in keep})


def serial(trace):
    """``trace`` without its parallel annotation: a small kernel's work doesn't pay for waking the thread pool."""
    return _without(trace, "meta_schedule.parallel")


def unvectorized(trace):
    """``trace`` without its vectorize annotation: around a dot-product intrinsic, which is vector code already."""
    return _without(trace, "meta_schedule.vectorize")


def _blocks(trace, parts: int = 4) -> tuple[dict[Any, int], dict[int, list[int]]]:
    """Which block (the index of the GetLoops that made it) each loop of ``trace`` is of, and the extents of each
    block's spatial loops (``parts`` 4; 2: its reduction loops) in order: a kernel may tile more than one block."""
    block_of = {loop: index for index, inst in enumerate(trace.insts) if inst.kind.name == "GetLoops"
                for loop in inst.outputs}
    extents: dict[int, list[int]] = {}
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile" and int(inst.attrs[0]) == parts:
            extents.setdefault(block_of.get(inst.inputs[0], -1), []).append(
                math.prod(int(factor) for factor in trace.decisions[inst]))
    return block_of, extents


def decided(trace, lanes: int, dot_lanes: int = 0, inline_producers: bool = False):
    """``trace`` (a design space's) with every sampling decision set as the module docstring says; a tensorized one
    (``dot_lanes``: its intrinsic's outputs) as :func:`_dot_tiles` says. Producers (a conv's padding) are computed
    at the root, or with ``inline_producers`` (not around an intrinsic) inlined into the loads that read them."""
    tensorized = bool(dot_lanes) and _tensorized(trace)
    if tensorized:
        trace, lanes = unvectorized(trace), dot_lanes
    block_of, spatial = _blocks(trace)
    plans = {block: register_block(extents, lanes) for block, extents in spatial.items()}  # one per block
    outside = {block: reduction_outside(extents, plans.get(block, ([], 1)))
               for block, extents in _blocks(trace, parts=2)[1].items()}
    seen: Counter[int] = Counter()  # spatial loops decided so far, per block
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "SamplePerfectTile":
            parts = int(inst.attrs[0])
            extent = math.prod(int(factor) for factor in trace.decisions[inst])
            block = block_of.get(inst.inputs[0], -1)
            extents = spatial.get(block, [])
            axis = seen[block] if parts == 4 else -1
            seen[block] += parts == 4
            if tensorized:
                decision = _dot_tiles(extent, parts, axis, len(extents), lanes)
            else:
                decision = _tiles(extent, parts, axis, plans.get(block, ([], 1)), outside.get(block, False))
            if decision is not None:
                trace = trace.with_decision(inst, decision, remove_postproc=True)
        elif kind == "SampleCategorical":  # the unroll depth
            candidates = [int(c) for c in inst.attrs[0]]
            if UNROLL in candidates:
                trace = trace.with_decision(inst, candidates.index(UNROLL), remove_postproc=True)
        elif kind == "SampleComputeLocation":  # at the root, or inlined into its consumer's loads
            trace = trace.with_decision(inst, -2 if inline_producers and not tensorized else -1,
                                        remove_postproc=True)
    return trace


def _fuses_consumer(trace) -> bool:  # the epilogue (bias, activation) computed in the kernel's tile
    return any(inst.kind.name == "ReverseComputeAt" for inst in trace.insts)


def _space(spaces: list):
    """The design space a default schedule takes: a tensorizing one where there is one (passes.dot_intrinsics), else
    the last that computes the epilogue inside the tile (MultiLevelTiling's write reuse at its deepest level), else
    the first. The first alone (the epilogue a loop of its own over the whole output, in its own parallel region)
    cost the digits CNN's convs 30-40 % (14 -> 10 us each) and untuned YOLOX fp32 ~14 % (AMD EPYC Zen 3, 2026-12-07)."""
    return next((s for s in spaces if _tensorized(s.trace)), None) or \
        next((s for s in reversed(spaces) if _fuses_consumer(s.trace)), spaces[0])


def _applies(trace, kernel) -> bool:
    """Does a tuning record's schedule apply to the kernel (a record from another TVM, or damaged, may not)?"""
    try:
        trace.apply_to_schedule(tvm.s_tir.Schedule(kernel), remove_postproc=False)
    except Exception:  # noqa: BLE001 - TVM raises whatever its schedule primitives raise
        return False
    return True


def dot_layout(decomposed: tvm.IRModule):
    """The dot-product layout (passes.dot) the module's kernels are laid out for, if any."""
    from pipeline.compiler.passes.dot import LAYOUTS, count_dot_ops

    return next((layout for layout in LAYOUTS if count_dot_ops(decomposed, (layout,))), None)


def dot_lanes(task_name: str, dot) -> int:
    """The intrinsic's output lanes if the task's kernel is laid out for the ``dot`` layout, else 0."""
    return dot.lanes if dot is not None and any(prefix in task_name for prefix in dot.prefixes) else 0


def _postprocessed(context, space, lanes: int, intrinsic_lanes: int, inline_producers: bool, one_thread: bool):
    """``space`` (a simplified design-space trace) :func:`decided`, applied to ``context``'s kernel and postprocessed;
    None where a step fails."""
    try:
        trace = decided(space, lanes, intrinsic_lanes, inline_producers=inline_producers)
        if one_thread:
            trace = serial(trace)
        schedule = tvm.s_tir.Schedule(context.mod)
        trace.apply_to_schedule(schedule, remove_postproc=True)
        # Marked as MetaSchedule marks a candidate's: a search that mutates this schedule's trace (tuning.seeded)
        # replays it without them. Unmarked, their loop fetches were replayed after a mutation had moved a block, and
        # a check failed that stopped the whole tuning run (PP-LCNet int8, 2026-12-07).
        schedule.enter_postproc()
        return schedule if all(postproc.apply(schedule) for postproc in context.space_generator.postprocs) else None
    except Exception:  # noqa: BLE001 - any failure: the caller's next way, else TVM's default for this kernel
        return None


def bytes_moved(mod: tvm.IRModule) -> int:
    """The bytes of a kernel's arguments (what it reads and writes at least once)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    return sum(math.prod(int(extent) for extent in arg.shape) * tvm.DataType(arg.dtype).bits // 8
               for arg in ArgInfo.from_entry_func(mod))


def default_schedule(context, spaces: list, lanes: int, intrinsic_lanes: int = 0):
    """The default schedule of ``context``'s kernel (a MetaSchedule TuneContext: its postprocessors) from its design
    ``spaces`` (``intrinsic_lanes``: its dot-product intrinsic's, :func:`dot_lanes`), postprocessed; None where that
    fails, or where a vectorized loop would still hold an intrinsic's body (a VNNI / sdot body: LLVM can't widen it
    again). A small kernel's producers are inlined where that applies, else computed at the root."""
    from tvm.s_tir.analysis import estimate_tir_flops

    from pipeline.compiler.passes.dot_intrinsics import vector_code_in_vectorized_loop

    try:
        flops = estimate_tir_flops(context.mod)
        moved = bytes_moved(context.mod)
        space = _space(spaces).trace.simplified(remove_postproc=True)
    except Exception:  # noqa: BLE001 - any failure: TVM's default for this kernel
        return None
    one_thread = flops < PARALLEL_MIN_FLOPS and moved < PARALLEL_MIN_BYTES
    ways = (True, False) if flops < INLINE_PRODUCERS_MAX_FLOPS else (False,)
    tried = (_postprocessed(context, space, lanes, intrinsic_lanes, inline, one_thread) for inline in ways)
    schedule = next((s for s in tried if s is not None), None)
    return None if schedule is None or vector_code_in_vectorized_loop(schedule.mod) else schedule


def task_default_schedule(task, target: tvm.target.Target, lanes: int, dot):
    """:func:`default_schedule` of a MetaSchedule task's kernel (``dot``: the module's dot-product layout, or None),
    from its own design space; None where there is none (TVM's default for the kernel)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.passes.dot import AVX2
    from pipeline.compiler.passes.dot_intrinsics import search_space

    intrinsic_lanes = dot_lanes(task.task_name, dot)
    context = ms.TuneContext(mod=task.dispatched[0], target=target, task_name=task.task_name, rand_state=1,
                             space_generator=search_space(avx2=dot is AVX2) if intrinsic_lanes
                             else "post-order-apply",
                             search_strategy="replay-trace")
    try:
        spaces = context.generate_design_space()
    except Exception:  # noqa: BLE001 - any failure: TVM's default for this kernel, as before
        return None
    return default_schedule(context, spaces, lanes, intrinsic_lanes)


def default_schedules(decomposed: tvm.IRModule, target: tvm.target.Target, lanes: int,
                      tuned: Callable[[Any], Any] | None = None) -> tuple[Any, int, int, int]:
    """(a MetaSchedule database holding a schedule for each kernel of ``decomposed``, how many kernels got a default
    one, how many there are, how many took a tuned record instead). ``tuned``: kernel -> the best record a tuning
    database has for it, or None (tuning.records.best_for): a kernel tuned before, for this target by any model or
    host, keeps its tuned schedule. compile_relax(database, decomposed, target) builds with them."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.lowering import fuse, register_cpu_rules, unnamed_handlers_detached

    # The builds and tuning runs register these first; any other caller (a test of one kernel) would otherwise have
    # MetaSchedule import every target's tensor intrinsics: a 13x13 pool's test took 56 s alone, 137 s in the suite.
    register_cpu_rules(target)
    database = ms.database.MemoryDatabase()
    tasks = ms.relax_integration.extract_tasks(fuse(decomposed, target), target)
    dot = dot_layout(decomposed)
    scheduled = from_records = 0
    with unnamed_handlers_detached():
        for task in tasks:
            kernel = task.dispatched[0]
            best = tuned(kernel) if tuned else None
            if best is not None and _applies(best.trace, kernel):
                database.commit_tuning_record(ms.database.TuningRecord(
                    best.trace, database.commit_workload(kernel), best.run_secs, target,
                    ms.arg_info.ArgInfo.from_entry_func(kernel)))
                from_records += 1
                continue
            schedule = task_default_schedule(task, target, lanes, dot)
            if schedule is None:
                continue
            workload = database.commit_workload(kernel)
            database.commit_tuning_record(ms.database.TuningRecord(
                schedule.trace, workload, [1.0], target, ms.arg_info.ArgInfo.from_entry_func(kernel)))
            scheduled += 1
    return database, scheduled, len(tasks), from_records
