"""GPU code for the Jetsons, read back from the library file itself: a fat binary whose PTX a JetPack 4.6 driver
JIT-compiles (ISA <= 6.5, every kernel an ``.entry``) and whose cubin is the board's exact SM. No GPU needed: what a
driver will be handed is all in the file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from pipeline.compiler.gpu import FATBIN_MAGIC, PTX_ISA_FOR_CUDA, fatbin_entries
from scripts.make_yolov5s import build_yolov5
from targets.host import cuda_tools

REPO = Path(__file__).resolve().parents[2]


def fat_binary_in(library: Path) -> bytes:
    """The fat binary packed into a TVM library (its imports blob carries the CUDA module's bytes as they are)."""
    data = library.read_bytes()
    start = data.find(FATBIN_MAGIC.to_bytes(4, "little"))
    assert start >= 0, "no fat binary in the library"
    header_size = int.from_bytes(data[start + 6:start + 8], "little")
    body = int.from_bytes(data[start + 8:start + 16], "little")
    return data[start:start + header_size + body]


def ptx_of(fatbin: bytes) -> str:
    """The PTX entry's text (uncompressed: the fat binary is built without compression for old drivers)."""
    header_size = int.from_bytes(fatbin[6:8], "little")
    offset = header_size
    for entry in fatbin_entries(fatbin):
        entry_header = int.from_bytes(fatbin[offset + 4:offset + 8], "little")
        if entry["kind"] == "ptx":
            payload = fatbin[offset + entry_header:offset + entry_header + entry["bytes"]]
            return payload.rstrip(b"\0").decode()
        offset += entry_header + entry["bytes"]
    raise AssertionError("no PTX entry")


def test_the_isa_table_covers_the_profiles_cuda_versions():
    from targets.profiles import available_profiles, load_profile

    for name in available_profiles():
        gpu = load_profile(name).gpu
        assert gpu is None or gpu.cuda_version in PTX_ISA_FOR_CUDA, name
    assert PTX_ISA_FOR_CUDA["10.2"] == (6, 5)  # JetPack 4.6


@pytest.mark.slow
def test_a_yolov5_export_compiles_for_the_nano_in_fp16_into_ptx_and_an_sm53_cubin(tmp_path):
    """`deploy compile --profile jetson-nano --quant fp16 yolov5.onnx`: the library holds sm_53 PTX at ISA <= 6.5 with
    every kernel an .entry, and the sm_53 cubin; the manifest says ptx+cubin."""
    if cuda_tools() is None:
        pytest.fail("nvidia-cuda-nvcc-cu12 is not installed: run `make setup`")
    model = tmp_path / "yolov5n.onnx"
    onnx.save(build_yolov5(size="n", imgsz=320, opset=12, seed=0), str(model))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "edgedeploy", "compile", str(model), "--profile", "jetson-nano",
                           "--quant", "fp16", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "EDGEDEPLOY_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["device_code"] == "ptx+cubin"
    assert summary["gpu_target"] == {"kind": "nvptx", "mcpu": "sm_53", "mtriple": "nvptx64-nvidia-cuda"}
    manifest = json.loads((out / "manifest.json").read_text())
    fatbin = fat_binary_in(out / "model.so")
    entries = {(e["kind"], e["arch"]) for e in fatbin_entries(fatbin)}
    assert entries == {("ptx", 53), ("cubin", 53)}
    ptx = ptx_of(fatbin)
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    assert version and (int(version[1]), int(version[2])) <= (6, 5)
    assert re.search(r"^\.target sm_53", ptx, re.M)
    entry_points = re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M)
    assert len(entry_points) == manifest["gpu_code"]["kernels"] > 10
    # fp16 in memory and half-precision instructions for the elementwise work (TVM's conv kernels load fp16 and
    # accumulate in fp32: fma.rn.f32 between cvt.f32.f16 and cvt.rn.f16.f32, docs/gpu.md)
    assert re.search(r"^\s*(add|mul|sub)\.f16\s", ptx, re.M) and re.search(r"^\s*cvt\.rn\.f16\.f32\s", ptx, re.M)


def _tiny_gpu_executable(profile):
    """An fp16 softmax-like kernel (exp in float16, a block-wide reduction with barriers), built as compile_model
    builds GPU code: the two TVM 0.27 + LLVM 22 gaps in one small module."""
    import tvm
    import tvm.s_tir.dlight as dl
    from tvm import te, topi

    from pipeline.compiler.gpu import prepare_nvptx

    prepare_nvptx(cuda_tools().libdevice)
    x = te.placeholder((4, 1024), "float16", name="x")
    e = topi.exp(x)
    total = topi.sum(e, axis=1)
    mod = tvm.IRModule({"main": te.create_prim_func([x, total])})
    target = tvm.target.Target(profile.tvm_gpu_target(), host={"kind": "llvm"})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=target)


def test_the_orin_gets_its_own_sm_and_an_isa_its_cuda_12_6_driver_jits():
    from pipeline.compiler.gpu import gpu_code
    from targets.profiles import load_profile

    if cuda_tools() is None:
        pytest.fail("nvidia-cuda-nvcc-cu12 is not installed: run `make setup`")
    orin = load_profile("jetson-orin-nano")
    code = gpu_code(_tiny_gpu_executable(orin), orin)
    assert code.device_code == "ptx+cubin" and code.summary["sm"] == "sm_87"
    assert tuple(map(int, code.summary["ptx_isa"].split("."))) <= PTX_ISA_FOR_CUDA["12.6"]
    assert {(e["kind"], e["arch"]) for e in code.summary["fatbin"]} == {("ptx", 87), ("cubin", 87)}


def test_an_unknown_cuda_release_is_judged_by_the_nearest_older_one():
    from pipeline.compiler.gpu import ptx_isa_for

    assert ptx_isa_for("10.2") == (6, 5) and ptx_isa_for("12.7") == PTX_ISA_FOR_CUDA["12.6"]


@pytest.mark.parametrize("cubin", [True, False])
def test_kernels_are_entries_and_the_library_carries_what_the_profile_asks(tmp_path, cubin):
    from pipeline.compiler.gpu import cuda_module, gpu_code, packer
    from targets.profiles import load_profile

    if cuda_tools() is None:
        pytest.fail("nvidia-cuda-nvcc-cu12 is not installed: run `make setup`")
    nano = load_profile("jetson-nano")
    profile = nano.model_copy(update={"gpu": nano.gpu.model_copy(update={"cubin": cubin})})
    executable = _tiny_gpu_executable(profile)
    code = gpu_code(executable, profile)
    assert code.device_code == ("ptx+cubin" if cubin else "ptx") and code.summary["ptx_isa"] == "4.2"
    library = tmp_path / "tiny.so"
    executable.export_library(str(library), fpack_imports=packer(code, cuda_module(executable).inspect_source("ptx"),
                                                                 {"kind": "llvm"}))
    if cubin:
        ptx = ptx_of(fat_binary_in(library))
        assert {(e["kind"], e["arch"]) for e in fatbin_entries(fat_binary_in(library))} == {("ptx", 53), ("cubin", 53)}
    else:
        data = library.read_bytes()
        start = data.index(b"//\n// Generated by LLVM NVPTX")
        ptx = data[start:data.index(b"\n}\n", data.rindex(b".entry", start)) + 3].decode()
    assert re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M) and not re.findall(r"^\.visible \.func", ptx, re.M)
    # the barrier as LLVM 21 takes it; fp16 exp through libdevice's float32 expf (inlined: ex2.approx)
    assert "bar.sync" in ptx and "ex2.approx.ftz.f32" in ptx
