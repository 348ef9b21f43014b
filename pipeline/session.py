"""A session with a device: opened, checked, used, closed. The one way the stages reach a board.

`deploy run`, `--quant auto` and the lab deploy and measure through it (flows/tasks.py wraps each use in a task that
retries transient faults), and tuning on a board gets its RPC server through one (`tuning_board`): the orchestrator
hands that opener to the compiler, which imports no connection code and calls it only when it tunes for a board.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.benchmark import BenchmarkReport, BenchmarkSettings, Measurement, benchmark, measure
from pipeline.data import PreparedData
from pipeline.deploy import DeployedArtifact, deploy
from pipeline.ingest import ModelInfo
from pipeline.manifest import CompiledArtifact
from pipeline.onnx_safety import self_contained
from pipeline.opset import for_onnxruntime
from pipeline.preflight import preflight
from pipeline.workloads.base import Samples
from targets.board_lock import board_lock, still_held
from targets.board_state import BoardState, judge, read_board_state
from targets.connect import open_transport
from targets.gpu_probe import GpuFacts, probe_gpu
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
        self._lock = board_lock(self.transport, self.profile.connection.lock_timeout)
        try:
            self._held = self._lock.__enter__()  # one run on the board at a time (targets.board_lock)
        except BaseException:
            self.transport.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._lock.__exit__(*exc_info)
        finally:
            self.transport.close()

    def deploy(self, run_id: str, artifact: CompiledArtifact, info: ModelInfo, data: PreparedData) -> DeployedArtifact:
        """The preflight (the device is what the profile says, has the runtimes and the room), then the artifact,
        the fp32 baseline model (``--reference`` where one was given) and the evaluation inputs placed on it
        (pipeline.deploy)."""
        # The fp32 baseline with its weights inside (a model with external data), at an opset the board's onnxruntime
        # runs (converted down where it must: pipeline.opset).
        out = Path(info.prepared_path).parent / "baseline"
        baseline = for_onnxruntime(self_contained(Path(info.reference_path or info.source_path), out),
                                   self.profile.onnxruntime_for("onnxruntime"), out)
        files = [Path(artifact.library_path), Path(artifact.manifest_path), baseline, Path(data.eval_path)]
        runtimes = tuple(dict.fromkeys((artifact.runtime, "onnxruntime")))  # the artifact's, and the baseline's
        preflight(self.transport, self.profile, self.workdir, bytes_needed=sum(f.stat().st_size for f in files),
                  runtimes=runtimes)
        deployed = deploy(self.transport, self.workdir, run_id, library=files[0], manifest=files[1],
                          baseline_model=files[2], inputs=files[3], runtime=artifact.runtime)
        still_held(self._held, self.transport.name)
        return deployed

    def _samples(self, info: ModelInfo, data: PreparedData) -> tuple[list[str], Samples]:
        names = [s.name for s in info.inputs]
        return names, Samples.load(Path(data.eval_path), names)

    def benchmark(self, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData, *,
                  settings: BenchmarkSettings, local_dir: Path) -> BenchmarkReport:
        """The artifact and onnxruntime fp32 in turns, scored and compared (pipeline.benchmark), between two readings
        of the board's state (power mode, clocks, temperatures, throttling: targets.board_state)."""
        names, samples = self._samples(info, data)
        before = self.board_state()
        report = benchmark(self.transport, self.profile.connection.python_argv(), deployed, samples, input_order=names,
                           scoring=data.scoring, settings=settings, local_dir=local_dir,
                           output_names=[o.name for o in info.outputs], batch=info.batch)
        after = self.board_state()
        still_held(self._held, self.transport.name)  # else another run may have measured beside this one
        return with_board_state(report, before, after)

    def gpu_facts(self, *, tvm: bool) -> GpuFacts:
        """The board's GPU stack (targets.gpu_probe); with ``tvm``, whether its TVM reaches a CUDA device."""
        return probe_gpu(self.transport, self.profile, tvm=tvm)

    def board_state(self) -> BoardState:
        """Power mode, clocks, temperatures, throttling now (targets.board_state): unknown where the board can't
        say, never an error."""
        return read_board_state(self.transport, self.profile.connection.python_argv())

    def measure(self, deployed: DeployedArtifact, info: ModelInfo, data: PreparedData, *, which: str,
                settings: BenchmarkSettings, local_dir: Path) -> tuple[Measurement, np.ndarray]:
        """One runtime alone: the artifact (which="artifact") or onnxruntime fp32 (which="baseline")."""
        names, samples = self._samples(info, data)
        measured = measure(self.transport, self.profile.connection.python_argv(), deployed, samples, which=which,
                           input_order=names, scoring=data.scoring, settings=settings, local_dir=local_dir,
                           batch=info.batch)
        still_held(self._held, self.transport.name)
        return measured


def with_board_state(report: BenchmarkReport, before: BoardState, after: BoardState) -> BenchmarkReport:
    """The report with the board's state around it and what the two snapshots say about its numbers."""
    return report.model_copy(update={"board_before": before, "board_after": after, "board_marks": judge(before, after)})


@contextlib.contextmanager
def tuning_board(profile: DeviceProfile) -> Iterator[BoardRunner]:
    """TVM's RPC server on the board, reached through a forwarded port of a session with it, for MetaSchedule to
    time candidates there; stopped, and the session closed, on exit. What the orchestrator hands the compiler."""
    from pipeline.compiler.tuning.board import board_runner

    with DeviceSession(profile) as session, board_runner(session.transport, session.workdir, profile) as board:
        yield board
