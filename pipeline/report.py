"""Stage 8 of 8, report: one result object that renders itself (rich) and serialises itself (JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from pipeline.auto import AutoSelection
from pipeline.benchmark import BenchmarkReport
from pipeline.deploy import DeployedArtifact
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.metrics import Agreement, LatencyStats
from pipeline.partial import PartialPlan
from pipeline.quantize import QuantizedModel
from pipeline.regression import Verdict
from pipeline.tuning_check import TuningCheck
from pipeline.verdicts import CheckResult
from targets.profiles import GPU_RUNTIMES


class ModelSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    sha256: str
    workload: str | None
    parameters: int
    flops: int
    op_census: dict[str, int]
    static_rewrite: bool
    prequantized: bool = Field(default=False, description="The model came QDQ int8 and ran as it is.")
    inputs: dict[str, tuple[int, ...]] = Field(default_factory=dict, description="Each input's static shape, as run.")
    batch: int = Field(default=1, description="Samples per inference.")
    reference: str | None = Field(default=None, description="--reference: the fp32 model the baseline ran.")


class ArtifactSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    sha256: str
    path: str
    manifest: str
    target: dict[str, Any]
    tuning: dict[str, Any] | None = None
    integer_ops: int = Field(default=0, description="TVM int8: conv2d/matmul computed as int8 x int8 -> int32.")
    vnni_ops: int = Field(default=0, description="Of those, laid out for AVX-512 VNNI's vpdpbusd.")
    sdot_ops: int = Field(default=0, description="Of those, laid out for ARM dotprod's sdot.")
    dot_ops: dict[str, int] = Field(default_factory=dict, description="Of those, laid out for a dot-product "
                                    "instruction, by instruction (vpdpbusd, vpmaddubsw, sdot, smull+saddlp).")
    winograd_convs: int = Field(default=0, description="Float 3x3 convs computed by Winograd F(4x4, 3x3).")
    device_code: str = Field(default="cpu", description="cpu; ptx or ptx+cubin (a GPU library); onnx.")


class BaselineSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    runtime: str
    latency_ms: LatencyStats
    valid: bool
    invalid_reason: str | None


class AccuracySummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    metric: str | None
    value: float | None
    baseline: float | None
    delta: float | None = Field(description="value - baseline, in the metric's units (fraction).")
    samples: int
    others: dict[str, tuple[float, float | None]] = Field(default_factory=dict, description="Further metrics (COCO: "
                                                          "mAP@0.5): the artifact's and the baseline's.")




def series(scheme: str, runtime: str, unit: str) -> str:
    """The scheme, and the runtime and unit unless it is TVM on the CPU (what results had before runtimes were
    chosen), so TensorRT fp16 and TVM fp16 on one board are two histories and two dashboard cells."""
    return scheme if (runtime, unit.upper()) == ("tvm", "CPU") else f"{scheme} · {runtime} ({unit.upper()})"


class AlsoMeasured(BaseModel):
    """Another runtime measured in the same run, beside the artifact (TVM on a Jetson's GPU, when its TVM has CUDA),
    or why it could not be."""

    model_config = ConfigDict(frozen=True)
    label: str = Field(description="Runtime, unit and scheme, e.g. 'tvm (GPU) fp16'.")
    p50_ms: float | None = None
    p90_ms: float | None = None
    speedup: float | None = Field(default=None, description="baseline p50 / its p50.")
    agreement: Agreement | None = None
    accuracy: float | None = None
    valid: bool = False
    reason: str | None = Field(default=None, description="Why it was not measured (e.g. TVM there has no CUDA).")
# Below this speed-up the report says what to do about it (a few percent either way is measurement noise).
SLOWER_THAN_BASELINE = 0.95


class RunResult(BaseModel):
    """Everything one `deploy run` found out. Its JSON form is the --json output and the result file."""

    model_config = ConfigDict(frozen=True)
    run_id: str
    created: str
    model: ModelSummary
    profile: str
    scheme: str
    runtime: str
    unit: str = Field(default="CPU", description="The unit the artifact ran on: CPU or GPU.")
    artifact: ArtifactSummary
    latency_ms: LatencyStats
    peak_rss_mb: float
    baseline: BaselineSummary
    speedup: float = Field(description="baseline p50 / artifact p50 (above 1 = the artifact is faster).")
    accuracy: AccuracySummary
    agreement: Agreement
    valid: bool
    invalid_reasons: list[str]
    stage_seconds: dict[str, float]
    checks: list[CheckResult] = Field(default_factory=list, description="Verdicts of the hardware checks.")
    deployment: dict[str, Any] = Field(default_factory=dict, description="Device, and which files were sent.")
    regression: Verdict | None = Field(default=None, description="Comparison with this run's history.")
    recorded: bool = Field(default=True, description="Stored in the results database; false: result.json is the "
                                                     "only copy (record_error says why).")
    record_error: str | None = Field(default=None, description="Why the results database did not take this run.")
    reused: list[str] = Field(default_factory=list, description="Stages whose output came from the artifact cache.")
    auto: AutoSelection | None = Field(default=None, description="--quant auto: every candidate and the choice.")
    partial: PartialPlan | None = Field(default=None, description="--partial: layer sensitivity, layers kept float.")
    tuning_check: TuningCheck | None = Field(default=None, description="A tuned TVM build: it and the build before "
                                             "the tuning measured in turns on the device, the faster shipped.")
    benchmark: dict[str, Any] = Field(description="Settings, raw latency samples, devices, versions.")
    also: list[AlsoMeasured] = Field(default_factory=list, description="Other runtimes measured beside it.")
    board: dict[str, Any] = Field(default_factory=dict, description="The board's state before and after (power "
                                  "mode, clocks, temperatures) and its marks; unknown sources are absent.")
    tools: dict[str, str]
    flow_run_id: str | None = None
    result_path: str | None = None

    @property
    def tuning(self) -> dict[str, Any] | None:
        """This run's tuning (search.Tuning as a dict), whether the tuned library shipped or the build before it."""
        return self.artifact.tuning or (self.tuning_check.tuning if self.tuning_check else None)

    @property
    def series(self) -> str:
        """What this run's history is kept under, beside model and profile (see :func:`series`)."""
        return series(self.scheme, self.runtime.split()[0] if self.runtime else "tvm", self.unit)

    @classmethod
    def assemble(
        cls, *, run_id: str, created: str, info: ModelInfo, workload: str | None, profile: str,
        quantized: QuantizedModel, compiled: CompiledArtifact, bench: BenchmarkReport,
        stage_seconds: dict[str, float], tools: dict[str, str], flow_run_id: str | None,
        checks: list[CheckResult] | None = None, deployed: DeployedArtifact | None = None,
        reused: list[str] | None = None,
    ) -> RunResult:
        art, base = bench.artifact, bench.baseline
        reasons = [f"{m.runtime}: {m.invalid_reason}" for m in (art, base) if not m.valid and m.invalid_reason]
        delta = art.accuracy - base.accuracy if art.accuracy is not None and base.accuracy is not None else None
        return cls(
            run_id=run_id, created=created,
            model=ModelSummary(path=info.source_path, sha256=info.sha256, workload=workload,
                               parameters=info.parameters, flops=info.flops, op_census=info.op_census,
                               static_rewrite=info.static_rewrite, prequantized=info.prequantized,
                               inputs={spec.name: spec.shape for spec in info.inputs}, batch=info.batch,
                               reference=info.reference_path),
            profile=profile, scheme=quantized.config.label(),
            runtime=f"{art.runtime} {art.versions.get(art.runtime.split('-')[0], '')}".strip(),
            unit="GPU" if compiled.device_code.startswith("ptx") or art.runtime in GPU_RUNTIMES else "CPU",
            artifact=ArtifactSummary(sha256=compiled.sha256, path=compiled.library_path,
                                     manifest=compiled.manifest_path, target=compiled.target, tuning=compiled.tuning,
                                     integer_ops=compiled.integer_ops, vnni_ops=compiled.vnni_ops,
                                     sdot_ops=compiled.sdot_ops, dot_ops=compiled.dot_ops,
                                     winograd_convs=compiled.winograd_convs,
                                     device_code=compiled.device_code),
            latency_ms=art.latency_ms, peak_rss_mb=art.peak_rss_mb,
            baseline=BaselineSummary(runtime=f"onnxruntime {base.versions.get('onnxruntime', '')} fp32".strip(),
                                     latency_ms=base.latency_ms, valid=base.valid, invalid_reason=base.invalid_reason),
            speedup=base.latency_ms.p50 / art.latency_ms.p50 if art.latency_ms.p50 > 0 else 0.0,
            accuracy=AccuracySummary(metric=bench.metric, value=art.accuracy, baseline=base.accuracy, delta=delta,
                                     samples=art.samples,
                                     others={name: (value, base.metrics.get(name)) for name, value in
                                             art.metrics.items() if name != bench.metric}),
            agreement=bench.agreement, valid=art.valid and base.valid, invalid_reasons=reasons,
            stage_seconds=stage_seconds, checks=checks or [],
            deployment=_deployment(deployed) if deployed else {}, reused=reused or [],
            benchmark={
                "settings": bench.settings.model_dump(),
                "artifact": art.model_dump(exclude={"latency_ms"}),
                "baseline": base.model_dump(exclude={"latency_ms"}),
                "calibration_samples": quantized.calibration_samples,
                "calibration_source": quantized.calibration_source,
            },
            board={"before": bench.board_before.model_dump() if bench.board_before else None,
                   "after": bench.board_after.model_dump() if bench.board_after else None,
                   "marks": bench.board_marks},
            tools=tools, flow_run_id=flow_run_id,
        )

    def slower_advice(self) -> str | None:
        """What to do when the artifact that ran is clearly slower than onnxruntime fp32 on the device (a scheme
        asked for by name; --quant auto never ships one), or None."""
        if self.auto is not None or not self.valid or self.speedup >= SLOWER_THAN_BASELINE:
            return None
        auto = ("or let --quant auto measure every candidate on the device: it never ships one slower than "
                "onnxruntime fp32")
        slower = f"slower than onnxruntime fp32 here ({self.speedup:.2f}x): "
        if not self.runtime.startswith("tvm"):
            return slower + f"{self.scheme} loses to fp32 for this model on this device; {auto}"
        if self.tuning:
            return slower + f"tune longer (--tune-minutes adds to the trials kept so far), {auto}"
        return (slower + "this TVM build is untuned (default schedules, nothing measured): tune it (e.g. "
                f"--tune-minutes 20; the trials are kept, and every later run adds to them), {auto}")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        head = Text.assemble(
            ("edgedeploy run ", "bold"), (self.run_id, "cyan"), "  ",
            (_file_name(self.model.path), "bold"), f" ({self.model.workload or 'no known workload'}) on ",
            (self.profile, "bold magenta"), f" as {self.scheme}",
        )
        stages = Table(title="stages", title_justify="left", show_edge=False)
        for name in self.stage_seconds:
            stages.add_column(name, justify="right")
        stages.add_row(*(f"{s:.1f} s" for s in self.stage_seconds.values()))

        side = Table(title="on the device, side by side", title_justify="left")
        side.add_column("")
        side.add_column(f"{self.runtime} on the {self.unit} ({self.scheme})", justify="right")
        side.add_column(f"{self.baseline.runtime} on the CPU", justify="right")
        a, b = self.latency_ms, self.baseline.latency_ms
        for label, key in (("p50 ms", "p50"), ("p90 ms", "p90"), ("p99 ms", "p99"), ("mean ms", "mean"),
                           ("std ms", "std")):
            side.add_row(label, f"{getattr(a, key):.3f}", f"{getattr(b, key):.3f}")
        if a.batch > 1:  # the rows above are per batch
            side.add_row(f"per sample ms (batch {a.batch})", f"{a.per_sample_ms:.3f}", f"{b.per_sample_ms:.3f}")
        side.add_row("samples /s", f"{a.throughput_per_s:.1f}", f"{b.throughput_per_s:.1f}")
        side.add_row("timed iterations", str(a.n), str(b.n))
        # Never part of the latency: the load (TensorRT builds its engine there for a static-shape model) and the
        # first run (the GPU loads or JIT-compiles its code).
        for label, key in (("load s" + (" (engine build)" if "tensorrt" in self.runtime else ""), "load_seconds"),
                           ("first run s", "first_run_seconds")):
            values = [self.benchmark.get(k, {}).get(key) for k in ("artifact", "baseline")]
            if any(v is not None for v in values):
                side.add_row(label, *("" if v is None else f"{v:.2f}" for v in values))
        if self.accuracy.metric:
            side.add_row(self.accuracy.metric, _pct(self.accuracy.value), _pct(self.accuracy.baseline))
        for name, (value, baseline) in self.accuracy.others.items():
            side.add_row(name, _pct(value), _pct(baseline))
        style = "green" if self.speedup >= 1 else "red"
        summary = Text.assemble(
            "speed-up vs onnxruntime fp32 (p50): ", (f"{self.speedup:.2f}x", f"bold {style}"),
            *(("   accuracy delta: ", (f"{self.accuracy.delta * 100:+.2f} points", "bold")) if self.accuracy.delta
              is not None else ()),
            f"\nagreement with fp32: top-1 {_pct(self.agreement.top1)}, cosine {self.agreement.cosine:.5f}, "
            f"max abs {self.agreement.max_abs:.3g} over {self.agreement.samples} samples",
            *(f"\n  output {row.name}: cosine {row.cosine:.5f}, max abs {row.max_abs:.3g}"
              + (f", top-1 {_pct(row.top1)}" if row.top1 is not None else "") for row in self.agreement.per_output),
        )
        warnings = [Text(f"warning ({c.check}): {c.reason}", style="yellow") for c in self.checks
                    if c.verdict == "warn"]
        if advice := self.slower_advice():
            warnings.append(Text(advice, style="yellow"))
        warnings += [Text(f"board: {mark}", style="yellow") for mark in self.board.get("marks") or []]
        for other in self.also:
            warnings.append(Text(f"also measured: {other.label}: " + (
                f"p50 {other.p50_ms:.3f} ms, {other.speedup:.2f}x onnxruntime fp32"
                + (f", cosine {other.agreement.cosine:.5f}" if other.agreement else "")
                if other.p50_ms is not None and other.speedup is not None else f"not run: {other.reason}"),
                style="cyan"))
        if not self.recorded:
            warnings.append(Text(f"not stored in the results database ({self.record_error}); result.json keeps it: "
                                 f"{self.result_path}", style="bold yellow"))
        if self.regression and self.regression.regressed:
            warnings.append(Text("REGRESSION: " + "; ".join(self.regression.reasons), style="bold red"))
        elif self.regression and self.regression.compared_runs:
            warnings.append(Text(f"no regression against the last {self.regression.compared_runs} run(s)",
                                 style="green"))
        validity = (Text("valid measurement", style="green") if self.valid
                    else Text("INVALID: " + "; ".join(self.invalid_reasons), style="bold red"))
        footer = Text(f"result: {self.result_path}" if self.result_path else "", style="dim")
        parts: list[Any] = [p for p in (self.auto, self.partial) if p]
        if self.artifact.integer_ops:
            laid_out = [f"{n} of them laid out for {name}" for name, n in self.artifact.dot_ops.items()]
            parts.append(Text(f"integer kernels: {self.artifact.integer_ops} conv/matmul compute int8 x int8 -> "
                              f"int32 in TVM{''.join(', ' + text for text in laid_out)} (the rest of the graph "
                              "stays float)"))
        if self.artifact.winograd_convs:
            parts.append(Text(f"Winograd: {self.artifact.winograd_convs} float 3x3 convs computed by F(4x4, 3x3) "
                              "(a quarter of the multiply-adds)"))
        if self.tuning:
            parts.append(Text(tuning_text(self.tuning)))
        if self.tuning_check:
            parts.append(Text(self.tuning_check.text(), style="yellow" if self.tuning_check.shipped == "before"
                              else ""))
        if kernels := kernels_text(self.benchmark.get("artifact") or {}):
            parts.append(Text(kernels))
        yield Group(head, stages, *parts, side, summary, *warnings, validity, footer)


def tuning_text(t: dict[str, Any]) -> str:
    """One paragraph on a build's tuning (pipeline.compiler.tuning.search.Tuning as a dict)."""
    budget = (f", ended by the {t['minutes']:g}-minute budget" if t.get("stopped_by_time")
              else f" (budget {t['minutes']:g} min)" if t.get("minutes") else "")
    per_round = f" ({t['trials_per_round']} a round)" if t.get("trials_per_round") else ""
    threads = f", timed on {t['threads']} threads" if t.get("threads") else ""
    chosen = "slowest of {}, each timed first" if t.get("ranked_by") == "time" else "heaviest of {}"
    of = (f" (the {chosen.format(t['model_tasks'])}; the others kept default schedules)"
          if t.get("model_tasks", 0) > t["tasks"] else "")
    return (f"tuned: up to {t['trials_per_task']} MetaSchedule trials per task{per_round} over {t['tasks']} tasks{of}, "
            f"{t.get('trials_added', 0)} trials added in {t['seconds']:.0f} s{budget}{threads} "
            f"({t.get('scheduled', 0)} kernels built with a tuned schedule); the database ({t['database']}) now "
            f"holds {t['records']} records"
            + _curve_text(t.get("curve") or []))


KERNELS_IN_REPORT = 5


def kernels_text(measured: dict[str, Any]) -> str:
    """Where the artifact's time went on the device (pipeline.benchmark.Measurement as a dict), or ''."""
    kernels = measured.get("kernels") or []
    if not kernels:
        return ""
    lines = [f"  {k['us'] / 1000:8.3f} ms  {k['calls']:3d} call(s)  {k['name']}" for k in kernels[:KERNELS_IN_REPORT]]
    return (f"heaviest kernels on the device (every call timed, {measured['kernel_runs']} runs after the timed ones; "
            f"all calls together {measured['kernels_total_us'] / 1000:.3f} ms a run):\n" + "\n".join(lines))


def _curve_text(curve: list[dict[str, Any]]) -> str:
    if not curve:
        return ""
    first, last = curve[0], curve[-1]
    return (f"\nestimated latency against trials (kernels timed alone x calls): {first['estimated_ms']:.3f} ms "
            f"after {first['trials']} trials -> {last['estimated_ms']:.3f} ms after {last['trials']}")


def _deployment(deployed: DeployedArtifact) -> dict[str, Any]:
    placed = {"runner": deployed.runner, "library": deployed.library, "manifest": deployed.manifest,
              "baseline_model": deployed.baseline_model, "inputs": deployed.inputs}
    return {
        "device": deployed.device, "run_dir": deployed.run_dir,
        "uploaded": sorted(k for k, p in placed.items() if p.uploaded),
        "already_there": sorted(k for k, p in placed.items() if not p.uploaded),
        "library_path": deployed.library.remote_path,
    }


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f} %"
