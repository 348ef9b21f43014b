"""Vector code for the int8 kernels' requantize epilogues (pipeline/compiler/passes/epilogue.py): TVM vectorizes a
rounding loop, and around a dot-product intrinsic the epilogue is vectorized in the intrinsic's lanes, exactly."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from pipeline.compiler.passes.dot import AVX2, packed_weight
from pipeline.compiler.passes.dot_intrinsics import search_space
from pipeline.compiler.passes.epilogue import intrinsic_lanes, make_rounding_vectorizable
from pipeline.compiler.passes.relax_util import int64_shape
from pipeline.compiler.tuning.defaults import decided

HASWELL = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}  # AVX2: this project's every x86 machine runs it


@T.prim_func(s_tir=True)
def _rounded(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")) -> None:
    for i_o in range(8):
        for i_i in T.vectorized(8):
            with T.sblock("round"):
                v = T.axis.spatial(64, i_o * 8 + i_i)
                y[v] = T.nearbyint(x[v])


def test_a_vectorized_loop_rounds_in_vector_code_half_to_even():
    """TVM 0.27's VectorizeLoop turned any loop holding a nearbyint (every requantize) back into scalar code."""
    make_rounding_vectorizable()
    library = tvm.tirx.build(tvm.IRModule({"main": _rounded}), target=tvm.target.Target(HASWELL))
    assert "llvm.nearbyint.v8f32" in library.inspect_source("ll")
    x = np.concatenate([np.arange(-8, 8) + 0.5, np.linspace(-300, 300, 48)]).astype("float32")
    y = tvm.runtime.tensor(np.zeros(64, "float32"))
    library["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), np.rint(x))  # halves to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2


def _requantized_dot_matmul(pixels: int, k: int, n: int, scale: float, zero_point: int) -> tvm.tirx.PrimFunc:
    """uint8 [1, pixels, k] x AVX2-packed int8 -> int32 sums -> uint8(clip(round(sum * scale) + zero_point)): a
    dot kernel and its requantize, one kernel as FuseOps makes them."""
    a = te.placeholder(int64_shape((1, pixels, k)), "uint8", name="a")
    w = te.placeholder(int64_shape((n // 8, k // 4, 8, 4)), "int8", name="w")
    r = te.reduce_axis((tvm.tirx.const(0, "int64"), tvm.tirx.const(k, "int64")), name="r")
    acc = te.compute(int64_shape((1, pixels, n)), lambda b, p, o: te.sum(
        a[b, p, r].astype("int32") * w[o // 8, r // 4, o % 8, r % 4].astype("int32"), axis=r), name="sums")
    out = te.compute(acc.shape, lambda *i: te.max(te.min(
        te.nearbyint(acc[i].astype("float32") * tvm.tirx.const(scale, "float32")) + float(zero_point), 255.0), 0.0)
        .astype("uint8"), name="requantize")
    return te.create_prim_func([a, w, out]).with_attr("global_symbol", "main")


def test_around_a_dot_intrinsic_the_epilogue_is_vectors_of_its_lanes_and_exact():
    """The default schedule puts the requantize in the register block's tile; without vector code there, LLVM split
    the tile's accumulators into scalars and rebuilt each vector from them (vpinsrd) at every reduction step."""
    from tvm.s_tir import meta_schedule as ms

    make_rounding_vectorizable()
    target = tvm.target.Target(HASWELL)
    pixels, k, n, scale, zero_point = 56, 64, 48, 0.0123, 3
    kernel = tvm.IRModule({"main": _requantized_dot_matmul(pixels, k, n, scale, zero_point)})
    context = ms.TuneContext(mod=kernel, target=target, space_generator=search_space(avx2=True),
                             search_strategy="replay-trace", rand_state=1)
    space = next(s for s in context.generate_design_space() if "meta_schedule.auto_tensorize" in str(s.trace))
    schedule = tvm.s_tir.Schedule(kernel)
    decided(space.trace.simplified(remove_postproc=True), lanes=8, dot_lanes=AVX2.lanes).apply_to_schedule(
        schedule, remove_postproc=True)
    assert all(postproc.apply(schedule) for postproc in context.space_generator.postprocs)

    assert intrinsic_lanes(schedule.mod["main"]) == AVX2.lanes
    epilogue_loops = [schedule.get(loop) for loop in schedule.get_loops(schedule.get_sblock("requantize"))]
    assert epilogue_loops[-1].kind == tvm.tirx.ForKind.VECTORIZED and int(epilogue_loops[-1].extent) == AVX2.lanes
    library = tvm.tirx.build(schedule.mod, target=target)
    assembly = library.inspect_source("asm")
    assert "vpmaddubsw" in assembly and "vpinsrd" not in assembly

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, pixels, k), dtype=np.uint8)
    weight = rng.integers(-64, 65, (n, k), dtype=np.int8)  # 7-bit: exact for vpmaddubsw
    out = tvm.runtime.tensor(np.zeros((1, pixels, n), "uint8"))
    library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed_weight(weight, AVX2)), out)
    sums = x.astype(np.int32) @ weight.T.astype(np.int32)
    expected = np.clip(np.rint(sums.astype(np.float32) * np.float32(scale)) + zero_point, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out.numpy(), expected)
