"""Reference workloads: bundled real models with their data generators and metrics."""

from __future__ import annotations

from pipeline.workloads.base import Samples, Workload
from pipeline.workloads.detector import DetectorWorkload
from pipeline.workloads.digits import DigitsWorkload
from pipeline.workloads.orientation import OrientationWorkload

WORKLOADS: dict[str, Workload] = {w.name: w for w in (DigitsWorkload(), OrientationWorkload(), DetectorWorkload())}


def workload_for(model_sha256: str) -> Workload | None:
    """The reference workload whose bundled model has this hash, if any."""
    return next((w for w in WORKLOADS.values() if w.sha256 == model_sha256), None)


__all__ = ["WORKLOADS", "Samples", "Workload", "workload_for"]
