"""The device runner's protocol, from this side: the command line that starts ``targets/device_runner.py`` on a
device, and the one JSON line it answers with. The runner itself is the standard library + numpy + the runtime
(Python 3.6 compatible); this module is all the controller assumes about it."""

from __future__ import annotations

import json
from typing import Any

from edgedeploy.errors import BenchmarkError, ChecksumMismatch
from targets.transport import CommandResult


def runner_argv(python: list[str], runner: str, *, runtime: str, artifact: str, inputs: str, input_order: list[str],
                outputs: str, warmup: int, min_iterations: int, min_seconds: float, max_seconds: float, threads: int,
                kernel_runs: int, batch: int = 1, manifest: str | None = None,
                sha256: str | None = None) -> list[str]:
    """The device's ``python`` running the ``runner`` script on ``artifact``, checked against the ``sha256`` this side
    uploaded (and its ``manifest``, for a library, which must name the same)."""
    argv = [*python, runner, "--runtime", runtime, "--inputs", inputs, "--input-order", ",".join(input_order),
            "--outputs", outputs, "--warmup", str(warmup), "--min-iterations", str(min_iterations),
            "--min-seconds", str(min_seconds), "--max-seconds", str(max_seconds), "--threads", str(threads),
            "--kernel-runs", str(kernel_runs), "--batch", str(batch), "--artifact", artifact]
    return argv + (["--manifest", manifest] if manifest else []) + ["--sha256", sha256 or ""]


def parse_report(result: CommandResult, *, runtime: str, host: str,
                 expected_sha256: str | None = None) -> dict[str, Any]:
    """The runner's report: its last JSON line. A runner that answered nothing, refused a tampered artifact, failed,
    or measured another artifact than ``expected_sha256`` is one clear error each."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchmarkError(
            f"The device runner ({runtime}) on {host} returned no result",
            value=f"exit code {result.returncode}", stderr=result.stderr.strip()[-800:] or "(empty)",
        ) from None
    if report.get("ok") and expected_sha256 and report.get("artifact_sha256") != expected_sha256:
        raise ChecksumMismatch("The device runner reports another artifact than the one uploaded", host=host,
                               expected_sha256=expected_sha256, actual_sha256=report.get("artifact_sha256"))
    if not report.get("ok"):
        if report.get("error") == "tampered":
            raise ChecksumMismatch(
                "The artifact on the device is not the one uploaded; the runner refused to load it",
                host=host, path=report.get("path"),
                expected_sha256=report.get("expected"), actual_sha256=report.get("actual"),
            )
        if report.get("error") == "missing":  # the board lacks a provider or a CUDA device: no stderr noise
            raise BenchmarkError(f"{host} can't run {runtime}: it lacks what the artifact needs",
                                 value=report.get("message"), fix=report.get("fix"))
        raise BenchmarkError(f"The device runner ({runtime}) failed on {host}",
                             value=report.get("message"), stderr=result.stderr.strip()[-800:])
    return report
