"""A session with a device: opened, checked, used, closed. The one way the stages reach a board.

`deploy run`, `--quant auto` and the lab deploy and measure through it (flows/tasks.py wraps each use in a task that
retries transient faults); `deploy doctor` reports what one finds; and tuning on a board gets its RPC server through
one (`tuning_board`): the orchestrator hands that opener to the compiler, which imports no connection code and calls
it only when it tunes for a board.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import EdgeDeployError, HostKeyError
from pipeline.benchmark import BenchmarkReport, BenchmarkSettings, Measurement, benchmark, measure
from pipeline.data import PreparedData
from pipeline.deploy import DeployedArtifact, deploy
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.preflight import preflight, probe
from pipeline.workloads.base import Samples
from targets.connect import open_transport
from targets.profiles import DeviceProfile
from targets.transport import Transport

if TYPE_CHECKING:
    from pipeline.compiler.tuning.board import BoardRunner


class DeviceSession:
    """One connection to the device a profile describes, for as long as the ``with`` block lasts."""

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.transport: Transport
        self.workdir: str

    def __enter__(self) -> DeviceSession:
        self.transport, self.workdir = open_transport(self.profile)
        return self

    def __exit__(self, *exc_info) -> None:
        self.transport.close()

    def deploy(self, run_id: str, artifact: CompiledArtifact, info: ModelInfo, data: PreparedData) -> DeployedArtifact:
        """The preflight (the device is what the profile says, has the runtimes and the room), then the artifact,
        the fp32 baseline model and the evaluation inputs placed on it (pipeline.deploy)."""
        files = [Path(artifact.library_path), Path(artifact.manifest_path), Path(info.source_path),
                 Path(data.eval_path)]
        runtimes = ("tvm", "onnxruntime") if artifact.runtime == "tvm" else ("onnxruntime",)
        preflight(self.transport, self.profile, self.workdir, bytes_needed=sum(f.stat().st_size for f in files),
                  runtimes=runtimes)
        return deploy(self.transport, self.workdir, run_id, library=files[0], manifest=files[1],
                      baseline_model=files[2], inputs=files[3], runtime=artifact.runtime)

    def _samples(self, info: ModelInfo, data: PreparedData) -> tuple[list[str], Samples]:
        names = [s.name for s in info.inputs]
        return names, Samples.load(Path(data.eval_path), names)

    def benchmark(self, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData, *,
                  settings: BenchmarkSettings, local_dir: Path) -> BenchmarkReport:
        """The artifact and onnxruntime fp32 in turns, scored and compared (pipeline.benchmark)."""
        names, samples = self._samples(info, data)
        return benchmark(self.transport, self.profile.connection.python_argv(), deployed, samples, input_order=names,
                         scoring=data.scoring, settings=settings, local_dir=local_dir)

    def measure(self, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData, *, which: str,
                settings: BenchmarkSettings, local_dir: Path) -> tuple[Measurement, np.ndarray]:
        """One runtime alone: the artifact (which="artifact") or onnxruntime fp32 (which="baseline")."""
        names, samples = self._samples(info, data)
        return measure(self.transport, self.profile.connection.python_argv(), deployed, samples, which=which,
                       input_order=names, scoring=data.scoring, settings=settings, local_dir=local_dir)


@contextlib.contextmanager
def tuning_board(profile: DeviceProfile) -> Iterator[BoardRunner]:
    """TVM's RPC server on the board, reached through a forwarded port of a session with it, for MetaSchedule to
    time candidates there; stopped, and the session closed, on exit. What the orchestrator hands the compiler."""
    from pipeline.compiler.tuning.board import board_runner

    with DeviceSession(profile) as session, board_runner(session.transport, session.workdir, profile) as board:
        yield board


class DoctorRow(BaseModel):
    """One line of `deploy doctor`."""

    model_config = ConfigDict(frozen=True)
    check: str
    ok: bool
    detail: str


def doctor(profile: DeviceProfile) -> list[DoctorRow]:
    """Reachability, host key, architecture, Python, runtimes and free disk, each reported, none raised."""
    rows: list[DoctorRow] = []
    try:
        transport, workdir = open_transport(profile)
    except HostKeyError as exc:
        return [DoctorRow(check="reachable", ok=True, detail=profile.connection.host or "local"),
                DoctorRow(check="host key", ok=False, detail=exc.render())]
    except EdgeDeployError as exc:
        return [DoctorRow(check="reachable", ok=False, detail=exc.render())]
    try:
        rows.append(DoctorRow(check="reachable", ok=True, detail=transport.name))
        if profile.connection.transport == "ssh":
            rows.append(DoctorRow(check="host key", ok=True,
                                  detail=f"matches {profile.connection.known_hosts or '~/.ssh/known_hosts'}"))
        facts = probe(transport, profile, workdir)
        rows.append(DoctorRow(check="architecture", ok=facts.machine == profile.cpu.arch,
                              detail=f"device {facts.machine}, profile {profile.cpu.arch}"))
        rows.append(DoctorRow(check="python", ok=facts.python.startswith(profile.python_version),
                              detail=f"device {facts.python}, profile {profile.python_version}"))
        for runtime in ("numpy", "tvm", "onnxruntime"):
            wanted = runtime == "numpy" or getattr(profile.runtimes, runtime) is not None
            present = getattr(facts, runtime)
            rows.append(DoctorRow(check=runtime, ok=present or not wanted,
                                  detail=("installed" if present else "missing") +
                                  ("" if wanted else " (the profile doesn't expect it)")))
        rows.append(DoctorRow(check="free disk", ok=facts.free_bytes > 100 * 2**20,
                              detail=f"{facts.free_bytes / 2**30:.1f} GiB free in {workdir}"))
    except EdgeDeployError as exc:
        rows.append(DoctorRow(check="device", ok=False, detail=exc.render()))
    finally:
        transport.close()
    return rows
