"""Small, valid RunResults for tests of what happens after a run (storage, regressions, the dashboard)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from pipeline.metrics import Agreement, LatencyStats
from pipeline.report import AccuracySummary, ArtifactSummary, BaselineSummary, ModelSummary, RunResult

START = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)


def make_result(night: int, *, centre_ms: float = 10.0, accuracy: float | None = 0.99, profile: str = "lab-x86",
                model: str = "digits-cnn", scheme: str = "int8 QDQ U8S8 minmax per-channel", valid: bool = True,
                n: int = 200, seed: int | None = None) -> RunResult:
    rng = np.random.default_rng(night if seed is None else seed)
    samples = list(rng.normal(centre_ms, centre_ms * 0.03, n))
    baseline = list(rng.normal(centre_ms * 2, centre_ms * 0.06, n))
    stats, base_stats = LatencyStats.from_samples(samples), LatencyStats.from_samples(baseline)
    sha = {"digits-cnn": "d0" * 32, "pp-lcnet-orientation": "2f" * 32}.get(model, "ee" * 32)
    measurement = {"samples_ms": samples, "device_python": "3.11.7", "device_machine": "x86_64",
                   "versions": {"tvm": "0.27.0"}}
    return RunResult(
        run_id=f"night{night:03d}-{model}-{profile}", created=(START + timedelta(days=night)).isoformat(),
        model=ModelSummary(path=f"/models/{model}.onnx", sha256=sha, workload=model, parameters=1, flops=1,
                           op_census={}, static_rewrite=False),
        profile=profile, scheme=scheme, runtime="tvm 0.27.0",
        artifact=ArtifactSummary(sha256="aa" * 32, path="/x/model.so", manifest="/x/manifest.json", target={}),
        latency_ms=stats, peak_rss_mb=100.0,
        baseline=BaselineSummary(runtime="onnxruntime 1.31.1 fp32", latency_ms=base_stats, valid=True,
                                 invalid_reason=None),
        speedup=base_stats.p50 / stats.p50,
        accuracy=AccuracySummary(metric="top1" if accuracy is not None else None, value=accuracy,
                                 baseline=0.99 if accuracy is not None else None,
                                 delta=None if accuracy is None else accuracy - 0.99, samples=n),
        agreement=Agreement(top1=1.0, cosine=1.0, max_abs=0.0, samples=n), valid=valid,
        invalid_reasons=[] if valid else ["tvm: too few iterations"], stage_seconds={"benchmark": 1.0},
        benchmark={"artifact": measurement, "baseline": {**measurement, "samples_ms": baseline}},
        tools={"apache-tvm": "0.27.0.post1"}, flow_run_id=None,
    )
