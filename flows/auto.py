"""The `--quant auto` flow body: one Prefect task per candidate, each measured on the device against
the same onnxruntime fp32 baseline; pipeline.auto chooses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from edgedeploy.errors import CheckRefused, DataError, EdgeDeployError
from flows.tasks import Measured, benchmark_task, candidate_task, measure_task, partial_task
from pipeline.auto import (
    AutoSelection,
    Candidate,
    CandidateOutcome,
    calibration_retries,
    choose,
    default_candidates,
    dynamic_worthy,
    finalists,
    outcome,
    plot_svg,
    tuning_plan,
)
from pipeline.benchmark import BenchmarkReport, BenchmarkSettings
from pipeline.checks import check_runtime, run_checks
from pipeline.checks_x86 import ort_int8_may_saturate
from pipeline.compile import package_cached, prepare
from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.partial import PartialPlan
from pipeline.quantize import QuantConfig, QuantizedModel
from pipeline.scoring import Scoring
from pipeline.workloads.base import Samples
from targets.profiles import GPU_RUNTIMES, DeviceProfile


def original_as_artifact(info: ModelInfo, profile: DeviceProfile) -> tuple[QuantizedModel, CompiledArtifact]:
    """What ships when nothing beats it: the user's own model, run by onnxruntime in fp32."""
    original = QuantizedModel(path=info.source_path, sha256=info.sha256, config=QuantConfig(scheme="fp32"))
    return original, package_cached(original, info, profile)


def _baseline(config: RunConfig, info: ModelInfo, data: PreparedData, profile: DeviceProfile, *,
              name: str = "baseline", folder: str = "baseline") -> Measured:
    original, artifact = original_as_artifact(info, profile)
    return measure_task.with_options(task_run_name=name)(config, info, data, profile, original, artifact,
                                                         which="baseline", folder=folder)


def _checked(candidate: Candidate, model: onnx.ModelProto, info: ModelInfo, profile: DeviceProfile, *,
             calibrated: bool) -> tuple[Candidate, str | None]:
    """(the candidate as it is built, why the checks refuse it or None). A TVM candidate is built as the checks
    would (7-bit weights where its kernels use VPMADDUBSW: without them no kernel takes the instruction, and it
    measures plain integer loops); onnxruntime's stay exactly as listed: its reduce-range variant is a candidate of
    its own."""
    if candidate.quant.scheme == "int8" and not calibrated:
        return candidate, "no calibration data (pass --calib-data)"
    report = run_checks(model, info, profile, candidate.quant, runtime=candidate.runtime)
    if candidate.runtime == "tvm":
        candidate = candidate.model_copy(update={"quant": report.quant})
    refused = report.refused
    return candidate, f"{refused[0].check}: {refused[0].reason}" if refused else None


def as_checked(candidate: Candidate, model: onnx.ModelProto, info: ModelInfo, profile: DeviceProfile) -> Candidate:
    """The candidate as it is built (see _checked)."""
    return _checked(candidate, model, info, profile, calibrated=True)[0]


def _partial_plan(config: RunConfig, info: ModelInfo, profile: DeviceProfile, data: PreparedData,
                  model: onnx.ModelProto) -> PartialPlan | None:
    """Does the default int8 stay within budget, and if not, which layers must stay float? (host-side)"""
    int8 = Candidate(runtime="onnxruntime", quant=QuantConfig(scheme="int8"))
    if _checked(int8, model, info, profile, calibrated=bool(data.calibration_path))[1]:
        return None
    return partial_task(config, info, data, int8.quant)


def auto_select(config: RunConfig, info: ModelInfo, profile: DeviceProfile
                ) -> tuple[AutoSelection, Measured, BenchmarkReport, PreparedData]:
    """(the selection, what ships, its benchmark against onnxruntime fp32, the data). Never ships anything slower
    than the baseline: the finalists are measured in turns with it, and what ships is the one whose turns show it
    measurably faster (pipeline.auto.finalists), or the baseline. With --runtime, only that runtime's candidates, and
    none at all when the board can't have it."""
    if config.runtime and (refused := check_runtime(profile, config.runtime)).verdict == "refuse":
        raise CheckRefused(f"--quant auto --runtime {config.runtime}: {refused.reason}", profile=profile.name,
                           fix=refused.fix)
    try:
        data = prepare(config, info, config.run_dir(), "int8")
    except DataError:  # an unknown model without --calib-data: int8 candidates are refused, the rest still run
        data = prepare(config, info, config.run_dir(), "fp32")
    baseline = _baseline(config, info, data, profile)
    with np.load(baseline.outputs_path) as npz:
        base_out = npz["outputs"]
    names = [s.name for s in info.inputs]
    metric = data.scoring.metric_for(Samples.load(Path(data.eval_path), names))
    outcomes: list[CandidateOutcome] = []
    runs: list[tuple[Candidate, Measured, object]] = []
    model = onnx.load(info.prepared_path)
    partial = _partial_plan(config, info, profile, data, model)
    gpu_runtimes = tuple(name for name in GPU_RUNTIMES if profile.has_runtime(name))
    candidates = default_candidates(gpu_runtimes, dynamic=dynamic_worthy(info.op_census))
    if config.runtime:
        candidates = [c for c in candidates if c.runtime == config.runtime]
    if partial and partial.keep_float:  # full int8 misses the budget: try it with the sensitive layers in float
        kept = QuantConfig(scheme="int8", keep_float=partial.keep_float)
        candidates += [c for c in (Candidate(runtime="onnxruntime", quant=kept), Candidate(runtime="tvm", quant=kept))
                       if config.runtime in (None, c.runtime)]
    def attempt(candidate: Candidate) -> None:
        candidate, reason = _checked(candidate, model, info, profile, calibrated=bool(data.calibration_path))
        label, unit = candidate.label(), profile.unit_of(candidate.runtime)
        if reason:
            outcomes.append(CandidateOutcome(label=label, runtime=candidate.runtime, unit=unit,
                                             scheme=candidate.quant.label(), status="refused", reason=reason))
            return
        try:
            built = candidate_task.with_options(task_run_name=f"candidate {label}")(config, info, data, profile,
                                                                                   candidate)
            run = measure_task.with_options(task_run_name=f"measure {label}")(
                config, info, data, profile, built.quantized, built.artifact, which="artifact",
                folder=f"candidate-{len(runs) + len(outcomes)}")
        except EdgeDeployError as exc:
            outcomes.append(CandidateOutcome(label=label, runtime=candidate.runtime, unit=unit,
                                             scheme=candidate.quant.label(), status="failed", reason=exc.what))
            return
        with np.load(run.outputs_path) as npz:
            runs.append((candidate, run, data.scoring.agreement(npz["outputs"], base_out)))

    for candidate in candidates:
        attempt(candidate)
    # Calibration changes what int8 computes, not how fast: where TVM's int8 missed the budget, the calibration that
    # kept onnxruntime's int8 closest to fp32 gets its turn with TVM's kernels.
    def untuned() -> list[tuple[Candidate, CandidateOutcome]]:
        return [(c, outcome(c, run.measurement, baseline.measurement, agree, metric=metric,
                            budget=config.accuracy_budget).model_copy(update={"unit": profile.unit_of(c.runtime)}))
                for c, run, agree in runs]

    measured_so_far = [c for c, _, _ in runs]  # as built (a TVM candidate with the checks' adjustments)
    for candidate in calibration_retries(measured_so_far, dict((c.label(), o) for c, o in untuned())):
        attempt(candidate)
    # Then the tuning budget (--tune-minutes: for the whole selection), to the TVM builds that did best untuned.
    for candidate in tuning_plan(untuned(), config.tune_trials, config.tune_minutes):
        attempt(candidate)
    # The baseline again, after the candidates: whichever of its two measurements is faster is the one to
    # beat, so a baseline measured on a cold machine can't make a candidate look faster than it is.
    again = _baseline(config, info, data, profile, name="baseline (again)", folder="baseline-again")
    if again.measurement.latency_ms.p50 < baseline.measurement.latency_ms.p50:
        baseline = again
    measured: dict[str, tuple[Candidate, Measured]] = {}
    alone: list[CandidateOutcome] = []
    for candidate, run, agree in runs:
        measured_outcome = outcome(candidate, run.measurement, baseline.measurement, agree, metric=metric,
                                   budget=config.accuracy_budget)
        caveat = ort_int8_may_saturate(profile, candidate.quant, candidate.runtime)
        alone.append(measured_outcome.model_copy(update={"tuning": run.artifact.tuning, "caveat": caveat,
                                                         "unit": profile.unit_of(candidate.runtime)}))
        measured[candidate.label()] = (candidate, run)
    final = {o.label: o for o in alone}
    turns: dict[str, BenchmarkReport] = {}
    for index, label in enumerate(finalists(alone, baseline.measurement.latency_ms.p50)):
        candidate, run = measured[label]
        try:
            turns[label] = benchmark_task.with_options(task_run_name=f"in turns {label}")(
                config, run.deployed, info, data, profile, folder=f"finalist-{index}")
        except EdgeDeployError as exc:  # measured alone a minute ago: the device failed it since, it can't ship
            final[label] = final[label].model_copy(update={"status": "failed",
                                                           "reason": f"in turns with the baseline: {exc.what}"})
            continue
        final[label] = _in_turns(final[label], candidate, turns[label], metric, config.accuracy_budget)
    outcomes += final.values()
    selection = choose(outcomes, budget=config.accuracy_budget, metric=metric, baseline=baseline.measurement)
    selection = selection.model_copy(update={"partial": partial})
    (config.run_dir() / "auto.svg").write_text(plot_svg(selection))
    (config.run_dir() / "auto.json").write_text(json.dumps(selection.model_dump(mode="json"), indent=2))
    if not selection.chosen:
        return selection, baseline, bench_report(baseline, baseline, metric=metric, settings=config.bench,
                                                 scoring=data.scoring), data
    shipped = measured[selection.chosen][1]
    bench = turns.get(selection.chosen) or bench_report(shipped, baseline, metric=metric, settings=config.bench,
                                                        scoring=data.scoring)  # only where every finalist failed
    return selection, shipped, bench, data


def _in_turns(alone: CandidateOutcome, candidate: Candidate, report: BenchmarkReport, metric: str | None,
              budget: float) -> CandidateOutcome:
    """A finalist's outcome from its turns with the baseline (its p50, speed-up, U test and accuracy there)."""
    turns = outcome(candidate, report.artifact, report.baseline, report.agreement, metric=metric, budget=budget)
    kept = {key: getattr(alone, key) for key in ("tuning", "caveat", "unit")}
    return turns.model_copy(update={**kept, "in_turns": True, "alone_p50_ms": alone.p50_ms})


def bench_report(shipped: Measured, baseline: Measured, *, metric: str | None, settings: BenchmarkSettings,
                 scoring: Scoring) -> BenchmarkReport:
    with np.load(shipped.outputs_path) as a, np.load(baseline.outputs_path) as b:
        agree = scoring.agreement(a["outputs"], b["outputs"])
    return BenchmarkReport(artifact=shipped.measurement, baseline=baseline.measurement, agreement=agree,
                           metric=metric, settings=settings)
