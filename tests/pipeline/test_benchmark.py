"""The benchmark stage on this machine as the device: the artifact and the baseline timed in turns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.benchmark import KERNEL_RUNS, BenchmarkSettings, benchmark
from pipeline.compile import build
from pipeline.config import RunConfig
from pipeline.deploy import deploy
from pipeline.quantize import QuantConfig
from pipeline.scoring import CLASSIFIER
from pipeline.workloads import WORKLOADS
from targets.connect import open_transport
from targets.profiles import load_profile

DIGITS = str(WORKLOADS["digits-cnn"].model_path())


class Recording:
    """The local transport, noting every runner it starts."""

    def __init__(self, transport):
        self.transport, self.started = transport, []

    def run(self, argv, **kwargs):
        if any(arg.endswith("device_runner.py") for arg in argv):
            self.started.append(argv)
        return self.transport.run(argv, **kwargs)

    def __getattr__(self, name):
        return getattr(self.transport, name)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_artifact_and_baseline_take_turns_and_share_the_minimums(tmp_path):
    profile = load_profile("local")
    settings = BenchmarkSettings(warmup=1, min_iterations=12, min_seconds=0.3, rounds=3)
    config = RunConfig(model_path=DIGITS, profile="local", quant=QuantConfig(scheme="fp32"), bench=settings)
    built = build(config, profile, tmp_path / "build")
    samples = WORKLOADS["digits-cnn"].evaluation(5)
    samples.save(tmp_path / "eval.npz")
    transport, workdir = open_transport(profile)
    recording = Recording(transport)
    try:
        deployed = deploy(transport, workdir, "rounds-test", library=Path(built.artifact.library_path),
                          manifest=Path(built.artifact.manifest_path), baseline_model=Path(DIGITS),
                          inputs=tmp_path / "eval.npz")
        report = benchmark(recording, profile.connection.python_argv(), deployed, samples, input_order=["image"],
                           scoring=CLASSIFIER, settings=settings, local_dir=tmp_path)
    finally:
        transport.close()
    # A B, B A, A B: a drift in the device's speed lands on both runtimes alike.
    assert [_option(argv, "--runtime") for argv in recording.started] == [
        "tvm", "onnxruntime", "onnxruntime", "tvm", "tvm", "onnxruntime"]
    # Each round a third of the iterations and seconds; the kernels are profiled once, after the last TVM round.
    assert {_option(argv, "--min-iterations") for argv in recording.started} == {"4"}
    assert [float(_option(argv, "--min-seconds")) for argv in recording.started] == [pytest.approx(0.1)] * 6
    assert [_option(argv, "--kernel-runs") for argv in recording.started] == ["0"] * 4 + [str(KERNEL_RUNS), "0"]
    for measured in (report.artifact, report.baseline):
        assert measured.rounds == 3 and measured.valid
        assert measured.latency_ms.n == len(measured.samples_ms) >= 3 * max(4, len(samples.inputs["image"]))
        assert measured.timed_seconds >= 0.3
    assert report.artifact.kernels and report.artifact.kernel_runs == KERNEL_RUNS and not report.baseline.kernels
    # The outputs scored are the first round's; every sample ran in it.
    with np.load(tmp_path / "outputs.artifact.npz") as npz:
        assert len(npz["outputs"]) == len(samples.inputs["image"])
    assert report.agreement.top1 == 1.0
