"""Every Prefect task of the flows, one options dict each: the stages of `deploy run` as tasks (flows/run.py), and
the device tasks' retries. A task calls a pipeline stage and nothing more; the flows decide the order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import EdgeDeployError
from pipeline.auto import Candidate
from pipeline.benchmark import BenchmarkReport, BenchmarkSettings, Measurement
from pipeline.compile import artifact_for, check_model, data_scheme, ingest_model, prepare, quantize_model
from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.deploy import DeployedArtifact
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.partial import PartialPlan, plan_partial
from pipeline.preflight import gpu_refusal
from pipeline.quantize import QuantConfig, QuantizedModel
from pipeline.regression import Verdict
from pipeline.report import AlsoMeasured, RunResult
from pipeline.results.store import ResultStore
from pipeline.session import DeviceSession, tuning_board
from pipeline.tuning_check import TURNS, TuningCheck
from pipeline.verdicts import CheckReport
from targets.board_state import BoardState
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
    return prepare(config, info, config.run_dir(), data_scheme(checks.quant))


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
    # Tuning on a board times its candidates there: the compiler gets the way to the board from here (and calls it
    # only when it tunes for one); it imports no connection code itself.
    return artifact_for(config.runtime_on(profile), quantized, info, profile, tune_trials=config.tune_trials,
                        tune_minutes=config.tune_minutes, tuning_board=tuning_board)


def bench_settings(config: RunConfig, profile: DeviceProfile) -> BenchmarkSettings:
    """The run's benchmark settings, timed on the profile's cores unless the run says how many threads."""
    return config.bench if config.bench.threads else config.bench.model_copy(update={"threads": profile.cpu.cores})


@task(name="deploy", **DEVICE_TASK_OPTIONS)
def deploy_task(config: RunConfig, compiled: CompiledArtifact, info: ModelInfo, data: PreparedData,
                profile: DeviceProfile) -> DeployedArtifact:
    with DeviceSession(profile) as session:
        return session.deploy(config.run_id, compiled, info, data)


@task(name="benchmark", **DEVICE_TASK_OPTIONS)
def benchmark_task(config: RunConfig, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData,
                   profile: DeviceProfile, *, folder: str = "") -> BenchmarkReport:
    """The deployed artifact and onnxruntime fp32 in turns (a --quant auto finalist's outputs in a ``folder`` of its
    own under the run's directory)."""
    local = config.run_dir() / folder
    local.mkdir(parents=True, exist_ok=True)
    with DeviceSession(profile) as session:
        return session.benchmark(deployed, info, data, settings=bench_settings(config, profile), local_dir=local)


class Measured(BaseModel):
    """A candidate's (or the baseline's) artifact, deployment and measurement (--quant auto)."""

    model_config = ConfigDict(frozen=True)
    quantized: QuantizedModel
    artifact: CompiledArtifact
    deployed: DeployedArtifact
    measurement: Measurement
    outputs_path: str


@task(name="measure", **DEVICE_TASK_OPTIONS)
def measure_task(config: RunConfig, info: ModelInfo, data: PreparedData, profile: DeviceProfile,
                 quantized: QuantizedModel, artifact: CompiledArtifact, *, which: str, folder: str) -> Measured:
    """Deploy one artifact and time it alone (--quant auto's candidates, and its baseline: which="baseline")."""
    local = config.run_dir() / folder
    local.mkdir(parents=True, exist_ok=True)
    with DeviceSession(profile) as session:
        deployed = session.deploy(config.run_id, artifact, info, data)
        measurement, outputs = session.measure(deployed, info, data, which=which,
                                               settings=bench_settings(config, profile), local_dir=local)
    path = local / f"outputs.{which}.npz"
    np.savez(path, outputs=outputs)
    return Measured(quantized=quantized, artifact=artifact, deployed=deployed, measurement=measurement,
                    outputs_path=str(path))


class Built(BaseModel):
    """A --quant auto candidate, quantized and compiled (or packaged for onnxruntime), not yet on the device."""

    model_config = ConfigDict(frozen=True)
    quantized: QuantizedModel
    artifact: CompiledArtifact


@task(name="candidate", **TASK_OPTIONS)
def candidate_task(config: RunConfig, info: ModelInfo, data: PreparedData, profile: DeviceProfile,
                   candidate: Candidate) -> Built:
    # Exactly this candidate's configuration: the checks' own adjustments (e.g. reduce_range) are candidates too.
    quantized = quantize_model(info, data, candidate.quant)
    artifact = artifact_for(candidate.runtime, quantized, info, profile, tune_trials=candidate.tune_trials,
                            tune_minutes=candidate.tune_minutes, tuning_board=tuning_board)
    return Built(quantized=quantized, artifact=artifact)


def tuned_or_before(config: RunConfig, info: ModelInfo, data: PreparedData, profile: DeviceProfile,
                    quantized: QuantizedModel, tuned: CompiledArtifact, before: CompiledArtifact
                    ) -> tuple[CompiledArtifact, TuningCheck]:
    """The tuned library and the build before its tuning, measured in turns on the device (TURNS, each turn half
    the run's benchmark settings): the faster ships (pipeline.tuning_check)."""
    full = bench_settings(config, profile)
    half = full.model_copy(update={"min_iterations": max(1, full.min_iterations // 2),
                                   "min_seconds": full.min_seconds / 2})
    turns: dict[str, list[float]] = {"tuned": [], "before": []}
    for index, which in enumerate(TURNS):
        run = measure_task.with_options(task_run_name=f"tuned or not: {which} ({index + 1})")(
            config.model_copy(update={"bench": half}), info, data, profile, quantized,
            tuned if which == "tuned" else before, which="artifact", folder=f"tuning-check-{index + 1}")
        turns[which].append(run.measurement.latency_ms.p50)
    check = TuningCheck(tuned_ms=turns["tuned"], before_ms=turns["before"], tuning=tuned.tuning)
    return (tuned if check.shipped == "tuned" else before), check


# A results database locked by another writer (past SQLite's busy timeout) is asked again, a few seconds apart.
RECORD_TASK_OPTIONS = {**TASK_OPTIONS, "retries": 3, "retry_delay_seconds": [1, 3, 9],
                       "retry_condition_fn": _transient_only}


@task(name="record", **RECORD_TASK_OPTIONS)
def record_task(config: RunConfig, result: RunResult, compiled: CompiledArtifact) -> Verdict:
    """Store the result and judge it against its history (regressions mark the run)."""
    store = ResultStore(config.db_url)
    manifest = json.loads(Path(compiled.manifest_path).read_text())
    return store.record(result, manifest=manifest, policy=config.regression)


def tvm_on_the_gpu(config: RunConfig, info: ModelInfo, data: PreparedData, profile: DeviceProfile,
                   quantized: QuantizedModel, bench: BenchmarkReport) -> AlsoMeasured:
    """The same quantized model compiled by TVM for the board's GPU and measured there, beside the run's artifact,
    when the board's TVM reaches CUDA (`tvm.cuda(0).exist` there); a board without it, or a failed build, is
    reported, never fails the run."""
    label = f"tvm (GPU) {quantized.config.label()}"
    try:
        with DeviceSession(profile) as session:
            refusal = gpu_refusal(session.gpu_facts(tvm=True), profile, "tvm", session.transport.name)
        if refusal:
            return AlsoMeasured(label=label, reason=refusal.render().splitlines()[0])
        check_model(info, profile, config, runtime="tvm", purpose="build")
        artifact = compile_task.with_options(task_run_name="compile tvm-gpu")(
            config.model_copy(update={"runtime": "tvm"}), quantized, info, profile)
        run = measure_task.with_options(task_run_name="measure tvm-gpu")(
            config, info, data, profile, quantized, artifact, which="artifact", folder="tvm-gpu")
    except EdgeDeployError as exc:
        return AlsoMeasured(label=label, reason=exc.render().splitlines()[0])
    with np.load(run.outputs_path) as npz, np.load(Path(config.run_dir()) / "outputs.baseline.npz") as base:
        agreement = data.scoring.agreement(npz["outputs"], base["outputs"])
    p50 = run.measurement.latency_ms.p50
    return AlsoMeasured(label=label, p50_ms=p50, p90_ms=run.measurement.latency_ms.p90,
                        speedup=bench.baseline.latency_ms.p50 / p50 if p50 else None, agreement=agreement,
                        accuracy=run.measurement.accuracy, valid=run.measurement.valid)


def board_state_now(profile: DeviceProfile) -> BoardState:
    """The board's state through a session of its own (--quant auto reads it around all its measurements); a board
    that can't be reached is an unknown state here: the measurements themselves say what went wrong."""
    try:
        with DeviceSession(profile) as session:
            return session.board_state()
    except EdgeDeployError:
        return BoardState()
