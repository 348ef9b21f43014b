"""The build: TVM Relax imports the (static, possibly QDQ) ONNX model and builds a shared library for the
profile's target, cross-linked where the device is another architecture. The manifest written
next to it ties the library to its model, profile, scheme and tool versions by sha256.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import tvm

from edgedeploy.errors import CompileError, EdgeDeployError
from pipeline.compiler.frontend import relax_module, resolve_target, tvm_importable_ops
from pipeline.compiler.gpu import GpuCode, cuda_module, gpu_code, nvptx_refusal, packer, prepare_nvptx
from pipeline.compiler.intrinsics import load_tensor_intrinsics
from pipeline.compiler.passes.dot import (
    SDOT,
    count_dot_ops,
    count_vnni_ops,
    dot_ops_by_instruction,
)
from pipeline.compiler.passes.winograd import count_winograd_convs
from pipeline.compiler.tuning import records
from pipeline.compiler.tuning.defaults import default_schedules, vector_lanes
from pipeline.compiler.tuning.lowering import decompose, fused, register_cpu_rules
from pipeline.compiler.tuning.search import (
    TuningBoard,
    tuned_build,
    tuning_dir,
    tuning_refusal,
)
from pipeline.ingest import ModelInfo
from pipeline.manifest import ELF_MACHINES, CompiledArtifact, elf_machine, profile_sha256, write_manifest
from pipeline.quantize import QuantizedModel
from targets.hashing import sha256_bytes
from targets.host import cuda_tools
from targets.profiles import DeviceProfile

__all__ = ["ELF_MACHINES", "CompiledArtifact", "compile_model", "elf_machine", "profile_sha256",
           "tvm_importable_ops"]


def source_revision(paths: list[Path]) -> str:
    """A digest of the code that decides what a compiled library contains."""
    return sha256_bytes(b"".join(path.read_bytes() for path in paths))[:16]


# Part of the artifact cache key: a library built by other compiler code is not reused. Derived from the source
# files themselves, every one of this package (a hand-kept revision string was once left unchanged, and a library
# with the previous int8 layout was served from the cache; a hand-kept file list nearly left Winograd's out).
COMPILER_SOURCES = sorted(Path(__file__).parent.rglob("*.py"))
COMPILE_REVISION = source_revision(COMPILER_SOURCES)


def _cpu_build(mod: tvm.IRModule, cpu: dict[str, Any], lanes: int,
               tuning_database: Path | None = None) -> tuple[Any, dict[str, int]]:
    """An untuned CPU build with a default schedule for every kernel (tuning.defaults), or the best record the
    target's ``tuning_database`` has for it (tuned before, by any model on any host of the lab); how many of each."""
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(cpu)
    register_cpu_rules(target)
    decomposed = decompose(mod, target)
    tuned = records.best_for(tuning_database) if tuning_database else None
    database, scheduled, kernels, from_records = default_schedules(decomposed, target, lanes, tuned)
    executable = ms.relax_integration.compile_relax(database, decomposed, target, params=None)
    return executable, {"kernels": kernels, "default_scheduled": scheduled, "tuned_records": from_records,
                        "vector_lanes": lanes}


def _gpu_build(mod: tvm.IRModule, cpu: dict[str, Any], gpu: dict[str, Any]):
    # CUDA needs every kernel bound to threads: dlight's default GPU schedules do that (no tuning).
    import tvm.s_tir.dlight as dl

    tools = cuda_tools()
    if tools is None:  # compile_model refused before, with the fix
        raise CompileError("No CUDA 12 toolkit wheel for the GPU build", value="nvidia-cuda-nvcc-cu12: not installed")
    prepare_nvptx(tools.libdevice)
    target = tvm.target.Target(gpu, host=cpu)
    load_tensor_intrinsics(target)  # dlight's GPU rules import CUDA's: only those (compiler.intrinsics)
    mod = fused(mod, target)
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=target)


def _export(executable, library: Path, profile: DeviceProfile, host: dict[str, Any]) -> GpuCode | None:
    """The library file; for a GPU build, with its kernels as the board will load them (compiler.gpu)."""
    options: dict[str, Any] = {"cc": profile.cross_compiler} if profile.cross_compiler else {}
    code = None
    if profile.tvm_gpu_target():
        code = gpu_code(executable, profile)
        options["fpack_imports"] = packer(code, cuda_module(executable).inspect_source("ptx"), host)
    executable.export_library(str(library), **options)
    return code


def compile_model(
    quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, workdir: Path, *,
    tune_trials: int = 0, tune_minutes: float | None = None, tuning_root: Path | None = None,
    tuning_board: TuningBoard | None = None,
) -> CompiledArtifact:
    """Import into TVM Relax, build for the profile's CPU (MetaSchedule-tuned when ``tune_trials`` > 0: on a board
    reached over SSH, through the RPC server ``tuning_board(profile)`` opens there; untuned, each kernel takes the
    best record the target's database under ``tuning_root`` has, else a default schedule), export the library, write
    the manifest."""
    target_dict = resolve_target(profile)
    gpu_dict = profile.tvm_gpu_target()
    if tune_trials and (refusal := tuning_refusal(profile, tune_trials, tuning_board)):
        raise refusal
    if refusal := nvptx_refusal(profile):
        raise refusal
    tuning, schedules = None, None
    started = time.perf_counter()
    try:
        mod, integer_ops = relax_module(quantized, info, profile)
        if tune_trials:
            root = tuning_root or workdir / "tuning"
            executable, tuning = tuned_build(mod, target_dict, tune_trials, tuning_dir(target_dict, root), profile,
                                              minutes=tune_minutes, tuning_board=tuning_board)
        elif gpu_dict is None:
            database = tuning_dir(target_dict, tuning_root) if tuning_root else None
            executable, schedules = _cpu_build(mod, target_dict, vector_lanes(profile), database)
        else:
            executable = _gpu_build(mod, target_dict, gpu_dict)
        library = workdir / "model.so"
        gpu = _export(executable, library, profile, target_dict)
    except EdgeDeployError:  # tuning on a board: the device or the connection said what went wrong
        raise
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
    device_code = gpu.device_code if gpu else "cpu"
    artifact = write_manifest(
        library, quantized, info, profile, runtime="tvm", seconds=seconds,
        extra={"target": target_dict, "gpu_target": gpu_dict, "device_code": device_code,
               "gpu_code": gpu.summary if gpu else None, "elf_machine": machine,
               "tuning": tuning.model_dump() if tuning else None, "integer_ops": integer_ops,
               "vnni_ops": count_vnni_ops(mod), "sdot_ops": count_dot_ops(mod, (SDOT,)),
               "dot_ops": dot_ops_by_instruction(mod),
               "winograd_convs": count_winograd_convs(mod), "schedules": schedules},
    )
    return artifact.model_copy(update={"tuning": tuning.model_dump() if tuning else None})
