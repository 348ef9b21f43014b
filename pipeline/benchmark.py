"""Stage 7 of 8, benchmark: run the device-side runner on the device, for the artifact and for the
baseline a user would otherwise run (onnxruntime fp32 on the original model), in turns (a few rounds
each, in separate processes, on the same inputs); then score both against the labels and the
artifact against the baseline.
"""

from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.deploy import DeployedArtifact
from pipeline.metrics import Agreement, LatencyStats, per_output_agreement
from pipeline.scoring import Scoring
from pipeline.workloads.base import Samples
from targets.board_state import BoardState
from targets.runner import parse_report, runner_argv
from targets.transport import Transport

# Time for the runner to start and import its runtime (import tvm takes ~25 s under emulation).
STARTUP_ALLOWANCE_S = 180.0
# TensorRT builds its engine when the session is created (a YOLO-class model in fp16 on a Jetson Nano: minutes), in
# every run: the engine cache lies in the run's directory.
ENGINE_BUILD_ALLOWANCE_S = 1800.0


class BenchmarkSettings(BaseModel):
    """How long and how often to measure (MLPerf SingleStream style)."""

    model_config = ConfigDict(frozen=True)
    warmup: int = Field(default=2, ge=0, description="Iterations run first and never counted.")
    min_iterations: int = Field(default=20, ge=1, description="A run with fewer timed iterations is invalid.")
    min_seconds: float = Field(default=2.0, ge=0, description="A run shorter than this is invalid.")
    max_seconds: float = Field(default=600.0, gt=0, description="Wall-clock limit per runtime on the device.")
    threads: int = Field(default=0, ge=0, description="Threads per runtime (0 = the profile's cores).")
    rounds: int = Field(default=3, ge=1, description="The artifact and the baseline take turns, this many each "
                        "(A B B A A B ...), sharing the iterations and seconds above: a device whose speed drifts "
                        "(thermal throttling, a shared VM) slows both alike instead of whichever ran second.")

    def per_round(self) -> BenchmarkSettings:
        """One runner invocation's share; every round still runs each sample at least once."""
        return self.model_copy(update={"min_iterations": math.ceil(self.min_iterations / self.rounds),
                                       "min_seconds": self.min_seconds / self.rounds,
                                       "max_seconds": self.max_seconds / self.rounds})


class KernelTime(BaseModel):
    """One function the deployed library's VM calls, per inference, timed on the device."""

    model_config = ConfigDict(frozen=True)
    name: str
    calls: int
    us: float


class Measurement(BaseModel):
    """One runtime measured on the device."""

    model_config = ConfigDict(frozen=True)
    runtime: str
    artifact_sha256: str
    versions: dict[str, str]
    latency_ms: LatencyStats
    samples_ms: list[float] = Field(description="Every timed iteration, in order (warm-up excluded).")
    warmup: int
    peak_rss_mb: float
    load_seconds: float
    first_run_seconds: float | None = Field(default=None, description="The first (warm-up) run: where the GPU "
                                            "loads or JIT-compiles its code; never in the latency.")
    timed_seconds: float
    samples: int
    accuracy: float | None
    metrics: dict[str, float] = Field(default_factory=dict, description="Every metric against the labels (COCO: "
                                      "mAP@0.5:0.95 and mAP@0.5), the headline (accuracy) among them.")
    valid: bool
    invalid_reason: str | None
    device_python: str
    device_machine: str
    kernels: list[KernelTime] = Field(default_factory=list, description="TVM: the heaviest functions of a few "
                                      "runs after the timed ones, every call timed on the device (heaviest first).")
    kernels_total_us: float | None = Field(default=None, description="TVM: all the calls of one such run, summed.")
    kernel_runs: int = 0
    kernel_error: str | None = None
    rounds: int = Field(default=1, description="Runner processes whose timed iterations samples_ms joins, in order.")


class BenchmarkReport(BaseModel):
    """The artifact and the baseline, side by side."""

    model_config = ConfigDict(frozen=True)
    artifact: Measurement
    baseline: Measurement
    agreement: Agreement
    metric: str | None = Field(description="top1 or mAP@0.5; None without labels.")
    settings: BenchmarkSettings
    board_before: BoardState | None = Field(default=None, description="Power mode, clocks, temperatures before.")
    board_after: BoardState | None = Field(default=None, description="The same, after the last round.")
    board_marks: list[str] = Field(default_factory=list, description="What the two snapshots say about the "
                                   "numbers: throttling, clocks below maximum, a low power mode.")


def _run_runner(
    transport: Transport, python: list[str], deployed: DeployedArtifact, *, runtime: str,
    input_order: list[str], settings: BenchmarkSettings, local_dir: Path, which: str, name: str,
    kernel_runs: int, batch: int, fetch_outputs: bool = True,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run the device runner on the artifact (which="artifact") or on the fp32 baseline (which="baseline")."""
    remote_out = posixpath.join(deployed.run_dir, f"outputs.{name}.npz")
    if which == "artifact":
        checked = {"artifact": deployed.library.remote_path, "manifest": deployed.manifest.remote_path,
                   "sha256": deployed.library.sha256}
    else:
        checked = {"artifact": deployed.baseline_model.remote_path, "sha256": deployed.baseline_model.sha256}
    argv = runner_argv(python, deployed.runner.remote_path, runtime=runtime, inputs=deployed.inputs.remote_path,
                       input_order=input_order, outputs=remote_out, warmup=settings.warmup,
                       min_iterations=settings.min_iterations, min_seconds=settings.min_seconds,
                       max_seconds=settings.max_seconds, threads=settings.threads, kernel_runs=kernel_runs, batch=batch,
                       **checked)
    allowance = STARTUP_ALLOWANCE_S + (ENGINE_BUILD_ALLOWANCE_S if runtime == "onnxruntime-tensorrt" else 0.0)
    result = transport.run(argv, timeout=settings.max_seconds + allowance)
    report = parse_report(result, runtime=runtime, host=transport.name, expected_sha256=checked["sha256"])
    if not fetch_outputs:
        return report, None
    local_out = local_dir / f"outputs.{name}.npz"
    transport.read(remote_out, local_out)
    with np.load(local_out) as npz:
        outputs = npz["outputs"]
    return report, outputs


def _measurement(report: dict[str, Any], scoring: Scoring, outputs: np.ndarray, samples: Samples) -> Measurement:
    metrics = scoring.metrics(outputs, samples)
    score = metrics.get(scoring.metric or "")
    return Measurement(
        runtime=report["runtime"], artifact_sha256=report["artifact_sha256"], versions=report["versions"],
        latency_ms=LatencyStats.from_samples(report["latency_ms"], report.get("batch", 1)),
        samples_ms=report["latency_ms"],
        warmup=report["warmup"], peak_rss_mb=report["peak_rss_mb"], load_seconds=report["load_seconds"],
        first_run_seconds=report.get("first_run_seconds"),
        timed_seconds=report["timed_seconds"], samples=report["samples_covered"], accuracy=score, metrics=metrics,
        valid=report["valid"], invalid_reason=report["invalid_reason"],
        device_python=report["python"], device_machine=report["machine"],
        kernels=report.get("kernels") or [], kernels_total_us=report.get("kernels_total_us"),
        kernel_runs=report.get("kernel_runs") or 0, kernel_error=report.get("kernel_error"),
        rounds=report.get("rounds", 1),
    )


KERNEL_RUNS = 3  # runs after the last timed round whose every kernel call is timed (TVM)


def _runtime(deployed: DeployedArtifact, which: str) -> str:
    return deployed.runtime if which == "artifact" else "onnxruntime"


def _joined(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One runtime's rounds as one report: every timed iteration in order, the cold (first) load, the highest
    memory, valid only if every round was; the kernel profile comes from the round that took one."""
    joined = dict(reports[0])
    joined["latency_ms"] = [ms for report in reports for ms in report["latency_ms"]]
    joined["timed_seconds"] = sum(report["timed_seconds"] for report in reports)
    joined["peak_rss_mb"] = max(report["peak_rss_mb"] for report in reports)
    joined["valid"] = all(report["valid"] for report in reports)
    reasons = [f"round {i + 1}: {r['invalid_reason']}" if len(reports) > 1 else r["invalid_reason"]
               for i, r in enumerate(reports) if r["invalid_reason"]]
    joined["invalid_reason"] = "; ".join(reasons) or None
    profiled = [report for report in reports if report.get("kernels") or report.get("kernel_error")]
    for key in ("kernels", "kernels_total_us", "kernel_runs", "kernel_error"):
        joined[key] = profiled[-1].get(key) if profiled else None
    joined["rounds"] = len(reports)
    return joined


def _timed_in_turns(transport: Transport, python: list[str], deployed: DeployedArtifact, *, whiches: list[str],
                    input_order: list[str], settings: BenchmarkSettings, local_dir: Path,
                    batch: int) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    """Each runtime in ``whiches`` run ``settings.rounds`` times, taking turns A B, B A, A B, ...; its outputs are
    the first round's (every round runs every sample)."""
    share = settings.per_round()
    reports: dict[str, list[dict[str, Any]]] = {which: [] for which in whiches}
    outputs: dict[str, np.ndarray] = {}
    for index in range(settings.rounds):
        last = index == settings.rounds - 1
        for which in (whiches if index % 2 == 0 else whiches[::-1]):
            runtime = _runtime(deployed, which)
            report, out = _run_runner(transport, python, deployed, runtime=runtime,
                                      input_order=input_order, settings=share, local_dir=local_dir, which=which,
                                      name=which if index == 0 else f"{which}.round{index + 1}",
                                      kernel_runs=KERNEL_RUNS if last and runtime == "tvm" else 0,
                                      batch=batch, fetch_outputs=index == 0)
            reports[which].append(report)
            if out is not None:
                outputs[which] = out
    return {which: (_joined(reports[which]), outputs[which]) for which in whiches}


def measure(
    transport: Transport, python: list[str], deployed: DeployedArtifact, samples: Samples, *, which: str,
    input_order: list[str], scoring: Scoring, settings: BenchmarkSettings, local_dir: Path, batch: int = 1,
) -> tuple[Measurement, np.ndarray]:
    """One runtime on the device: the deployed artifact (which="artifact") or onnxruntime fp32 ("baseline"), in one
    process (rounds are turns between two runtimes; alone, they would only cost more start-ups)."""
    (report, outputs), = _timed_in_turns(transport, python, deployed, whiches=[which], input_order=input_order,
                                          settings=settings.model_copy(update={"rounds": 1}),
                                          local_dir=local_dir, batch=batch).values()
    return _measurement(report, scoring, outputs, samples), outputs


def benchmark(
    transport: Transport, python: list[str], deployed: DeployedArtifact, samples: Samples, *,
    input_order: list[str], scoring: Scoring, settings: BenchmarkSettings, local_dir: Path,
    output_names: list[str] | None = None, batch: int = 1,
) -> BenchmarkReport:
    """Measure the artifact and the baseline on the device, in turns, ``batch`` samples per inference; score and
    compare them (every output, where the model has more than one: ``output_names``)."""
    timed = _timed_in_turns(transport, python, deployed, whiches=["artifact", "baseline"], input_order=input_order,
                            settings=settings, local_dir=local_dir, batch=batch)
    (art_report, art_out), (base_report, base_out) = timed["artifact"], timed["baseline"]
    agreement = scoring.agreement(art_out, base_out)
    if output_names and len(output_names) > 1:
        with np.load(local_dir / "outputs.artifact.npz") as a, np.load(local_dir / "outputs.baseline.npz") as b:
            rows = per_output_agreement(dict(a), dict(b), output_names)
        agreement = agreement.model_copy(update={"per_output": rows})
    return BenchmarkReport(
        artifact=_measurement(art_report, scoring, art_out, samples),
        baseline=_measurement(base_report, scoring, base_out, samples),
        agreement=agreement, metric=scoring.metric_for(samples), settings=settings,
    )
