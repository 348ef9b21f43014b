"""VNNI-ready integer kernels: convs and matmuls are laid out for vpdpbusd, compute exactly what the plain
integer kernels compute, and MetaSchedule really tensorizes them with vpdpbusd. On a CPU without VNNI the tuned
kernels are still built for a VNNI target and inspected; only running them is skipped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads.base import Samples
from targets.host import detect_host
from tests.qdq_reference import QdqReference

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend import onnx as onnx_frontend  # noqa: E402

from pipeline.compiler.passes.dot import (  # noqa: E402
    VNNI,
    count_vnni_ops,
    dot_convs,
    dot_matmul,
    packed_weight,
)
from pipeline.compiler.passes.dot_intrinsics import register_vnni_intrinsic  # noqa: E402
from pipeline.compiler.passes.int8 import integerize  # noqa: E402
from pipeline.compiler.passes.layout import channels_last, count_permutes  # noqa: E402

pytestmark = pytest.mark.slow
HAS_VNNI = "avx512_vnni" in detect_host().features
NO_VNNI = "this CPU has no AVX-512 VNNI to run vpdpbusd: the kernels were built and inspected, not run"


def _runner():
    """MetaSchedule's own local runner where this CPU can run vpdpbusd; elsewhere one that runs nothing, so that
    tuning still builds every candidate for the VNNI target (each recorded as not run)."""
    if HAS_VNNI:
        return "local"
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    @derived_object
    class NotRun(PyRunnerFuture):
        def done(self) -> bool:
            return True

        def result(self) -> RunnerResult:
            return RunnerResult(None, NO_VNNI)

    @derived_object
    class BuildOnly(PyRunner):
        def run(self, runner_inputs):
            return [NotRun() for _ in runner_inputs]

    return BuildOnly()


def test_packed_weight_puts_each_16x4_tile_in_64_contiguous_bytes():
    w = np.random.default_rng(0).integers(-127, 128, (32, 8), dtype=np.int8)
    packed = packed_weight(w)
    assert packed.shape == (2, 2, 16, 4) and packed.flags.c_contiguous
    for jo in range(2):
        for ko in range(2):
            np.testing.assert_array_equal(packed[jo, ko], w[jo * 16:(jo + 1) * 16, ko * 4:(ko + 1) * 4])


def _pointwise_model() -> onnx.ModelProto:
    """Conv 1x1 (8 -> 32) -> Relu -> Conv 1x1 (32 -> 16) -> Conv 3x3 (16 -> 24) -> Relu -> Conv 3x3, stride 2,
    dilated, uneven pads (24 -> 16) -> Flatten -> Gemm (144 -> 16): convs and a Gemm that all fit VNNI tiles (the
    24 outputs padded to 32).
    The first 3x3 conv's input has a nonzero zero point (passes.int8 pads it explicitly), the second's is
    zero after the Relu (the conv keeps its padding, and dot_convs pads with zeros)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w1", rng.standard_normal((32, 8, 1, 1))), ("b1", rng.standard_normal(32)),
        ("w2", rng.standard_normal((16, 32, 1, 1)) / 4), ("w3", rng.standard_normal((24, 16, 3, 3)) / 8),
        ("w4", rng.standard_normal((16, 24, 3, 3)) / 8),
        ("g", rng.standard_normal((16, 144)) / 8), ("gb", rng.standard_normal(16)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], pads=[2, 1, 2, 1], strides=[2, 2], dilations=[2, 1]),
        helper.make_node("Flatten", ["c4"], ["f"]),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "pointwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def quantized_pointwise_model(tmp_path, reduce_range: bool = False) -> tuple[str, tvm.IRModule, np.random.Generator]:
    """The pointwise model quantized U8S8 (uint8 activations, int8 weights; 7-bit with ``reduce_range``): its path,
    its Relax import, and the random generator to draw test inputs from."""
    float_path = tmp_path / "pointwise.onnx"
    onnx.save(_pointwise_model(), str(float_path))
    rng = np.random.default_rng(1)
    calibration = Samples({"x": rng.uniform(-1, 3, (16, 8, 6, 6)).astype(np.float32)})
    config = QuantConfig(scheme="int8", activation_type="uint8", reduce_range=reduce_range)
    path = quantize(float_path, tmp_path, config, calibration).path
    mod = onnx_frontend.from_onnx(onnx.load(path), shape_dict={"x": [1, 8, 6, 6]}, keep_params_in_input=False)
    return path, mod, rng


def test_pointwise_convs_and_gemm_become_vnni_kernels_with_the_same_results(tmp_path):
    path, mod, rng = quantized_pointwise_model(tmp_path)

    plain, plain_count = integerize(mod)
    matmuls, matmuls_count = integerize(mod, dot=VNNI)
    assert plain_count == matmuls_count == 5 and count_vnni_ops(plain) == 0
    assert count_vnni_ops(matmuls) == 1  # the Gemm
    vnni = dot_convs(channels_last(matmuls))
    assert count_vnni_ops(vnni) == 5  # and every conv, once channel-last: 1x1 as matmuls, 3x3 as windowed kernels
    names = sorted(gvar.name_hint for gvar in vnni.get_global_vars() if gvar.name_hint.startswith("vnni_"))
    assert names == ["vnni_conv_1x10x8x24_3x3s2d2x1_16", "vnni_conv_1x8x8x16_3x3s1_32", "vnni_matmul_1x144x16",
                     "vnni_matmul_1x6x6x32x16", "vnni_matmul_1x6x6x8x32"], names
    assert count_permutes(vnni) == 2  # into NHWC at the input, back before Flatten: none around the kernels

    # What tuning and the tuned build do to it: each VNNI kernel fuses with the requantize after it. (Built with
    # int32 extents, the kernel's output buffer didn't match the [1, 16] int64 one its epilogue reads, and FuseTIR
    # failed the whole build: "Inconsistent buffers vnni_matmul and lv3 mapped to the same relax var".)
    from pipeline.compiler.tuning.lowering import decompose, fuse

    cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    fused = fuse(decompose(vnni, cascadelake), cascadelake)
    kernels = [gvar.name_hint for gvar in fused.get_global_vars() if gvar.name_hint.startswith("fused_vnni_")]
    assert len(kernels) == 5 and all("_cast" in name for name in kernels), kernels
    assert sum("strided_slice" in name for name in kernels) == 1  # the padding channels dropped in the epilogue

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    run_plain, run_vnni = (relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"]
                           for m in (plain, vnni))
    reference = QdqReference(path)
    for x in rng.uniform(-1, 3, (4, 1, 8, 6, 6)).astype(np.float32):
        ours = run_vnni(tvm.runtime.tensor(x)).numpy()
        # The same int32 sums and the same float epilogue: identical, not merely close.
        np.testing.assert_array_equal(ours, run_plain(tvm.runtime.tensor(x)).numpy())
        (exact,) = reference.run(None, {"x": x})
        assert (ours.argmax() == exact.argmax()) and np.abs(ours - exact).max() <= 0.05 * np.abs(exact).max()


def _built(record, target):
    """The library of a tuning record's schedule, or None where the candidate does not build."""
    from tvm import s_tir

    schedule = s_tir.Schedule(record.workload.mod)
    record.trace.apply_to_schedule(schedule, remove_postproc=False)
    try:
        return tvm.compile(schedule.mod, target=target)
    except RuntimeError:  # LLVM's codegen refuses some vectorizations around the intrinsic (see the test below)
        return None


def _reference_conv(a: np.ndarray, hwio: np.ndarray, stride: int) -> np.ndarray:
    """int32 NHWC conv, unpadded, in numpy: the sum over taps of each tap's pixels times its [C, O] slice."""
    kh, kw, _, n = hwio.shape
    oh, ow = (a.shape[1] - kh) // stride + 1, (a.shape[2] - kw) // stride + 1
    out = np.zeros((1, oh, ow, n), np.int64)
    for i in range(kh):
        for j in range(kw):
            taps = a[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += taps.astype(np.int64) @ hwio[i, j].astype(np.int64)
    return out.astype(np.int32)


@pytest.mark.parametrize("kernel", ["matmul", "channel-last-1x1-conv", "3x3-conv-stride-2"])
def test_tuning_tensorizes_the_kernel_with_vpdpbusd_and_stays_exact(tmp_path, kernel):
    """Regression: TVM 0.27's own dot_16x4_vnni failed every build with its bundled LLVM, so no tuned int8
    kernel ever used VNNI. A 1x1 conv's kernel keeps its [1, H, W] pixels (no reshape around it); a 3x3 conv's
    reads its windows straight from the NHWC input (its one reduction axis runs over taps and channels)."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.passes.dot import dot_conv
    from pipeline.compiler.tuning.lowering import unnamed_handlers_detached
    from pipeline.compiler.tuning.search import forked_builder

    register_vnni_intrinsic()
    rng = np.random.default_rng(0)
    c, n = 32, 32
    if kernel == "3x3-conv-stride-2":
        a = rng.integers(0, 256, (1, 9, 9, c), dtype=np.uint8)
        hwio = rng.integers(-128, 128, (3, 3, c, n), dtype=np.int8)
        func = dot_conv(a.shape, (3, 3), (2, 2), (1, 1), n)
        weight, expected = packed_weight(np.ascontiguousarray(hwio.reshape(-1, n).T)), _reference_conv(a, hwio, 2)
    else:
        lead = (64,) if kernel == "matmul" else (1, 8, 8)
        a = rng.integers(0, 256, (*lead, c), dtype=np.uint8)
        w = rng.integers(-128, 128, (n, c), dtype=np.int8)
        func = dot_matmul(lead, c, n)
        weight, expected = packed_weight(w), a.astype(np.int32) @ w.astype(np.int32).T
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with unnamed_handlers_detached():  # a tuning run earlier in the session left pytest's handlers behind
        database = ms.tune_tir(mod, target, str(tmp_path / "tuning"), max_trials_global=16, num_trials_per_iter=16,
                               builder=forked_builder(), runner=_runner(), strategy="replay-trace", seed=7)
    records = database.get_all_tuning_records()
    if HAS_VNNI:
        timed = sorted((float(r.run_secs[0]), i, r) for i, r in enumerate(records)
                       if r.run_secs and float(r.run_secs[0]) < 1e9)
        assert timed, "no candidate built"
        candidates = [timed[0][2]]
        assert "dot_16x4_vnni" in str(candidates[0].trace)
    else:  # nothing was timed: any candidate that tensorized and builds will do
        candidates = [r for r in records if "dot_16x4_vnni" in str(r.trace)]
    library = next(filter(None, (_built(record, target) for record in candidates)), None)
    assert library is not None, "no tensorized candidate built"
    assembly = "\n".join(module.inspect_source("asm") for module in [library.mod, *library.mod.imports]
                         if module.kind == "llvm")
    assert "vpdpbusd" in assembly
    if not HAS_VNNI:
        pytest.skip(NO_VNNI)

    out = tvm.runtime.tensor(np.zeros(expected.shape, np.int32))
    library(tvm.runtime.tensor(a), tvm.runtime.tensor(weight), out)
    # Extremes included (255 x -128, 4 at a time): vpdpbusd adds in int32 and never saturates.
    np.testing.assert_array_equal(out.numpy(), expected)


def test_candidates_that_vectorize_around_the_intrinsic_are_dropped_before_they_are_built(tmp_path):
    """A 7x7 kernel (PP-LCNet's last stage): MetaSchedule's own postprocessors vectorize the loop over 16-output
    tiles around the tensorized vpdpbusd body in many candidates, and LLVM codegen fails each ("Cannot broadcast
    lanes=16 to 64"): a failed trial. dot_intrinsics.search_space drops exactly those before building."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import PyBuilder

    from pipeline.compiler.passes.dot_intrinsics import search_space, vector_code_in_vectorized_loop
    from pipeline.compiler.tuning.lowering import unnamed_handlers_detached
    from pipeline.compiler.tuning.search import forked_builder

    register_vnni_intrinsic()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    mod = tvm.IRModule({"main": dot_matmul((1, 7, 7), 128, 128).with_attr("global_symbol", "main")})

    def built(space, name: str) -> list[tuple[bool, bool]]:
        """(failed to build, flagged) for each of 16 random candidates."""
        seen = []
        inner = forked_builder()

        @derived_object
        class Watching(PyBuilder):
            def build(self, build_inputs):
                results = inner.build(build_inputs)
                seen.extend((bool(r.error_msg), vector_code_in_vectorized_loop(i.mod))
                            for r, i in zip(results, build_inputs, strict=True))
                return results

        with unnamed_handlers_detached():
            ms.tune_tir(mod, target, str(tmp_path / name), max_trials_global=16, num_trials_per_iter=16,
                        builder=Watching(), runner=_runner(), strategy="replay-trace", seed=7, space=space)
        return seen

    default = built("post-order-apply", "default")
    assert any(failed for failed, _ in default), "no candidate failed: the case this guards against didn't occur"
    assert all(failed == flagged for failed, flagged in default)  # the check flags exactly the ones that fail
    checked = built(search_space(), "checked")
    assert len(checked) == 16 and not any(failed for failed, _ in checked)
