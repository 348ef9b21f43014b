"""Only the target's tensor intrinsics are registered (compiler.intrinsics): TVM's whole set costs 45-90 s of
CPU to parse, paid by every int8 build and every tuning run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import tvm

from pipeline.compiler.frontend import resolve_target
from pipeline.compiler.intrinsics import intrinsic_modules
from targets.profiles import load_profile

SUBMODULES = "sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin.'))"


def _fresh_python(code: str, tmp_path) -> object:
    """Run ``code`` in a new interpreter (this one may have imported TVM's whole set already); it writes a JSON
    value to the file ``OUT``."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("target", "modules"), [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}, ["x86"]),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, ["arm_cpu"]),
    ({"kind": "cuda", "arch": "sm_53", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}, ["cuda", "arm_cpu"]),
    ({"kind": "c"}, None),  # not known: the whole package, as TVM itself would import it
])
def test_the_intrinsics_a_target_needs(target, modules):
    assert intrinsic_modules(tvm.target.Target(target)) == modules


def test_an_x86_target_registers_x86s_intrinsics_and_no_others(tmp_path):
    result = _fresh_python(f"""
        import json, sys, tvm
        from tvm.s_tir import TensorIntrin
        from pipeline.compiler.intrinsics import load_tensor_intrinsics

        load_tensor_intrinsics(tvm.target.Target({{"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}))
        TensorIntrin.get("dot_16x4_vnni")  # raises if not registered
        import tvm.s_tir.tensor_intrin  # what MetaSchedule's TuneContext does: must not import the rest now
        json.dump({SUBMODULES}, open(OUT, "w"))
    """, tmp_path)
    assert result == ["x86"]


def test_an_unknown_target_gets_every_module_the_package_would_import(monkeypatch):
    from pipeline.compiler import intrinsics as tvm_intrinsics

    imported = []
    monkeypatch.setattr(tvm_intrinsics.importlib, "import_module", imported.append)
    tvm_intrinsics.load_tensor_intrinsics(tvm.target.Target({"kind": "c"}))
    assert {name.rsplit(".", 1)[1] for name in imported} == {"cuda", "rocm", "hexagon", "arm_cpu", "x86", "riscv_cpu"}


def test_the_tuning_builder_leaves_the_intrinsics_to_the_target(tmp_path):
    """Regression: the forked builder imported TVM's whole set; a board's tuning creates it before its target's
    intrinsics are registered, so tuning over SSH still paid 89 s of CPU."""
    result = _fresh_python(f"""
        import json, sys
        from pipeline.compiler.tuning.search import forked_builder

        forked_builder()
        json.dump({SUBMODULES}, open(OUT, "w"))
    """, tmp_path)
    assert result == []


@pytest.mark.slow
def test_a_tuned_int8_build_parses_no_gpu_intrinsics(tmp_path):
    """Regression: `deploy compile --quant int8` (and every tuning run) imported TVM's CUDA, ROCm, Hexagon, ARM
    and RISC-V intrinsics, 89 s of CPU in the `deploy` process before any work (digits-cnn int8: 85 s build)."""
    result = _fresh_python(f"""
        import json, os, runpy, sys
        os.environ["EDGEDEPLOY_SUPERVISED"] = "1"  # the command in this process, not under the launcher's child
        sys.argv = ["deploy", "compile", "digits-cnn", "--quant", "int8", "--tune-trials", "1",
                    "--out", {str(tmp_path / "out")!r}]
        try:
            runpy.run_module("edgedeploy", run_name="__main__")
        except SystemExit as stop:
            assert not stop.code, stop.code
        json.dump({SUBMODULES}, open(OUT, "w"))
    """, tmp_path)
    assert result == intrinsic_modules(tvm.target.Target(resolve_target(load_profile("local"))))  # ["x86"] here
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tuning"]["records"] > 0
