"""The `deploy run` flow: ingest -> check -> data -> [partial] -> quantize -> compile -> deploy -> benchmark -> report.

Tasks pass pydantic models (JSON-serialisable) and file paths, never in-memory arrays. Without
PREFECT_API_URL, Prefect starts its temporary local server for the run (the embedded default).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from edgedeploy.errors import EdgeDeployError
from pipeline import progress
from pipeline.benchmark import BenchmarkReport, benchmark
from pipeline.build import check_model, compile_cached, ingest_model, prepare, quantize_model
from pipeline.checks import CheckReport
from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.deploy import DeployedArtifact, deploy
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.partial import PartialPlan, plan_partial
from pipeline.preflight import preflight
from pipeline.quantize import QuantConfig, QuantizedModel
from pipeline.regression import Verdict
from pipeline.report import RunResult
from pipeline.store import ResultStore
from pipeline.versions import tool_versions
from pipeline.workloads.base import Samples
from targets.connect import open_transport
from targets.profiles import DeviceProfile, load_profile

# Task results are persisted as JSON (never pickle). Prefect's own result cache is off: artifacts are
# reused through pipeline.cache, whose key is the content (model, scheme, data, profile, tools).
TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": True, "result_serializer": "json"}


def _transient_only(task, task_run, state) -> bool:
    """Retry network trouble (timeouts, dropped connections); never host-key, auth or checksum failures."""
    try:
        state.result()
    except EdgeDeployError as exc:
        return exc.transient
    except Exception:
        return False
    return False


# Deploying and measuring talk to the device: transient network errors get two more attempts.
DEVICE_TASK_OPTIONS = {**TASK_OPTIONS, "retries": 2, "retry_delay_seconds": [1, 4],
                       "retry_condition_fn": _transient_only}


@task(name="ingest", **TASK_OPTIONS)
def ingest_task(config: RunConfig) -> ModelInfo:
    return ingest_model(config, config.run_dir())


@task(name="check", **TASK_OPTIONS)
def check_task(config: RunConfig, info: ModelInfo, profile: DeviceProfile) -> CheckReport:
    return check_model(info, profile, config, purpose="run")


@task(name="data", **TASK_OPTIONS)
def data_task(config: RunConfig, info: ModelInfo, checks: CheckReport) -> PreparedData:
    return prepare(config, info, config.run_dir(), checks.quant.scheme)


@task(name="partial", **TASK_OPTIONS)
def partial_task(config: RunConfig, info: ModelInfo, data: PreparedData, quant: QuantConfig) -> PartialPlan:
    return plan_partial(info, data, quant, budget=config.accuracy_budget, workdir=config.run_dir() / "partial")


@task(name="quantize", **TASK_OPTIONS)
def quantize_task(config: RunConfig, info: ModelInfo, data: PreparedData, quant: QuantConfig) -> QuantizedModel:
    return quantize_model(info, data, quant)


@task(name="compile", **TASK_OPTIONS)
def compile_task(
    config: RunConfig, quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile
) -> CompiledArtifact:
    return compile_cached(quantized, info, profile, tune_trials=config.tune_trials,
                          tune_minutes=config.tune_minutes)


@task(name="deploy", **DEVICE_TASK_OPTIONS)
def deploy_task(config: RunConfig, compiled: CompiledArtifact, info: ModelInfo, data: PreparedData,
                profile: DeviceProfile) -> DeployedArtifact:
    transport, workdir = open_transport(profile)
    try:
        files = [Path(compiled.library_path), Path(compiled.manifest_path), Path(info.source_path),
                 Path(data.eval_path)]
        preflight(transport, profile, workdir, bytes_needed=sum(f.stat().st_size for f in files))
        return deploy(transport, workdir, config.run_id, library=files[0], manifest=files[1],
                      baseline_model=files[2], inputs=files[3])
    finally:
        transport.close()


@task(name="benchmark", **DEVICE_TASK_OPTIONS)
def benchmark_task(config: RunConfig, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData,
                   profile: DeviceProfile) -> BenchmarkReport:
    names = [s.name for s in info.inputs]
    samples = Samples.load(Path(data.eval_path), names)
    settings = config.bench if config.bench.threads else config.bench.model_copy(update={"threads": profile.cpu.cores})
    transport, _ = open_transport(profile)
    try:
        return benchmark(transport, profile.connection.python_argv(), deployed, samples, input_order=names,
                         kind=data.kind, settings=settings, local_dir=config.run_dir())
    finally:
        transport.close()


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
    compiled = _timed("compile", timings, compile_task, config, quantized, info, profile)
    deployed = _timed("deploy", timings, deploy_task, config, compiled, info, data, profile)
    bench = _timed("benchmark", timings, benchmark_task, config, deployed, info, data, profile)
    progress.emit("report", "start")
    result = RunResult.assemble(
        run_id=config.run_id, created=datetime.now(UTC).isoformat(), info=info,
        workload=data.workload, profile=profile.name, quantized=quantized, compiled=compiled, bench=bench,
        stage_seconds={k: round(v, 3) for k, v in timings.items() if k != "profile"}, checks=checks.results,
        deployed=deployed,
        tools=tool_versions(), flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
        reused=[name for name, part in (("quantize", quantized), ("compile", compiled)) if part.cached],
    )
    result = result.model_copy(update={"partial": partial})
    return _finish(config, result, compiled, timings)


def _finish(config: RunConfig, result: RunResult, compiled: CompiledArtifact, timings: dict[str, float]) -> RunResult:
    path = config.run_dir() / "result.json"
    result = result.model_copy(update={"result_path": str(path)})
    progress.emit("report", "done", str(path))
    verdict = _timed("record", timings, record_task, config, result, compiled)
    result = result.model_copy(update={"regression": verdict})
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    return result


def _auto_run(config: RunConfig, profile: DeviceProfile, info: ModelInfo, timings: dict[str, float]) -> RunResult:
    """--quant auto: every allowed candidate measured on the device; the fastest within budget ships."""
    from flows.auto import auto_select, bench_report

    selection, shipped, baseline, data = _timed("auto", timings, auto_select, config, info, profile)
    progress.emit("report", "start")
    bench = bench_report(shipped, baseline, metric=selection.metric, settings=config.bench,
                         classifier=data.kind != "detector")
    result = RunResult.assemble(
        run_id=config.run_id, created=datetime.now(UTC).isoformat(), info=info, workload=data.workload,
        profile=profile.name, quantized=shipped.quantized, compiled=shipped.artifact, bench=bench,
        stage_seconds={k: round(v, 3) for k, v in timings.items() if k != "profile"}, deployed=shipped.deployed,
        tools=tool_versions(), flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
    )
    result = result.model_copy(update={"auto": selection})
    return _finish(config, result, shipped.artifact, timings)


@task(name="record", **TASK_OPTIONS)
def record_task(config: RunConfig, result: RunResult, compiled: CompiledArtifact) -> Verdict:
    """Store the result and judge it against its history (regressions mark the run)."""
    store = ResultStore(config.db_url)
    manifest = json.loads(Path(compiled.manifest_path).read_text())
    return store.record(result, manifest=manifest, policy=config.regression)
