"""`deploy run` over real SSH: to the lab's x86 server and to the emulated Raspberry Pi 4 (aarch64
Python under qemu), with the faults that only show end to end."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgedeploy.errors import AuthError, ChecksumMismatch, ConnectFailed, PreflightError
from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings, benchmark
from pipeline.compile import build
from pipeline.config import RunConfig
from pipeline.deploy import deploy, place_file
from pipeline.preflight import preflight
from pipeline.quantize import QuantConfig
from pipeline.scoring import CLASSIFIER
from pipeline.workloads import WORKLOADS
from pipeline.workloads.base import Samples
from targets.connect import open_transport
from targets.hashing import sha256_file
from targets.profiles import load_profile
from tests.lab import free_port, keygen, x86_python

pytestmark = pytest.mark.slow

DIGITS = str(WORKLOADS["digits-cnn"].model_path())
# One round: the emulated board starts Python and imports TVM in ~25 s, and these tests check results, not ratios.
QUICK = BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.2, rounds=1)


def _config(profile: Path, scheme: str = "fp32", **extra) -> RunConfig:
    return RunConfig(model_path=DIGITS, profile=str(profile), quant=QuantConfig(scheme=scheme), bench=QUICK, **extra)


def test_run_over_ssh_to_the_x86_server(prefect_server, lab_x86):
    profile = lab_x86.profile(extends="x86-server", python=x86_python())
    first = deploy_run(_config(profile, "int8"))
    assert first.valid and first.profile == "lab-x86"
    assert first.benchmark["artifact"]["device_machine"] == "x86_64"
    assert first.accuracy.value > 0.95 and first.agreement.top1 > 0.97
    # An AVX2 server: int8 kernels laid out for vpmaddubsw, with the 7-bit weights that keep it exact.
    assert first.artifact.dot_ops == {"vpmaddubsw (256-bit)": first.artifact.integer_ops} and "reduce-range" in \
        first.scheme
    assert first.deployment["device"] == f"{lab_x86.user}@127.0.0.1:{lab_x86.port}"
    assert "inputs" in first.deployment["uploaded"]
    # The same artifact again: nothing but the new run's inputs crosses the network.
    again = deploy_run(_config(profile, "int8"))
    assert again.artifact.sha256 == first.artifact.sha256
    assert again.deployment["uploaded"] == ["inputs"]
    assert set(again.deployment["already_there"]) == {"library", "manifest", "runner", "baseline_model"}


def test_run_on_the_emulated_pi4_matches_the_x86_reference(prefect_server, lab_pi4):
    device, python = lab_pi4
    profile = device.profile(extends="raspberry-pi-4", python=python,
                             runtimes={"tvm": "0.27.0", "onnxruntime": "1.27.0"})
    result = deploy_run(_config(profile, "fp32", eval_samples=40))
    assert result.valid, result.invalid_reasons
    assert result.benchmark["artifact"]["device_machine"] == "aarch64"
    assert result.artifact.target["mcpu"] == "cortex-a72"
    # The cross-compiled library, run on the (emulated) board, against onnxruntime fp32 on this x86 host.
    run_dir = Path(result.result_path).parent
    with np.load(run_dir / "outputs.artifact.npz") as npz:
        on_board = npz["outputs"]
    inputs = Samples.load(run_dir / "eval.npz", ["image"]).inputs["image"]
    session = ort.InferenceSession(DIGITS, providers=["CPUExecutionProvider"])
    on_x86 = np.concatenate([session.run(None, {"image": x[None]})[0] for x in inputs])
    np.testing.assert_allclose(on_board, on_x86, rtol=1e-4, atol=1e-4)
    assert result.accuracy.value == result.accuracy.baseline


def test_tampered_library_is_refused_before_loading(lab_x86, tmp_path):
    profile = load_profile(str(lab_x86.profile(extends="x86-server", python=x86_python())))
    built = build(_config(Path(profile.source)), profile, tmp_path / "build")
    samples = WORKLOADS["digits-cnn"].evaluation(5)
    samples.save(tmp_path / "eval.npz")
    transport, workdir = open_transport(profile)
    try:
        deployed = deploy(transport, workdir, "tamper-test", library=Path(built.artifact.library_path),
                          manifest=Path(built.artifact.manifest_path), baseline_model=Path(DIGITS),
                          inputs=tmp_path / "eval.npz")
        with open(deployed.library.remote_path, "ab") as fh:  # someone edits the library on the device
            fh.write(b"\0")
        with pytest.raises(ChecksumMismatch, match="refused to load") as info:
            benchmark(transport, profile.connection.python_argv(), deployed, samples, input_order=["image"],
                      scoring=CLASSIFIER, settings=QUICK, local_dir=tmp_path)
        assert info.value.context["expected_sha256"] == built.artifact.sha256
        # A board user who rewrites the manifest beside it to match (it is just as writable): the runner checks
        # what this side uploaded, not what the device says.
        manifest = json.loads(Path(deployed.manifest.remote_path).read_text())
        manifest["artifact"]["sha256"] = sha256_file(Path(deployed.library.remote_path))
        Path(deployed.manifest.remote_path).write_text(json.dumps(manifest))
        with pytest.raises(ChecksumMismatch, match="refused to load"):
            benchmark(transport, profile.connection.python_argv(), deployed, samples, input_order=["image"],
                      scoring=CLASSIFIER, settings=QUICK, local_dir=tmp_path)
    finally:
        transport.close()


def test_uploads_are_private_and_a_workdir_others_can_write_is_refused(lab_x86, tmp_path):
    """Uploaded files are the device user's alone (0600), new directories 0700; a workdir group- or world-writable
    is refused before anything is uploaded (anyone there could swap the library)."""
    profile = load_profile(str(lab_x86.profile(extends="x86-server", python=x86_python())))
    transport, workdir = open_transport(profile)
    try:
        placed = place_file(transport, Path(DIGITS), f"{workdir}/models/x/model.onnx")
        assert os.stat(placed.remote_path).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(placed.remote_path)).st_mode & 0o777 == 0o700
        os.chmod(workdir, 0o777)
        with pytest.raises(PreflightError, match="writable by them") as refused:
            preflight(transport, profile, workdir, bytes_needed=1)
        assert f"chmod 700 {workdir}" in refused.value.fix
    finally:
        os.chmod(workdir, 0o700)
        transport.close()


def _attempts(flow_run_id, task: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
            (run,) = [r for r in runs if r.name.startswith(task)]
            states = await client.read_task_run_states(run.id)
            return sum(1 for s in states if s.type.value == "RUNNING")

    return asyncio.run(fetch())


def _failed_flow_run_id(config: RunConfig):
    state = deploy_run(config, return_state=True)
    assert state.is_failed()
    return state.state_details.flow_run_id, state


def test_transient_errors_are_retried_and_auth_errors_are_not(prefect_server, lab_x86, tmp_path):
    closed = tmp_path / "closed.yaml"
    closed.write_text(lab_x86.profile(extends="x86-server", python=x86_python()).read_text()
                      .replace(f"port: {lab_x86.port}", f"port: {free_port()}"))
    flow_run_id, state = _failed_flow_run_id(_config(closed))
    with pytest.raises(ConnectFailed):
        state.result()
    assert _attempts(flow_run_id, "deploy") == 3  # one try + two retries

    keygen(tmp_path / "stranger")
    wrong_key = tmp_path / "wrong-key.yaml"
    wrong_key.write_text(lab_x86.profile(extends="x86-server", python=x86_python()).read_text()
                         .replace(str(lab_x86.key_file), str(tmp_path / "stranger")))
    flow_run_id, state = _failed_flow_run_id(_config(wrong_key))
    with pytest.raises(AuthError):
        state.result()
    assert _attempts(flow_run_id, "deploy") == 1


def test_a_tuned_int8_build_for_arm_is_dot_code_timed_and_checked_on_the_emulated_board(prefect_server, lab_pi4):
    """ARM int8 end to end: the Raspberry Pi 4 profile's int8 convs and Gemm are laid out for NEON's smull + saddlp
    (its A72 has no dotprod) on 4 x 4 tiles; MetaSchedule tunes them with every candidate timed by TVM's RPC server
    on the board (over the SSH connection; the emulated board's Python starts the server's worker under qemu too),
    the library holds those instructions and no sdot (an A72 stops on it), and its top-1 on the board is onnxruntime
    fp32's within the budget. The Pi 5's sdot kernels take the same path: their candidates are built and run on the
    emulated board in test_tvm_sdot (a second tuned run here cost the suite ~95 s under qemu)."""
    import subprocess

    device, python = lab_pi4
    profile = device.profile(extends="raspberry-pi-4", python=python,
                             runtimes={"tvm": "0.27.0", "onnxruntime": "1.27.0"})
    # The tuned library ships unmeasured against the untuned one: four more runs under qemu cost ~50 s, and that
    # check is the local profile's test (test_run_flow).
    result = deploy_run(_config(profile, "int8", tune_trials=2, tuning_check=False))
    assert result.valid, result.invalid_reasons
    assert result.artifact.target["mcpu"] == "cortex-a72"
    assert result.artifact.integer_ops == 3 and result.artifact.dot_ops == {"smull+saddlp": 3}  # 3x3 convs, the Gemm
    tuning = result.artifact.tuning
    assert tuning["measured_on"] == f"{device.user}@127.0.0.1:{device.port}" and tuning["scheduled"] > 0
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", result.artifact.path], capture_output=True,
                                 text=True, check=True).stdout
    assert "\tsaddlp\t" in disassembly and "\tsdot\t" not in disassembly
    assert result.accuracy.delta >= -0.01
