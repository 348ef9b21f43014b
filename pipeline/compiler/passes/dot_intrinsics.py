"""The tensor intrinsics the dot-product layouts of passes.dot are tensorized with, and the MetaSchedule design space
that offers them.

- ``dot_16x4_vnni`` (AVX-512 VNNI ``vpdpbusd``): TVM 0.27's own does not build with the LLVM it ships ("Call
  parameter type does not match function signature": LLVM now declares vpdpbusd.512's multiplicands as <64 x i8>
  where TVM passes <16 x i32>); :func:`register_vnni_intrinsic` re-registers it under the same name.
- ``dot_16x4_avx512`` (AVX-512BW without VNNI: ``vpmaddubsw`` + ``vpmaddwd`` on 512-bit registers) and
  ``dot_4x4_i8i8s32_neon`` (ARMv8.0 NEON: ``smull`` + ``saddlp``): TVM's own, picked by MetaSchedule's x86 and ARM
  rules from the target's features.
- ``edgedeploy_dot_8x4_avx2`` (AVX2: ``vpmaddubsw`` + ``vpmaddwd`` on 256-bit registers): TVM has none, and
  MetaSchedule's rules for a plain AVX2 target tensorize nothing; :func:`search_space` gives them one that does.

vpmaddubsw multiplies 32 uint8 x int8 pairs and adds each two neighbours in int16, saturating: 255 x (-128) x 2 does
not fit. The layouts that use it take only weights whose neighbour pairs can't saturate (passes.dot.exact), which
7-bit weights (onnxruntime's ``reduce_range``: [-64, 64]) always are; the second step, vpmaddwd with ones, adds the
int16 pairs into int32 exactly.
"""

from __future__ import annotations

import functools

AVX2_INTRINSIC = "edgedeploy_dot_8x4_avx2"


@functools.cache
def register_vnni_intrinsic() -> None:
    """Override TVM's ``dot_16x4_vnni`` implementation with one this LLVM accepts (same description)."""
    from tvm.s_tir import TensorIntrin

    from pipeline.compiler.intrinsics import load_modules

    load_modules("x86")  # TVM's own dot_16x4_vnni first (x86 only: compiler.intrinsics); this replaces it
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_u8x4 = A.vload([0], "uint8x4")
            a_i32 = T.reinterpret(a_u8x4, dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")  # the 4 bytes, in every lane
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            c_i32x16 = C.vload([0], dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c_i32x16, a_u8x64, b_i8x64,
                dtype="int32x16")

    TensorIntrin.register("dot_16x4_vnni", dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)


@functools.cache
def register_avx2_intrinsic() -> None:
    """``edgedeploy_dot_8x4_avx2``: 8 int32 lanes, each += 4 uint8 x int8 products (lane j reads row j of the 8 x 4
    weight tile). One vpmaddubsw makes the 16 pair sums in int16, one vpmaddwd with ones adds each two into int32."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def avx2_desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def avx2_impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_u8x4 = A.vload([0], "uint8x4")
            a_i32 = T.reinterpret(a_u8x4, dtype="int32")
            a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")  # the 4 bytes, in every lane
            b_i8x32 = B.vload([0, 0], dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a_u8x32, b_i8x32,
                                            dtype="int16x16")
            c_i32x8 = C.vload([0], dtype="int32x8")
            C[T.ramp(T.int32(0), 1, 8)] = c_i32x8 + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16),
                dtype="int32x8")

    TensorIntrin.register(AVX2_INTRINSIC, avx2_desc, avx2_impl, override=True)


def avx2_schedule_rules() -> list:
    """MetaSchedule's x86 rules (its DefaultX86: LLVM's defaults with the dot-product tiling before the plain one),
    tensorizing with the AVX2 intrinsic, which MetaSchedule does not know."""
    from tvm.s_tir.meta_schedule import schedule_rule

    register_avx2_intrinsic()
    rules = list(schedule_rule.ScheduleRule.create("llvm"))
    at = next(i for i, rule in enumerate(rules) if isinstance(rule, schedule_rule.MultiLevelTiling))
    rules.insert(at, schedule_rule.MultiLevelTilingWithIntrin(
        AVX2_INTRINSIC, structure="SSRSRS", max_innermost_factor=64,
        reuse_write=schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")))
    return rules


def vector_code_in_vectorized_loop(mod) -> bool:
    """A loop marked vectorized around code that already is vector code (a tensorized ``vpdpbusd`` body)."""
    import tvm_ffi
    from tvm import tirx

    found = False

    def on_loop(loop: tirx.For) -> None:
        nonlocal found
        if loop.kind == tirx.ForKind.VECTORIZED and not found:
            vectors: list = []
            tvm_ffi.structural_walk(loop.body, ((tirx.Ramp, tirx.Broadcast), vectors.append))
            found = bool(vectors)

    for func in mod.functions.values():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, (tirx.For, on_loop))
    return found


def search_space(avx2: bool = False):
    """MetaSchedule's design space for a module with dot-product kernels (its schedule rules as chosen from the
    target: x86's with VNNI or AVX-512BW, ARM's with sdot or NEON; the AVX2 ones of :func:`avx2_schedule_rules`
    with ``avx2``; its CPU tensorization postprocessors), plus one check: a candidate whose tensorized kernel sits in a
    loop that RewriteParallelVectorizeUnroll vectorized is dropped before it is built or timed. LLVM codegen can't
    widen the 16-lane intrinsic body ("Cannot broadcast lanes=16 to 64"): on PP-LCNet's 7x7 VNNI kernels 10 of 16
    random candidates were such, each a failed trial. Before that check, the kernel's epilogue is vectorized in the
    intrinsic's lanes (passes.epilogue), which the vectorize annotation may not reach."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule import postproc
    from tvm.s_tir.meta_schedule.space_generator import PostOrderApply

    from pipeline.compiler.passes.epilogue import vectorize_epilogues

    @derived_object
    class Step(postproc.PyPostproc):  # a postprocessor made of one function: schedule -> keep the candidate?
        def __init__(self, keeps) -> None:
            super().__init__()
            self.keeps = keeps

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            return self.keeps(sch)

        def clone(self):
            return Step(self.keeps)

    def vectorize_epilogues_step(sch) -> bool:
        vectorize_epilogues(sch)
        return True

    def drop_vectorized_intrinsics(sch) -> bool:
        return not vector_code_in_vectorized_loop(sch.mod)

    return PostOrderApply(sch_rules=avx2_schedule_rules() if avx2 else "from-target", postprocs=[
        postproc.DisallowDynamicLoop(), postproc.RewriteParallelVectorizeUnroll(), postproc.RewriteReductionBlock(),
        postproc.RewriteTensorize(vectorize_init_loop=True), postproc.RewriteLayout(), Step(vectorize_epilogues_step),
        Step(drop_vectorized_intrinsics)])
