"""Latency against tuning trials, read from MetaSchedule's JSON database (no TVM needed).

The database appends one line per measured candidate, in the order they were measured, to
`database_tuning_record.json` ([workload index, [trace, run seconds, target, args]]); `database_workload.json`
holds one line per tuned kernel ([structural hash, module]). For one model, whose kernels (tasks) run
`weight` times each per inference, the estimated latency after t trials is the sum over its kernels of
weight x the best time measured so far: MetaSchedule's own objective. It is an estimate (kernels timed
alone, no Relax VM overhead); the report puts the measured end-to-end latency beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

FAILED_RUN_SECONDS = 1e9  # MetaSchedule records a failed candidate with a huge run time


class CurvePoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    trials: int
    estimated_ms: float


def _lines(path: Path) -> list[list]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tuning_curve(database: Path, weights: dict[str, float], *, max_points: int = 60) -> list[CurvePoint]:
    """Estimated model latency after each of this model's trials (all runs so far), thinned to ``max_points``.

    ``weights`` maps a kernel's structural hash (as the database writes it) to its calls per inference.
    The curve starts once every kernel has one successful measurement: before that there is no estimate.
    """
    workloads = [row[0] for row in _lines(database / "database_workload.json")]
    best: dict[str, float] = {}
    trials = 0
    points: list[CurvePoint] = []
    for index, record in _lines(database / "database_tuning_record.json"):
        run_secs = record[1]  # [trace, run seconds, target, args]
        shash = workloads[index] if index < len(workloads) else None
        if shash not in weights:
            continue  # another model's kernel
        trials += 1
        times = [float(s) for s in run_secs or [] if float(s) < FAILED_RUN_SECONDS]
        if times:
            best[shash] = min(best.get(shash, float("inf")), sum(times) / len(times))
        if len(best) == len(weights):
            points.append(CurvePoint(trials=trials, estimated_ms=1000 * sum(w * best[h] for h, w in weights.items())))
    if len(points) <= max_points:
        return points
    step = len(points) / max_points
    return [points[int(i * step)] for i in range(max_points - 1)] + [points[-1]]
