"""Accuracy of outputs against labels, agreement of outputs with the fp32 reference, latency statistics."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.workloads.detector import iou


class LatencyStats(BaseModel):
    """Latency distribution in milliseconds over the timed (post-warm-up) iterations."""

    model_config = ConfigDict(frozen=True)
    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    throughput_per_s: float = Field(description="Samples per second: batch x 1000 / mean.")
    batch: int = Field(default=1, description="Samples per inference: every figure above but throughput is per "
                       "batch.")
    per_sample_ms: float | None = Field(default=None, description="mean / batch.")

    @classmethod
    def from_samples(cls, samples_ms: list[float], batch: int = 1) -> LatencyStats:
        arr = np.asarray(samples_ms, np.float64)
        if arr.size == 0:
            nan = float("nan")
            return cls(n=0, p50=nan, p90=nan, p99=nan, mean=nan, std=nan, min=nan, max=nan, throughput_per_s=0.0,
                       batch=batch)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        mean = float(arr.mean())
        return cls(
            n=int(arr.size), p50=float(p50), p90=float(p90), p99=float(p99), mean=mean,
            std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0, min=float(arr.min()), max=float(arr.max()),
            throughput_per_s=batch * 1000.0 / mean if mean > 0 else 0.0, batch=batch, per_sample_ms=mean / batch,
        )


class OutputAgreement(BaseModel):
    """One output of the model against the reference's same output."""

    model_config = ConfigDict(frozen=True)
    name: str
    top1: float | None = Field(description="Share of samples whose argmax matches, where the output is a classifier's "
                               "(one row of scores per sample).")
    cosine: float
    max_abs: float


class Agreement(BaseModel):
    """How closely the artifact's outputs follow the fp32 reference's, on the same inputs (the headline: the first
    output's; ``per_output``: every output, where the model has more than one)."""

    model_config = ConfigDict(frozen=True)
    top1: float | None = Field(description="Share of samples whose argmax matches (classifiers).")
    cosine: float = Field(description="Mean cosine similarity of flattened outputs.")
    max_abs: float = Field(description="Largest absolute difference over all outputs.")
    samples: int
    per_output: list[OutputAgreement] = Field(default_factory=list, description="Every output, by name, in order.")


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.reshape(len(outputs), -1).argmax(1) == labels[: len(outputs)]).mean())


def average_precision(detections: list[np.ndarray], truths: list[np.ndarray], *, iou_threshold: float = 0.5) -> float:
    """VOC-style all-point AP of one class over a set of images."""
    total = sum(len(t) for t in truths)
    if total == 0:
        return float("nan")
    scored: list[tuple[float, bool]] = []
    for dets, truth in zip(detections, truths, strict=True):
        matched = np.zeros(len(truth), bool)
        for det in dets[np.argsort(-dets[:, 4])] if len(dets) else []:
            hit = False
            if len(truth):
                overlaps = iou(det[:4], truth)
                best = int(np.argmax(overlaps))
                if overlaps[best] >= iou_threshold and not matched[best]:
                    matched[best] = hit = True
            scored.append((float(det[4]), hit))
    if not scored:
        return 0.0
    scored.sort(key=lambda s: -s[0])
    hits = np.array([h for _, h in scored], np.float64)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = np.concatenate([[0.0], tp / total, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1e-9), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def agreement(outputs: np.ndarray, reference: np.ndarray, *, classifier: bool) -> Agreement:
    n = min(len(outputs), len(reference))
    a = outputs[:n].reshape(n, -1).astype(np.float64)
    b = reference[:n].reshape(n, -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30), 1.0)
    return Agreement(
        top1=float((a.argmax(1) == b.argmax(1)).mean()) if classifier else None,
        cosine=float(cosine.mean()),
        max_abs=float(np.abs(a - b).max()) if n else 0.0,
        samples=n,
    )


def within_budget(value: float | None, reference: float | None, agree: Agreement, budget: float) -> bool:
    """Is a variant's quality acceptable? Its metric at most ``budget`` below the fp32 reference's when the
    samples have labels; without labels, top-1 agreement with fp32 of at least 1 - budget (classifiers), or a
    mean cosine similarity of at least 0.99 (other outputs)."""
    if value is not None and reference is not None:
        return value >= reference - budget
    if agree.top1 is not None:
        return agree.top1 >= 1 - budget
    return agree.cosine >= 0.99


def per_output_agreement(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                         names: list[str]) -> list[OutputAgreement]:
    """Every output against the reference's, by position (the runner's ``outputs``, ``output_1``, ...) and named
    after the model's outputs; a 2-D output with a score per class is a classifier's (top-1 agreement)."""
    rows = []
    for index, name in enumerate(names):
        key = "outputs" if index == 0 else f"output_{index}"
        if key not in outputs or key not in reference:
            break
        out = outputs[key]
        classifier = out.ndim == 2 and out.shape[1] > 1
        found = agreement(out, reference[key], classifier=classifier)
        rows.append(OutputAgreement(name=name, top1=found.top1, cosine=found.cosine, max_abs=found.max_abs))
    return rows
