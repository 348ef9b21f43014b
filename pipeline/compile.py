"""Stage 3, compile: the only module that imports tvm.

TVM Relax imports the (static, possibly QDQ) ONNX model and builds a shared library for the
profile's target, cross-linked where the device is another architecture. The manifest written
next to it ties the library to its model, profile, scheme and tool versions by sha256.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import tvm
from pydantic import BaseModel, ConfigDict, Field
from tvm.relax.frontend import onnx as onnx_frontend

from edgedeploy.errors import CompileError
from pipeline.hashing import sha256_bytes
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


class Tuning(BaseModel):
    """MetaSchedule tuning of this build: how many trials were added, in how long, to which database."""

    model_config = ConfigDict(frozen=True)
    trials_per_task: int
    tasks: int
    seconds: float
    database: str
    records: int = Field(description="Tuning records in the database after this run (all runs, all models).")


EVOLUTIONARY_MIN_TRIALS = 64


def tuning_dir(target: dict[str, Any], root: Path) -> Path:
    """One persistent database per target: a workload tuned once serves every later run and model."""
    return root / sha256_bytes(json.dumps(target, sort_keys=True).encode())[:16]


def _fused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Lower Relax ops to TIR and fuse them: what both MetaSchedule (tasks to tune) and dlight (kernels to
    bind to GPU threads) work on."""
    from tvm import relax

    with target:
        return tvm.ir.transform.Sequential([
            relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts worker processes that each spend ~40 s importing TVM's tensor
    intrinsics; building in this process takes 0.1-0.5 s per candidate."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, item.params)),
                                                 None))
                except Exception as exc:  # a candidate that doesn't build is a failed trial, not a failed run
                    results.append(BuilderResult(None, str(exc)))
            return results

    return InProcessBuilder()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """MetaSchedule logs to the process's stdout (Python handlers bound at import, and C++), which belongs to
    --json: point file descriptor 1 at stderr while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    moved = [h for name in list(logging.Logger.manager.loggerDict) if name.startswith("tvm")
             for h in getattr(logging.getLogger(name), "handlers", [])
             if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    try:
        os.dup2(2, 1)
        for handler in moved:
            handler.setStream(sys.stderr)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        for handler in moved:
            handler.setStream(sys.stdout)


def _tuned_build(mod: tvm.IRModule, cpu: dict[str, Any], trials: int, database_dir: Path):
    with _stdout_to_stderr():
        return _tune_and_compile(mod, cpu, trials, database_dir)


def _tune_and_compile(mod: tvm.IRModule, cpu: dict[str, Any], trials: int, database_dir: Path):
    """Add ``trials`` MetaSchedule trials per task (measured on THIS machine) and build from the database."""
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(cpu)
    mod = _fused(mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    database_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    database = ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=str(database_dir), max_trials_global=trials * max(len(tasks), 1),
        max_trials_per_task=trials, num_trials_per_iter=min(trials, 16), builder=_in_process_builder(),
        # The evolutionary search breeds a population of 2048 per round: worth it for real budgets, minutes
        # of overhead for a handful of trials, where random sampling of the design space does as well.
        strategy="evolutionary" if trials >= EVOLUTIONARY_MIN_TRIALS else "replay-trace",
    )
    seconds = time.perf_counter() - started
    executable = ms.relax_integration.compile_relax(database, mod, target, params=None)
    records = len(database.get_all_tuning_records())
    return executable, Tuning(trials_per_task=trials, tasks=len(tasks), seconds=seconds, database=str(database_dir),
                              records=records)


def _build(mod: tvm.IRModule, cpu: dict[str, Any], gpu: dict[str, Any] | None):
    if gpu is None:
        return tvm.compile(mod, target=tvm.target.Target(cpu))
    # CUDA needs every kernel bound to threads: dlight's default GPU schedules do that (no tuning).
    import tvm.s_tir.dlight as dl

    target = tvm.target.Target(gpu, host=cpu)
    mod = _fused(mod, target)
    with target:
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
    quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, workdir: Path, *,
    tune_trials: int = 0, tuning_root: Path | None = None,
) -> CompiledArtifact:
    """Import into TVM Relax, build for the profile's CPU (MetaSchedule-tuned when ``tune_trials`` > 0),
    export the library, write the manifest."""
    target_dict = resolve_target(profile)
    gpu_dict = profile.tvm_gpu_target()
    if tune_trials and (gpu_dict or profile.connection.transport != "local"):
        raise CompileError(
            f"Tuning for profile {profile.name!r} is not available yet",
            value=f"--tune-trials {tune_trials}",
            expected="a local CPU profile: tuning measures candidates on the machine they will run on, and "
                     "measuring on a remote board needs TVM's RPC server there, which edgedeploy doesn't start yet",
            fix="use --tune-trials 0 for this profile",
        )
    tuning = None
    started = time.perf_counter()
    try:
        model = onnx.load(quantized.path)
        shape_dict = {spec.name: list(spec.shape) for spec in info.inputs}
        mod = onnx_frontend.from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
        if tune_trials:
            root = tuning_root or workdir / "tuning"
            executable, tuning = _tuned_build(mod, target_dict, tune_trials, tuning_dir(target_dict, root))
        else:
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
    artifact = write_manifest(
        library, quantized, info, profile, runtime="tvm", seconds=seconds,
        extra={"target": target_dict, "gpu_target": gpu_dict, "device_code": device_code, "elf_machine": machine,
               "tuning": tuning.model_dump() if tuning else None},
    )
    return artifact.model_copy(update={"tuning": tuning.model_dump() if tuning else None})


@functools.cache
def tvm_importable_ops() -> frozenset[str]:
    """ONNX op types TVM's Relax frontend can import (its converter table)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map())
