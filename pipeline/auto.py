"""`--quant auto`: measure every scheme the checks allow on every runtime of the device, and ship the
fastest that stays within the accuracy budget, or onnxruntime fp32 when nothing beats it.

"Beats" means measured faster on the device: the candidate's p50 is at least 2 % below the baseline's
AND a one-sided Mann-Whitney U test on the raw samples says so (p < 0.01). Noise doesn't promote a
candidate, so the shipped artifact is never slower than what the user already has.
"""

from __future__ import annotations

import html
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from scipy.stats import mannwhitneyu

from pipeline.benchmark import Measurement
from pipeline.metrics import Agreement, within_budget
from pipeline.partial import PartialPlan
from pipeline.quantize import QuantConfig
from targets.profiles import RuntimeName

Runtime = RuntimeName
FASTER_ALPHA = 0.01
MIN_SPEEDUP = 1.02  # smaller gains are within what a re-measurement moves


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True)
    runtime: Runtime
    quant: QuantConfig
    tune_trials: int = Field(default=0, description="TVM: MetaSchedule trials per task (0 = default schedules).")
    tune_minutes: float | None = Field(default=None, description="TVM tuned: this candidate's time budget.")

    def label(self) -> str:
        if not self.tune_trials:
            tuned = ""
        elif self.tune_minutes:  # the trial cap is then only a ceiling (TRIALS_WITHIN_MINUTES): the budget says more
            tuned = f" tuned {round(self.tune_minutes, 2):g} min"
        else:
            tuned = f" tuned {self.tune_trials}/task"
        return f"{self.runtime} {self.quant.label()}{tuned}"


# Transformers and recurrent models get onnxruntime's dynamic int8 as a candidate: a model with recurrent or attention
# ops, or whose weighted work is all MatMul/Gemm (a CNN's one classifier Gemm does not make it one).
RECURRENT_OR_ATTENTION = frozenset({"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"})


def dynamic_worthy(op_census: dict[str, int]) -> bool:
    """Is dynamic quantization a candidate for a model with this op census ('domain::Op' keys for other domains)?"""
    ops = {op.split("::")[-1] for op in op_census}
    dense_only = bool(ops & {"MatMul", "Gemm"}) and not ops & {"Conv", "ConvTranspose"}
    return bool(ops & RECURRENT_OR_ATTENTION) or dense_only


def default_candidates(gpu_runtimes: tuple[RuntimeName, ...] = (), dynamic: bool = False) -> list[Candidate]:
    """onnxruntime's own int8 options are candidates too (measured, not assumed); TVM's with default schedules
    (:func:`tuning_plan` picks which get tuned afterwards). Each of ``gpu_runtimes`` (onnxruntime's CUDA / TensorRT
    providers the board has) adds fp32, fp16 and int8 on the GPU; the checks refuse what the GPU can't run (int8
    without DP4A). ``dynamic`` (a model whose work is in MatMul/Gemm/LSTM/attention) adds onnxruntime's dynamic
    int8."""
    int8 = QuantConfig(scheme="int8")
    ort = [
        QuantConfig(scheme="fp32"), int8, int8.model_copy(update={"reduce_range": True}),
        int8.model_copy(update={"activation_type": "int8"}), int8.model_copy(update={"format": "qoperator"}),
        int8.model_copy(update={"per_channel": False}), int8.model_copy(update={"calibration": "percentile"}),
        int8.model_copy(update={"calibration": "entropy"}), int8.model_copy(update={"calibration": "mse"}),
        QuantConfig(scheme="fp16"),
    ]
    tvm = [QuantConfig(scheme="fp32"), int8, QuantConfig(scheme="fp16")]
    trt_int8 = int8.model_copy(update={"activation_type": "int8", "symmetric_activations": True})
    gpu = [Candidate(runtime=runtime, quant=q) for runtime in gpu_runtimes
           for q in (QuantConfig(scheme="fp16"), QuantConfig(scheme="fp32"),
                     trt_int8 if runtime == "onnxruntime-tensorrt" else int8)]
    if dynamic:  # weights int8, activations quantized on every run: no calibration (pipeline.quantize)
        ort.append(QuantConfig(scheme="dynamic"))
    return ([Candidate(runtime="onnxruntime", quant=q) for q in ort] + [Candidate(runtime="tvm", quant=q) for q in tvm]
            + gpu)


# A TVM candidate whose untuned build is more than this much slower than the fastest untuned one gets no tuning:
# tuning would have to find more than that factor to catch up, where the fastest needs less to get further.
PROMISE_RATIO = 2.0
MIN_SHARE_MINUTES = 1.0  # below this, MetaSchedule's set-up and first round take most of a share


def tuning_plan(measured: list[tuple[Candidate, CandidateOutcome]], trials: int,
                minutes: float | None) -> list[Candidate]:
    """The TVM CPU candidates worth tuning, each with its share of ``minutes`` (the whole selection's budget), from
    how their untuned builds did: only those measured within the accuracy budget (tuning changes speed, never
    what int8 computes), only those within PROMISE_RATIO of the fastest, each share in proportion to its untuned
    speed (the fastest the most), none under MIN_SHARE_MINUTES (the slowest dropped until each has that). Without
    ``minutes``, each gets ``trials`` per task."""
    if not trials:
        return []
    eligible = [(c, o) for c, o in measured if c.runtime == "tvm" and not c.tune_trials and o.unit == "cpu"
                and o.status == "measured" and o.valid and o.within_budget and o.p50_ms]
    if not eligible:
        return []
    fastest = min(o.p50_ms for _, o in eligible)
    promising = sorted(((c, fastest / o.p50_ms) for c, o in eligible if o.p50_ms <= PROMISE_RATIO * fastest),
                       key=lambda pair: -pair[1])
    if minutes is None:
        return [c.model_copy(update={"tune_trials": trials}) for c, _ in promising]
    while len(promising) > 1 and minutes * promising[-1][1] / sum(w for _, w in promising) < MIN_SHARE_MINUTES:
        promising.pop()
    total = sum(w for _, w in promising)
    return [c.model_copy(update={"tune_trials": trials, "tune_minutes": minutes * w / total}) for c, w in promising]


def _closeness(result: CandidateOutcome) -> tuple[bool, float]:
    """How well a candidate kept the model's answers: within the budget first, then its metric or agreement."""
    agree = result.agreement
    score = result.accuracy if result.accuracy is not None else (
        agree.top1 if agree is not None and agree.top1 is not None else agree.cosine if agree is not None else 0.0)
    return result.within_budget, score


def calibration_retries(candidates: list[Candidate], measured: dict[str, CandidateOutcome]) -> list[Candidate]:
    """TVM int8 again with another calibration, for each TVM int8 candidate measured outside the budget: the
    calibration whose onnxruntime int8 (per-channel U8S8, as TVM's) kept the answers best, if not its own. A
    calibration changes the ranges, not the kernels: only accuracy can differ, so a candidate within budget is not
    tried again."""
    tried = {c.label() for c in candidates}
    ort_int8 = [(c, measured[c.label()]) for c in candidates if c.runtime == "onnxruntime" and c.label() in measured
                and c.quant.scheme == "int8" and c.quant.format == "qdq" and c.quant.per_channel
                and c.quant.activation_type == "uint8" and not c.quant.reduce_range and not c.quant.keep_float]
    if not ort_int8:
        return []
    best = max(ort_int8, key=lambda pair: _closeness(pair[1]))[0].quant.calibration
    retries = []
    for c in candidates:
        result = measured.get(c.label())
        if c.runtime != "tvm" or c.quant.scheme != "int8" or result is None or result.within_budget:
            continue
        retry = c.model_copy(update={"quant": c.quant.model_copy(update={"calibration": best})})
        if c.quant.calibration != best and retry.label() not in tried:
            retries.append(retry)
            tried.add(retry.label())
    return retries


class CandidateOutcome(BaseModel):
    """One candidate: measured on the device, refused by a check, or failed."""

    model_config = ConfigDict(frozen=True)
    label: str
    runtime: Runtime
    scheme: str
    status: Literal["measured", "refused", "failed"]
    unit: Literal["cpu", "gpu"] = Field(default="cpu", description="The unit the candidate runs on.")
    reason: str | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    accuracy: float | None = None
    agreement: Agreement | None = None
    speedup: float | None = None
    faster_p_value: float | None = Field(default=None, description="One-sided U test: faster than the baseline.")
    within_budget: bool = False
    valid: bool = False
    artifact_sha256: str | None = None
    tuning: dict | None = Field(default=None, description="TVM tuned: trials, time and the latency-vs-trials curve.")
    caveat: str | None = Field(default=None, description="Why its results may be off on this device (e.g. "
                               "onnxruntime U8S8 saturating without VNNI): its measured accuracy decides.")
    in_turns: bool = Field(default=False, description="A finalist: measured again in turns with onnxruntime fp32 "
                           "(A B B A); its p50, speed-up and U test are those turns'.")
    alone_p50_ms: float | None = Field(default=None, description="A finalist's p50 measured alone, before its turns.")

    def quality_text(self) -> str:
        """The metric when there are labels, else agreement with the fp32 reference."""
        if self.accuracy is not None:
            return f"{self.accuracy * 100:.2f} %"
        if self.agreement is None:
            return ""
        if self.agreement.top1 is not None:
            return f"top-1 {self.agreement.top1 * 100:.1f} %"
        return f"cos {self.agreement.cosine:.4f}"


def outcome(candidate: Candidate, measured: Measurement, baseline: Measurement, agreement: Agreement, *,
            metric: str | None, budget: float) -> CandidateOutcome:
    within = within_budget(measured.accuracy if metric else None, baseline.accuracy if metric else None,
                           agreement, budget)
    p_value = float(mannwhitneyu(measured.samples_ms, baseline.samples_ms, alternative="less").pvalue)
    return CandidateOutcome(
        label=candidate.label(), runtime=candidate.runtime, scheme=candidate.quant.label(), status="measured",
        p50_ms=measured.latency_ms.p50, p90_ms=measured.latency_ms.p90, accuracy=measured.accuracy,
        agreement=agreement, speedup=baseline.latency_ms.p50 / measured.latency_ms.p50,
        faster_p_value=p_value, within_budget=within, valid=measured.valid, artifact_sha256=measured.artifact_sha256,
    )


def reading_order(outcomes: list[CandidateOutcome]) -> list[CandidateOutcome]:
    """The finalists first (their turns chose), then the rest as measured alone, the fastest first (alone they all
    share one baseline); refused and failed ones last."""
    return sorted(outcomes, key=lambda o: (o.status != "measured", not o.in_turns, -(o.speedup or 0)))


class AutoSelection(BaseModel):
    """Every candidate, and the one shipped."""

    model_config = ConfigDict(frozen=True)
    outcomes: list[CandidateOutcome]
    chosen: str | None = Field(description="Label of the shipped candidate; None = onnxruntime fp32 on the original.")
    reason: str
    budget: float
    metric: str | None
    baseline_p50_ms: float
    baseline_accuracy: float | None
    partial: PartialPlan | None = Field(default=None, description="Whether int8 needed layers in float, and which.")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"--quant auto: {len(self.outcomes)} candidates, measured on the device",
                      title_justify="left")
        for column in ("candidate", "p50 ms", "speed-up", self.metric or "agreement", "within budget", "status"):
            table.add_column(column)
        for o in reading_order(self.outcomes):
            style = "bold green" if o.label == self.chosen else ""
            label = o.label + (" (GPU)" if o.unit == "gpu" else "")
            table.add_row(
                f"[{style}]{label}[/]" if style else label,
                "" if o.p50_ms is None else f"{o.p50_ms:.3f}",
                "" if o.speedup is None else f"{o.speedup:.2f}x", o.quality_text(),
                ("yes" if o.within_budget else "no") if o.status == "measured" else "",
                (f"measured, in turns (alone: {o.alone_p50_ms:.3f} ms)" if o.in_turns else o.status)
                if o.status == "measured" else f"{o.status}: {o.reason}",
            )
        yield table
        caveats: dict[str, list[str]] = {}
        for o in self.outcomes:
            if o.caveat and o.status == "measured":
                caveats.setdefault(o.caveat, []).append(o.label)
        for caveat, labels in caveats.items():
            yield f"[yellow]note:[/] {', '.join(labels)}: {caveat}"
        if self.partial:
            yield self.partial
        yield f"[bold]shipped:[/] {self.chosen or 'onnxruntime fp32 (the original model)'}: {self.reason}"


# Each candidate is measured alone, at its own minute of the run, against the better of the baseline's two
# measurements (before and after all of them): on a device whose speed drifts (a shared VM: up to 1.5x within one run)
# that reads a candidate against another minute's baseline. So the candidates measured alone within FINALIST_RATIO of
# the fastest (and of the baseline) are measured again, each in turns with onnxruntime fp32 as a plain run's benchmark
# is (A B B A), and only those turns choose. PP-LCNet's TVM int8 read 0.89-1.19x of onnxruntime fp32 alone in four
# --quant auto runs, 1.22x in a plain run's turns and 1.33-1.49x in one process's turns the same hour (AVX2 EPYC).
FINALIST_RATIO = 1.3
MAX_FINALISTS = 3


def finalists(outcomes: list[CandidateOutcome], baseline_p50_ms: float) -> list[str]:
    """The labels of the candidates to measure in turns with the baseline: valid and within budget, their p50 alone
    within FINALIST_RATIO of the fastest such one's and of the baseline's; at most MAX_FINALISTS, the fastest first."""
    able = [o for o in outcomes if o.status == "measured" and o.valid and o.within_budget and o.p50_ms]
    if not able:
        return []
    bar = FINALIST_RATIO * min(min(o.p50_ms for o in able), baseline_p50_ms)
    return [o.label for o in sorted(able, key=lambda o: o.p50_ms) if o.p50_ms <= bar][:MAX_FINALISTS]


def choose(
    outcomes: list[CandidateOutcome], *, budget: float, metric: str | None, baseline: Measurement
) -> AutoSelection:
    """The candidate with the largest speed-up that is valid, within budget and measurably faster than onnxruntime
    fp32 (at least MIN_SPEEDUP and the U test); where finalists were measured in turns, only those (each against the
    baseline of its own turns)."""
    in_turns = any(o.in_turns for o in outcomes)
    eligible = [o for o in outcomes if o.status == "measured" and o.valid and o.within_budget
                and o.in_turns == in_turns and o.speedup is not None and o.speedup >= MIN_SPEEDUP
                and o.faster_p_value is not None and o.faster_p_value < FASTER_ALPHA]
    common = {"outcomes": outcomes, "budget": budget, "metric": metric, "baseline_p50_ms": baseline.latency_ms.p50,
              "baseline_accuracy": baseline.accuracy}
    turns = " in turns with it" if in_turns else ""
    if not eligible:
        return AutoSelection(chosen=None, reason=f"nothing beat onnxruntime fp32{turns} within the accuracy budget, "
                             "so onnxruntime fp32 ships", **common)
    best = max(eligible, key=lambda o: o.speedup)
    return AutoSelection(chosen=best.label, reason=f"fastest within budget: {best.speedup:.2f}x onnxruntime fp32"
                         f"{turns} (U test p={best.faster_p_value:.2g})", **common)


def plot_svg(selection: AutoSelection, width: int = 640, height: int = 360) -> str:
    """Latency (x, log scale) against the quality measure (y), one dot per measured candidate."""
    import math

    measured = [o for o in selection.outcomes if o.status == "measured" and o.p50_ms]
    if not measured:
        return ""

    def quality(o: CandidateOutcome) -> float:
        if o.accuracy is not None:
            return o.accuracy
        if o.agreement is None:
            return 0.0
        return o.agreement.top1 if o.agreement.top1 is not None else o.agreement.cosine

    xs = [math.log10(o.p50_ms) for o in measured] + [math.log10(selection.baseline_p50_ms)]
    ys = [quality(o) for o in measured]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01
    pad = 50

    def px(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad))

    dots = []
    for o in measured:
        x, y = px(math.log10(o.p50_ms), quality(o))
        colour = "#1a7f37" if o.label == selection.chosen else ("#0969da" if o.within_budget else "#cf222e")
        dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"><title>{html.escape(o.label)}: '
                    f'{o.p50_ms:.3f} ms</title></circle><text x="{x + 7:.1f}" y="{y - 6:.1f}" font-size="10">'
                    f'{html.escape(o.label)}</text>')
    bx, _ = px(math.log10(selection.baseline_p50_ms), y0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            f'<line x1="{bx:.1f}" y1="{pad}" x2="{bx:.1f}" y2="{height - pad}" stroke="#8c959f" stroke-dasharray="4"/>'
            f'<text x="{bx + 4:.1f}" y="{pad - 6}" font-size="11">onnxruntime fp32</text>'
            f'<text x="{width / 2 - 60}" y="{height - 12}" font-size="12">p50 latency (ms, log scale)</text>'
            f'<text x="8" y="20" font-size="12">{html.escape(selection.metric or "agreement with fp32")}</text>'
            f'{"".join(dots)}</svg>')
