"""Every Prefect task of the flows, one options dict each: the stages of `deploy run` as tasks (flows/run.py), and
the device tasks' retries. A task calls a pipeline stage and nothing more; the flows decide the order."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from edgedeploy.errors import EdgeDeployError
from pipeline.benchmark import BenchmarkReport, benchmark
from pipeline.checks import CheckReport
from pipeline.compile import check_model, compile_cached, ingest_model, prepare, quantize_model
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
from pipeline.results.store import ResultStore
from pipeline.workloads.base import Samples
from targets.connect import open_transport
from targets.profiles import DeviceProfile

# Task results are persisted as JSON (never pickle). Prefect's own result cache is off: artifacts are
# reused through pipeline.results.cache, whose key is the content (model, scheme, data, profile, tools).
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
                         scoring=data.scoring, settings=settings, local_dir=config.run_dir())
    finally:
        transport.close()


@task(name="record", **TASK_OPTIONS)
def record_task(config: RunConfig, result: RunResult, compiled: CompiledArtifact) -> Verdict:
    """Store the result and judge it against its history (regressions mark the run)."""
    store = ResultStore(config.db_url)
    manifest = json.loads(Path(compiled.manifest_path).read_text())
    return store.record(result, manifest=manifest, policy=config.regression)
