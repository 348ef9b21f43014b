"""Stage 3, compile: the only module that imports tvm.

TVM Relax imports the (static, possibly QDQ) ONNX model and builds a shared library for the
profile's target, cross-linked where the device is another architecture. The manifest written
next to it ties the library to its model, profile, scheme and tool versions by sha256.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import onnx
import tvm
from tvm.relax.frontend import onnx as onnx_frontend

from edgedeploy.errors import CompileError
from pipeline.ingest import ModelInfo
from pipeline.manifest import ELF_MACHINES, CompiledArtifact, elf_machine, profile_sha256, write_manifest
from pipeline.quantize import QuantizedModel
from targets.profiles import DeviceProfile

__all__ = ["ELF_MACHINES", "CompiledArtifact", "compile_model", "elf_machine", "profile_sha256",
           "tvm_importable_ops"]

def resolve_target(profile: DeviceProfile) -> dict[str, Any]:
    """The profile's CPU target with a host-detected mcpu filled in (the `local` profile leaves it open)."""
    target = profile.tvm_target()
    if "mcpu" not in target:
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    return target


def _build(mod: tvm.IRModule, cpu: dict[str, Any], gpu: dict[str, Any] | None):
    if gpu is None:
        return tvm.compile(mod, target=tvm.target.Target(cpu))
    # CUDA needs every kernel bound to threads: dlight's default GPU schedules do that (no tuning).
    import tvm.s_tir.dlight as dl
    from tvm import relax

    target = tvm.target.Target(gpu, host=cpu)
    with target:
        mod = tvm.ir.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=target)


def _device_code(executable) -> str:
    """What the library carries for the GPU: 'cuda-source' (compiled on the device), 'cuda-cubin', 'cuda-ptx';
    'cpu' without a GPU."""
    todo = list(executable.mod.imports)
    while todo:
        module = todo.pop()
        if getattr(module, "kind", "") == "cuda":
            # With a CUDA toolkit that can't target the GPU (CUDA 13 dropped sm_53), TVM keeps only the
            # CUDA C source; the board's own toolkit must compile it. Say which one this library holds.
            for fmt in ("cubin", "ptx"):
                if module.inspect_source(fmt):
                    return f"cuda-{fmt}"
            return "cuda-source"
        todo.extend(module.imports)
    return "cpu"


def compile_model(
    quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, workdir: Path
) -> CompiledArtifact:
    """Import into TVM Relax, build for the profile's CPU, export the library, write the manifest."""
    target_dict = resolve_target(profile)
    gpu_dict = profile.tvm_gpu_target()
    started = time.perf_counter()
    try:
        model = onnx.load(quantized.path)
        shape_dict = {spec.name: list(spec.shape) for spec in info.inputs}
        mod = onnx_frontend.from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
        executable = _build(mod, target_dict, gpu_dict)
        library = workdir / "model.so"
        executable.export_library(str(library), **({"cc": profile.cross_compiler} if profile.cross_compiler else {}))
    except Exception as exc:
        raise CompileError(
            f"TVM could not compile the {quantized.config.label()} model for profile {profile.name!r}",
            value=str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__,
            fix="run `deploy check` to see which ops the compiler can't import",
            target=json.dumps(gpu_dict or target_dict),
        ) from exc
    seconds = time.perf_counter() - started
    machine = elf_machine(library)
    if machine != ELF_MACHINES.get(profile.cpu.arch):
        raise CompileError(
            f"The library is not a {profile.cpu.arch} shared object", value=f"ELF e_machine {machine}",
            expected=f"e_machine {ELF_MACHINES.get(profile.cpu.arch)}",
            fix=f"check the profile's cross_compiler ({profile.cross_compiler or 'host cc'})",
        )
    device_code = _device_code(executable)
    return write_manifest(
        library, quantized, info, profile, runtime="tvm", seconds=seconds,
        extra={"target": target_dict, "gpu_target": gpu_dict, "device_code": device_code, "elf_machine": machine},
    )


def tvm_importable_ops() -> frozenset[str]:
    """ONNX op types TVM's Relax frontend can import (its converter table)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map())
