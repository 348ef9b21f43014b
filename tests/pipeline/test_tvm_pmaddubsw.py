"""x86 int8 without VNNI: kernels laid out for VPMADDUBSW (AVX2's 256-bit, AVX-512BW's 512-bit), exact where the
weights can't saturate its 16-bit pair sums, plain integer kernels elsewhere; the profiles pick them and the checks
give TVM 7-bit weights there."""

from __future__ import annotations

import numpy as np
import pytest

from targets.host import detect_host
from targets.profiles import load_profile
from tests.pipeline.test_tvm_vnni import _reference_conv, quantized_pointwise_model

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from pipeline.compiler.frontend import dot_layout  # noqa: E402
from pipeline.compiler.passes.dot import (  # noqa: E402
    AVX2,
    AVX512BW,
    VNNI,
    DotLayout,
    count_dot_ops,
    dot_conv,
    dot_convs,
    dot_matmul,
    dot_ops_by_instruction,
    exact,
    packed_weight,
)
from pipeline.compiler.passes.int8 import integerize  # noqa: E402
from pipeline.compiler.passes.layout import channels_last  # noqa: E402

pytestmark = pytest.mark.slow
HOST = set(detect_host().features)


def test_x86_profiles_without_vnni_pick_vpmaddubsw():
    assert dot_layout(load_profile("x86-server")) is AVX2
    server = load_profile("x86-server")
    skylake = server.model_copy(update={"cpu": server.cpu.model_copy(
        update={"mcpu": "skylake-avx512", "features": ["avx2", "fma", "avx512f", "avx512bw"]})})
    assert dot_layout(skylake) is AVX512BW
    vnni = skylake.model_copy(update={"cpu": skylake.cpu.model_copy(
        update={"mcpu": "cascadelake", "features": ["avx512bw", "avx512_vnni"]})})
    assert dot_layout(vnni) is VNNI
    # What LLVM's target has decides, not the feature list: code for it must not hold what its mcpu lacks.
    claims = server.model_copy(update={"cpu": server.cpu.model_copy(update={"features": ["avx512bw", "avx512_vnni"]})})
    assert dot_layout(claims) is AVX2
    old = server.model_copy(update={"cpu": server.cpu.model_copy(update={"mcpu": "x86-64", "features": ["sse4_2"]})})
    assert dot_layout(old) is None


@pytest.mark.parametrize("layout", [AVX2, AVX512BW], ids=["avx2", "avx512bw"])
def test_exact_takes_weights_whose_pair_sums_fit_16_bits(layout: DotLayout):
    """255 x (w0 + w1) must fit int16 for every neighbour pair of same-sign weights: 64 + 64 does, 65 + 64 doesn't."""
    rows = np.zeros((layout.lanes, 8), np.int8)
    rows[0, :2] = 64
    rows[1, 2:4] = -64
    rows[2, 4:6] = (-128, 127)  # opposite signs never add up: fine whatever the activations
    assert exact(rows, layout)
    for pair in ((65, 64), (-65, -64), (127, 127)):
        bad = rows.copy()
        bad[3, 6:8] = pair
        assert not exact(bad, layout), pair
    seven_bit = np.random.default_rng(0).integers(-64, 65, (32, 64), dtype=np.int8)
    assert exact(seven_bit, layout)
    assert exact(np.full((4, 8), 127, np.int8), VNNI)  # vpdpbusd adds in int32: anything goes


def test_7_bit_weights_become_avx2_kernels_and_8_bit_ones_stay_plain_with_the_same_results(tmp_path):
    """With reduce_range every conv and the Gemm is laid out for VPMADDUBSW; 8-bit weights (whose pairs could
    saturate) keep the plain integer kernels, which add in int32. Outputs identical to the plain build either way."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    for reduce_range, expected in ((True, 5), (False, 0)):
        folder = tmp_path / ("7-bit" if reduce_range else "8-bit")
        folder.mkdir()
        _, mod, rng = quantized_pointwise_model(folder, reduce_range=reduce_range)
        plain, count = integerize(mod)
        avx2, _ = integerize(mod, dot=AVX2)
        avx2 = dot_convs(channels_last(avx2), AVX2)
        assert count == 5 and count_dot_ops(avx2, (AVX2,)) == expected, reduce_range
        assert dot_ops_by_instruction(avx2) == ({"vpmaddubsw (256-bit)": 5} if expected else {})
        run_plain, run_avx2 = (relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"]
                               for m in (plain, avx2))
        for x in rng.uniform(-1, 3, (3, 1, 8, 6, 6)).astype(np.float32):
            np.testing.assert_array_equal(run_avx2(tvm.runtime.tensor(x)).numpy(),
                                          run_plain(tvm.runtime.tensor(x)).numpy())


def _candidate(func, target, layout: DotLayout):
    """One tensorized candidate of MetaSchedule's design space for ``func`` on ``target`` that builds."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.passes.dot_intrinsics import search_space

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for seed in range(8):  # some candidates don't pass the postprocessors (vectorized around the intrinsic)
        context = ms.TuneContext(mod=mod, target=target, space_generator=search_space(avx2=layout is AVX2),
                                 task_name="kernel", search_strategy="replay-trace", num_threads=1, rand_state=seed)
        for schedule in context.generate_design_space():
            assert layout.intrinsic in str(schedule.trace)
            if all(postproc.apply(schedule) for postproc in context.space_generator.postprocs):
                return tvm.compile(schedule.mod, target=target)
    return None


@pytest.mark.parametrize(("layout", "mcpu", "register", "needs"),
                         [(AVX2, "haswell", "ymm", "avx2"), (AVX512BW, "skylake-avx512", "zmm", "avx512bw")],
                         ids=["avx2", "avx512bw"])
@pytest.mark.parametrize("kernel", ["matmul", "3x3-conv-stride-2"])
def test_tuning_candidates_are_vpmaddubsw_code_exact_with_7_bit_weights(layout, mcpu, register, needs, kernel):
    """MetaSchedule's candidates tensorize with the layout's intrinsic (ours for AVX2, which MetaSchedule's own rules
    lack; TVM's dot_16x4_avx512 for AVX-512BW) and are vpmaddubsw code on the register width; run here, they give
    numpy's int32 sums for 7-bit weights at the extremes (255 x 64, twice a pair), and wrong ones for 8-bit weights
    that saturate, the case :func:`exact` keeps out."""
    rng = np.random.default_rng(0)
    c, n = 32, 32
    a = rng.integers(0, 256, (1, 9, 9, c), dtype=np.uint8)
    a[0, :3, :3, :] = 255
    hwio = rng.integers(-64, 65, (3, 3, c, n), dtype=np.int8)
    hwio[0, 0, :2, 0], hwio[0, 0, :2, 1] = 64, -64
    if kernel == "matmul":
        func = dot_matmul((81,), c, n, layout)
        w = np.ascontiguousarray(hwio[0, 0].T)
        operand = a.reshape(81, c)

        def expected(weights):
            return operand.astype(np.int32) @ weights.astype(np.int32).T
    else:
        func = dot_conv(a.shape, (3, 3), (2, 2), (1, 1), n, layout)
        w = np.ascontiguousarray(hwio.reshape(-1, n).T)
        operand = a

        def expected(weights):
            return _reference_conv(a, np.ascontiguousarray(weights.T).reshape(3, 3, c, n), 2)
    built = _candidate(func, tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2}), layout)
    assert built is not None, "no candidate passed the postprocessors"
    assembly = "\n".join(m.inspect_source("asm") for m in [built.mod, *built.mod.imports] if m.kind == "llvm")
    assert "vpmaddubsw" in assembly and f"%{register}" in assembly and "vpdpbusd" not in assembly
    if needs not in HOST:
        pytest.skip(f"this CPU has no {needs}: the kernel was built and inspected, not run")

    def run(weights):
        out = tvm.runtime.tensor(np.zeros(expected(weights).shape, np.int32))
        built(tvm.runtime.tensor(operand), tvm.runtime.tensor(packed_weight(weights, layout)), out)
        return out.numpy()

    assert exact(w, layout)
    np.testing.assert_array_equal(run(w), expected(w))
    saturating = w.copy()
    saturating[:, :2] = 127  # 255 x 127 x 2 = 64770: beyond int16
    assert not exact(saturating, layout)
    assert not np.array_equal(run(saturating), expected(saturating))


def test_the_checks_give_tvm_7_bit_weights_only_where_vpmaddubsw_reads_them():
    """7-bit weights cost accuracy: only for uint8 activations (the layouts read nothing else) on x86 without AVX-512
    VNNI; a CPU with only the 256-bit AVX-VNNI (which TVM has no layout for) gets them too."""
    from pipeline.checks_x86 import check_ort_int8_x86
    from pipeline.quantize import QuantConfig

    server = load_profile("x86-server")
    u8, s8 = QuantConfig(scheme="int8"), QuantConfig(scheme="int8", activation_type="int8")
    assert check_ort_int8_x86(server, u8, "tvm")[1].reduce_range
    assert not check_ort_int8_x86(server, s8, "tvm")[1].reduce_range
    assert not check_ort_int8_x86(load_profile("x86-server-vnni"), u8, "tvm")[1].reduce_range
    alder_lake = server.model_copy(update={"cpu": server.cpu.model_copy(
        update={"features": ["avx2", "fma", "avx_vnni"], "int8_dot_product": True})})
    assert check_ort_int8_x86(alder_lake, u8, "tvm")[1].reduce_range
    assert not check_ort_int8_x86(alder_lake, u8, "onnxruntime")[1].reduce_range  # its VNNI kernels add in 32 bits
