"""ARM dotprod (the Raspberry Pi 5's Cortex-A76): integer kernels laid out for ``sdot`` compute exactly what the plain
integer kernels compute (uint8 activations shifted to int8 and the shift added back), and MetaSchedule's candidates
for an aarch64 +dotprod target really are sdot code, exact when run on the emulated aarch64 board."""

from __future__ import annotations

import subprocess
import textwrap

import numpy as np
import pytest

from targets.profiles import load_profile
from tests.lab import aarch64_python
from tests.pipeline.test_tvm_vnni import _reference_conv, quantized_pointwise_model

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from pipeline.compiler.frontend import dot_layout  # noqa: E402
from pipeline.compiler.passes.dot import (  # noqa: E402
    AVX2,
    NEON,
    SDOT,
    VNNI,
    DotLayout,
    count_dot_ops,
    dot_conv,
    dot_convs,
    dot_matmul,
    packed_weight,
)
from pipeline.compiler.passes.int8 import integerize  # noqa: E402
from pipeline.compiler.passes.layout import channels_last  # noqa: E402

pytestmark = pytest.mark.slow
PI5 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"],
       "num-cores": 4}
PI4 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}


def test_the_profiles_pick_their_dot_product_instruction():
    assert dot_layout(load_profile("raspberry-pi-5")) is SDOT
    assert dot_layout(load_profile("x86-server-vnni")) is VNNI
    assert dot_layout(load_profile("x86-server")) is AVX2
    assert dot_layout(load_profile("raspberry-pi-4")) is NEON  # the A72 has no dotprod
    nano = load_profile("jetson-nano")
    assert dot_layout(nano) is None  # TVM builds for its GPU: integer kernels are CUDA's
    tvm_on_cpu = nano.runtimes.tvm.model_copy(update={"unit": "cpu"})
    on_its_cpu = nano.model_copy(update={"runtimes": nano.runtimes.model_copy(update={"tvm": tvm_on_cpu})})
    assert dot_layout(on_its_cpu) is NEON  # the A57


def test_packed_weight_puts_each_4x4_sdot_tile_in_16_contiguous_bytes():
    w = np.random.default_rng(0).integers(-127, 128, (8, 8), dtype=np.int8)
    packed = packed_weight(w, SDOT)
    assert packed.shape == (2, 2, 4, 4) and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed[1, 0], w[4:8, 0:4])


def test_uint8_activations_reach_the_sdot_kernels_shifted_and_the_results_are_identical(tmp_path):
    """Every conv and the Gemm of a U8S8 model become sdot kernels reading int8 (x - 128); the 128 * sum(w) added
    back makes the int32 sums, and so the outputs, exactly the plain integer kernels'. Built for this machine: the
    kernels untuned are plain loops, the same arithmetic the board runs; the 3x3 conv after a Relu keeps its zero
    padding, which the shift turns into -128 (and the compensation back)."""
    _, mod, rng = quantized_pointwise_model(tmp_path)

    plain, _ = integerize(mod)
    sdot, count = integerize(mod, dot=SDOT)
    sdot = dot_convs(channels_last(sdot), SDOT)
    assert count == 5 and count_dot_ops(sdot, (SDOT,)) == 5 and count_dot_ops(sdot, (VNNI,)) == 0
    names = sorted(gvar.name_hint for gvar in sdot.get_global_vars() if gvar.name_hint.startswith("sdot_"))
    assert names == ["sdot_conv_1x10x8x24_3x3s2d2x1_16", "sdot_conv_1x8x8x16_3x3s1_24", "sdot_matmul_1x144x16",
                     "sdot_matmul_1x6x6x32x16", "sdot_matmul_1x6x6x8x32"], names  # 24 outputs: whole 4-lane tiles

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    run_plain, run_sdot = (relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"]
                           for m in (plain, sdot))
    for x in rng.uniform(-1, 3, (4, 1, 8, 6, 6)).astype(np.float32):
        np.testing.assert_array_equal(run_sdot(tvm.runtime.tensor(x)).numpy(),
                                      run_plain(tvm.runtime.tensor(x)).numpy())


RUN_ON_BOARD = textwrap.dedent("""
    import sys
    import numpy as np
    import tvm
    for path in sys.argv[1:]:
        with np.load(path + ".npz") as data:
            a, w, expected = data["a"], data["w"], data["expected"]
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.int32))
        tvm.runtime.load_module(path)["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
        print(path, "exact" if np.array_equal(out.numpy(), expected) else "WRONG")
""")


@pytest.mark.parametrize(("board", "layout", "mnemonic"), [(PI5, SDOT, "sdot\tv"), (PI4, NEON, "smull\tv")],
                         ids=["pi5-sdot", "pi4-neon"])
def test_tuning_candidates_for_arm_are_dot_code_and_exact_on_the_emulated_board(tmp_path, board: dict,
                                                                                layout: DotLayout, mnemonic: str):
    """MetaSchedule's design space for cortex-a76 +dotprod tensorizes the kernels with TVM's dot_4x4_i8i8s32_sdot, for
    the Pi 4's cortex-a72 (no dotprod) with dot_4x4_i8i8s32_neon (smull + saddlp) on the same 4 x 4 tiles (its ARM
    rules, through the same search space as VNNI's): each kind of kernel, one candidate each, built for aarch64, must
    hold those instructions and, run on the emulated board, give numpy's int32 sums bit for bit, extremes (-128 x
    -128, 4 at a time) included."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.intrinsics import load_modules
    from pipeline.compiler.passes.dot_intrinsics import search_space

    python = aarch64_python()
    if python is None:
        pytest.fail("the emulated aarch64 board is not built: run `make setup` (scripts/make_aarch64_root.sh)")
    load_modules("arm_cpu")
    target = tvm.target.Target(board)
    rng = np.random.default_rng(0)
    c, n = 32, 32
    a = rng.integers(-128, 128, (1, 9, 9, c), dtype=np.int8)
    a[0, 0, 0, :4] = -128
    hwio = rng.integers(-128, 128, (3, 3, c, n), dtype=np.int8)
    hwio[0, 0, :4, 0] = -128
    w = np.ascontiguousarray(hwio[0, 0].T)
    cases = {
        "matmul": (dot_matmul((81,), c, n, layout), a.reshape(81, c), w, a.reshape(81, c).astype(np.int32) @ w.T),
        "conv1x1": (dot_matmul((1, 9, 9), c, n, layout), a, w, a.astype(np.int32) @ w.astype(np.int32).T),
        "conv3x3s2": (dot_conv(a.shape, (3, 3), (2, 2), (1, 1), n, layout), a, hwio.reshape(-1, n).T,
                      _reference_conv(a, hwio, 2)),
    }
    libraries = []
    for name, (func, operand, rows, expected) in cases.items():
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        built = None
        for seed in range(8):  # a candidate its postprocessors accept (some vectorize around the intrinsic)
            context = ms.TuneContext(mod=mod, target=target, space_generator=search_space(), task_name=name,
                                     search_strategy="replay-trace", num_threads=1, rand_state=seed)
            for schedule in context.generate_design_space():
                assert layout.intrinsic in str(schedule.trace), name
                if all(postproc.apply(schedule) for postproc in context.space_generator.postprocs):
                    built = tvm.compile(schedule.mod, target=target)
                    break
            if built:
                break
        assert built is not None, f"no {name} candidate passed the postprocessors"
        assembly = "\n".join(m.inspect_source("asm") for m in [built.mod, *built.mod.imports] if m.kind == "llvm")
        assert mnemonic in assembly, name
        if layout is NEON:  # the A72 would stop on an illegal instruction (qemu's CPU has dotprod: it wouldn't)
            assert "sdot" not in assembly, name
        library = tmp_path / f"{name}.so"
        built.export_library(str(library), cc="aarch64-linux-gnu-gcc")
        np.savez(f"{library}.npz", a=operand, w=packed_weight(np.ascontiguousarray(rows), layout),
                 expected=expected.astype(np.int32))
        libraries.append(str(library))
    script = tmp_path / "run.py"
    script.write_text(RUN_ON_BOARD)
    done = subprocess.run([*python, str(script), *libraries], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split().count("exact") == len(cases), done.stdout


@pytest.mark.parametrize(("board", "extra"), [
    ("raspberry-pi-4", ""),
    # A Jetson Nano whose TVM runs on its Cortex-A57 (TVM's runtime built with a newer Python beside the system's 3.6)
    ("jetson-nano", "python_version: '3.10'\nruntimes:\n  tvm: {version: 0.27.0, unit: cpu}\n"),
], ids=["pi4", "nano-cpu"])
def test_arm_boards_without_dotprod_get_neon_kernels_in_their_int8_libraries(tmp_path, board, extra):
    """The int8 library for the Pi 4 and for a Nano's CPU lays its integer convs and Gemm out for NEON's smull +
    saddlp, counted in the manifest, cross-compiled for aarch64."""
    import json

    from pipeline.compile import build
    from pipeline.config import RunConfig
    from pipeline.quantize import QuantConfig
    from pipeline.workloads import WORKLOADS

    profile_file = tmp_path / "board.yaml"
    profile_file.write_text(f"extends: {board}\nname: lab-{board}\n{extra}")
    config = RunConfig(model_path=str(WORKLOADS["digits-cnn"].model_path()), profile=str(profile_file),
                       quant=QuantConfig(scheme="int8"), runtime="tvm")
    result = build(config, load_profile(str(profile_file)), tmp_path / "out")
    manifest = json.loads(open(result.artifact.manifest_path).read())
    assert manifest["dot_ops"] == {"smull+saddlp": 3} == result.artifact.dot_ops
    assert manifest["target"]["mcpu"] in ("cortex-a72", "cortex-a57") and manifest["elf_machine"] == 183  # aarch64
