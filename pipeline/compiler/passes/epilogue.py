"""Vector code for the requantize epilogues of the int8 kernels.

Every int8 kernel ends in a requantize: ``uint8(clip(round(acc * scale) + zero_point))``, often with an
activation between (YOLOX's SiLU). TVM 0.27 lowers ``round`` to ``tirx.nearbyint``, an op its VectorizeLoop does
not know as vectorizable (no ``TVectorizable`` attribute, unlike floor, exp or sqrt): a loop marked vectorized that
holds one is turned back into a scalar loop, silently. So no int8 epilogue was vector code, tuned or not.
:func:`make_rounding_vectorizable` registers the attribute: LLVM lowers the vector op to one instruction
(``vroundps`` with the current rounding mode on x86, ``frintx`` on ARM), the same rounding as the scalar
``nearbyint``.

Around a dot-product intrinsic (passes.dot) there is more: the default schedules and MetaSchedule's candidates put
the epilogue in the register block's tile (reverse_compute_at), and leave it unvectorized (a vectorize annotation
would also reach the intrinsic, which LLVM can't widen: passes.dot_intrinsics). The tile's int32 accumulators then
live in a small buffer that the intrinsic reads and writes as vectors of its lanes and the epilogue read one
element at a time; LLVM splits such a buffer into scalars and rebuilt every accumulator from them, element by
element (``vpinsrd``), at each step of the reduction. :func:`vectorize_epilogues` vectorizes the epilogue (and
any other element-wise block of the kernel) in vectors of the intrinsic's own lanes: the buffer stays vectors.
Measured on the AVX2 EPYC (one thread, a noisy VM: two runs each), YOLOX int8's 1x1 conv 104x104x48 -> 48 with its
SiLU requantize: 2.0-2.2 ms -> 1.0 ms (the bare integer matmul: 0.35 ms); its 3x3 conv 54x54x96 -> 96: 3.0-4.6 ->
2.9-3.3 ms, the stem 4.5-5.5 -> 2.7-2.9 ms; the whole model untuned 53.8 -> 45.6 ms (A-B-B-A, two threads).
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import SBlock

MAX_VECTOR = 64  # elements of one vectorized loop at most (MetaSchedule's own limit on CPUs)


@functools.cache
def make_rounding_vectorizable() -> None:
    """Let TVM's VectorizeLoop vectorize ``nearbyint`` (every requantize's rounding) instead of scalarizing the loop."""
    if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def _calls_intrinsic(expr) -> bool:
    found: list = []
    tvm_ffi.structural_walk(expr, (tvm.ir.Call, lambda call: found.append(call)
                                   if getattr(call.op, "name", "") == "tirx.call_llvm_pure_intrin" else None))
    return bool(found)


def intrinsic_lanes(func: tirx.PrimFunc) -> int:
    """The int32 lanes a tensorized dot-product intrinsic of ``func`` writes at once (16 for vpdpbusd, 8 for the AVX2
    pair, 4 for sdot and NEON); 0 where nothing is tensorized."""
    lanes = [0]

    def on_store(store: tirx.BufferStore) -> None:
        dtype = tvm.DataType(str(store.value.ty.dtype))
        if dtype.lanes > 1 and dtype.type_code == tvm.DataTypeCode.INT and dtype.bits == 32 and \
                _calls_intrinsic(store.value):  # the accumulators (not vpmaddubsw's int16 pairs)
            lanes.append(int(dtype.lanes))

    tvm_ffi.structural_walk(func.body, (tirx.BufferStore, on_store))
    return max(lanes)


def _vector_free(block: SBlock) -> bool:
    """A block whose body is one scalar statement: no loops, blocks or vector code inside."""
    inner: list = []
    tvm_ffi.structural_walk(block.body, ((tirx.Ramp, tirx.Broadcast, tirx.For, SBlock), inner.append))
    return not inner


def vectorize_epilogues(sch: tvm.s_tir.Schedule) -> int:
    """In a kernel with a tensorized dot-product intrinsic, vectorize the innermost loop of every element-wise block
    (the requantize epilogue, a pad computed at the root) that is still a scalar loop: split into vectors of the
    intrinsic's lanes where they divide it, else whole (up to MAX_VECTOR). How many loops were vectorized."""
    func = sch.mod["main"]
    lanes = intrinsic_lanes(func)
    if not lanes:
        return 0
    names: list[str] = []
    tvm_ffi.structural_walk(func.body, (SBlock, lambda block: names.append(block.name_hint)))
    vectorized = 0
    for name in names:
        if name == "root":
            continue
        block = sch.get_sblock(name)
        node = sch.get(block)
        loops = sch.get_loops(block)
        if not loops or any(var.iter_type != tirx.IterVar.DataPar for var in node.iter_vars) or \
                not _vector_free(node):
            continue
        loop = sch.get(loops[-1])
        if loop.kind != tirx.ForKind.SERIAL or not isinstance(loop.extent, tirx.IntImm):
            continue
        extent = int(loop.extent)
        if extent % lanes == 0 and extent > lanes:
            sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
        elif 2 <= extent <= MAX_VECTOR:
            sch.vectorize(loops[-1])
        else:
            continue
        vectorized += 1
    return vectorized
