"""A CPU schedule for max pooling: the channels vectorized innermost, the window's loops around them.

TVM's pooling kernel (TOPI's ``pool_max``, NHWC after passes.layout) asks MetaSchedule for the rule
``meta_schedule.pool_max``, which TVM 0.27 does not register for CPUs: the kernel got the generic rules instead, which
factor the window's reduction into a second buffer (rfactor) and leave it on one thread, its maximum scalar, untuned
and tuned alike (no multi-level tiling for a block without data reuse). YOLOX's spatial pyramid pools (5x5, 9x9
and 13x13 windows on a 13x13 map, 192 channels) took 7.2 ms of its 85 ms untuned fp32 on an AVX2 EPYC. Here each
output pixel's channels are vectors, the window's loops run around them, the output pixels run in parallel, and the
padded copy is computed vectorized too.
"""

from __future__ import annotations

import functools

import tvm

from pipeline.compiler.passes.relax_util import falling_back

__all__ = ["POOL_RULE", "register_pool_rule", "schedule_pool"]

POOL_RULE = "meta_schedule.pool_max"
# The most iterations of the outer loops MetaSchedule's postprocessing fuses into one parallel loop (what its own
# parallel rule asks for on 2-32 cores: 16 jobs a core).
PARALLEL_EXTENT = 512
WIDEST = 16  # the widest vector tried on the channels (AVX-512's float32 lanes; LLVM splits it for AVX2 and NEON)


def _vector(extent: int) -> int:
    """The widest power of two up to WIDEST that divides ``extent`` (1: no vector)."""
    lanes = WIDEST
    while lanes > 1 and extent % lanes:
        lanes //= 2
    return lanes


def _vectorized(sch, loop) -> None:
    """``loop`` split into whole vectors, the vector innermost and vectorized (left alone if none divides it)."""
    extent = int(sch.get(loop).extent)
    lanes = _vector(extent)
    if lanes > 1:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


def schedule_pool(sch, block):
    """For each output pixel, its channels in vectors (innermost), the window's loops around them; the pixels in
    parallel as every kernel's outer loops are (MetaSchedule's annotation, which an untuned build drops for a
    kernel too small to wake the thread pool for: tuning.defaults.serial). Any other pool (1-D, 3-D) goes to
    MetaSchedule's generic rules."""
    loops = sch.get_loops(block)
    if len(loops) != 6:  # not a 2-D pool: n, h, w, c and the window's rows and columns
        sch.unannotate(block, "schedule_rule")
        return [sch]
    # NHWC wherever passes.layout reached the pool (after a conv): the channels innermost. An NCHW pool vectorizes
    # its output columns instead (strided loads for a strided pool; still right).
    *_, channels, window_rows, window_columns = loops
    lanes = _vector(int(sch.get(channels).extent))
    vector_outer, vector = sch.split(channels, [None, lanes])
    sch.reorder(vector_outer, window_rows, window_columns, vector)
    if lanes > 1:
        sch.vectorize(vector)
    for producer in sch.get_producers(block):  # the padded copy: channels in vectors too
        _vectorized(sch, sch.get_loops(producer)[-1])
    sch.annotate(sch.get_sblock("root"), "meta_schedule.parallel", PARALLEL_EXTENT)
    return [sch]


@functools.cache
def register_pool_rule() -> None:
    """MetaSchedule calls it for every ``pool_max`` block on CPU targets (the global function it looks up)."""
    rule = falling_back(schedule_pool, "pooling", generic=True)
    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{POOL_RULE}", rule, override=True)
