"""The `deploy run` flow: ingest -> check -> data -> [partial] -> quantize -> compile -> deploy -> benchmark -> report.

Tasks pass pydantic models (JSON-serialisable) and file paths, never in-memory arrays. Without
PREFECT_API_URL, Prefect starts its temporary local server for the run (the embedded default).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from edgedeploy.errors import EdgeDeployError
from flows.auto import auto_select
from flows.tasks import (
    benchmark_task,
    board_state_now,
    check_task,
    compile_task,
    data_task,
    deploy_task,
    ingest_task,
    partial_task,
    quantize_task,
    record_task,
    tuned_or_before,
    tvm_on_the_gpu,
)
from pipeline import progress
from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.report import RunResult
from pipeline.session import with_board_state
from pipeline.versions import tool_versions
from targets.profiles import DeviceProfile, load_profile


def _timed(stage: str, timings: dict[str, float], fn, *args):
    progress.emit(stage, "start")
    started = time.perf_counter()
    try:
        result = fn(*args)
    except BaseException as exc:
        progress.emit(stage, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    timings[stage] = time.perf_counter() - started
    progress.emit(stage, "done", f"{timings[stage]:.1f} s")
    return result


def _on_the_benchmarks_threads(profile: DeviceProfile, config: RunConfig) -> DeviceProfile:
    """The profile with as many cores as the benchmark's threads (a lab's `bench.threads`), where those differ: the
    build targets them and tuning times its candidates on them, as the deployed model will run. Tuned on the
    profile's cores and timed on fewer, the database's kernel times would not be the deployed kernels' (the
    one-thread/two-thread mismatch of docs/lab-x86/tuning-threads.md)."""
    threads = config.bench.threads
    if not threads or threads == profile.cpu.cores:
        return profile
    return profile.model_copy(update={"cpu": profile.cpu.model_copy(update={"cores": threads})})


@flow(name="deploy-run", log_prints=False, persist_result=True, result_serializer="json")
def deploy_run(config: RunConfig) -> RunResult:
    """Run one model through every stage on one device profile and report honest numbers."""
    config = config.with_run_id()
    timings: dict[str, float] = {}
    profile = _on_the_benchmarks_threads(_timed("profile", timings, load_profile, config.profile), config)
    info = _timed("ingest", timings, ingest_task, config)
    if config.auto:
        return _auto_run(config, profile, info, timings)
    checks = _timed("check", timings, check_task, config, info, profile)
    data = _timed("data", timings, data_task, config, info, checks)
    partial = _timed("partial", timings, partial_task, config, info, data, checks.quant) if config.partial else None
    quant = checks.quant.model_copy(update={"keep_float": partial.keep_float}) if partial else checks.quant
    quantized = _timed("quantize", timings, quantize_task, config, info, data, quant)
    before = _timed("compile untuned", timings, compile_task, _untuned(config), quantized, info, profile) \
        if _checks_its_tuning(config, profile) else None
    compiled = _timed("compile", timings, compile_task, config, quantized, info, profile)
    tuning_check = None
    if before is not None:
        compiled, tuning_check = _timed("tuned or not", timings, tuned_or_before, config, info, data, profile,
                                        quantized, compiled, before)
    deployed = _timed("deploy", timings, deploy_task, config, compiled, info, data, profile)
    bench = _timed("benchmark", timings, benchmark_task, config, deployed, info, data, profile)
    also = [_timed("tvm-gpu", timings, tvm_on_the_gpu, config, info, data, profile, quantized, bench)] \
        if _tvm_gpu_beside(config, profile) else []
    result = _report(config, profile, info, data, timings, quantized=quantized, compiled=compiled, bench=bench,
                     deployed=deployed, checks=checks.results,
                     reused=[name for name, part in (("quantize", quantized), ("compile", compiled)) if part.cached])
    return _record(config, result.model_copy(update={"partial": partial, "also": also, "tuning_check": tuning_check}),
                   compiled, timings)


def _checks_its_tuning(config: RunConfig, profile: DeviceProfile) -> bool:
    """A tuned TVM build for the CPU is measured against the build before its tuning (pipeline.tuning_check)."""
    return (config.tuning_check and bool(config.tune_trials) and config.runtime_on(profile) == "tvm"
            and profile.tvm_gpu_target() is None)


def _untuned(config: RunConfig) -> RunConfig:
    return config.model_copy(update={"tune_trials": 0, "tune_minutes": None})


def _tvm_gpu_beside(config: RunConfig, profile: DeviceProfile) -> bool:
    """An onnxruntime run on a GPU board (its profile compiles TVM for the GPU): TVM-CUDA is measured beside it when the
    board's own TVM reaches CUDA, whatever the profile says is installed."""
    return config.runtime_on(profile) != "tvm" and profile.unit_of("tvm") == "gpu"


def _report(config: RunConfig, profile: DeviceProfile, info: ModelInfo, data: PreparedData, timings: dict[str, float],
            **parts) -> RunResult:
    """The run's result, whatever chose the artifact (the scheme asked for, or --quant auto)."""
    progress.emit("report", "start")
    return RunResult.assemble(
        run_id=config.run_id, created=datetime.now(UTC).isoformat(), info=info, workload=data.workload,
        profile=profile.name, stage_seconds={k: round(v, 3) for k, v in timings.items() if k != "profile"},
        tools=tool_versions(), flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None, **parts,
    )


def _record(config: RunConfig, result: RunResult, compiled: CompiledArtifact, timings: dict[str, float]) -> RunResult:
    """result.json first, then the results database: a database that is locked (past its retries) or damaged loses
    the run's place in the history, never the measurement."""
    path = config.run_dir() / "result.json"
    result = result.model_copy(update={"result_path": str(path)})
    _write_json(path, result)
    progress.emit("report", "done", str(path))
    try:
        verdict = _timed("record", timings, record_task, config, result, compiled)
    except EdgeDeployError as error:
        result = result.model_copy(update={"recorded": False, "record_error": error.render().splitlines()[0]})
    else:
        result = result.model_copy(update={"regression": verdict})
    _write_json(path, result)
    return result


def _write_json(path: Path, result: RunResult) -> None:
    """Whole or not at all: a temporary file renamed over the last one (a run killed mid-write leaves the old)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    temporary.replace(path)


def _auto_run(config: RunConfig, profile: DeviceProfile, info: ModelInfo, timings: dict[str, float]) -> RunResult:
    """--quant auto: every allowed candidate measured on the device; the fastest within budget ships."""
    before = board_state_now(profile)
    selection, shipped, bench, data = _timed("auto", timings, auto_select, config, info, profile)
    bench = with_board_state(bench, before, board_state_now(profile))
    result = _report(config, profile, info, data, timings, quantized=shipped.quantized, compiled=shipped.artifact,
                     bench=bench, deployed=shipped.deployed)
    return _record(config, result.model_copy(update={"auto": selection}), shipped.artifact, timings)
