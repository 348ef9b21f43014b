"""Stage 6 of 8, deploy: put files on the device so that a half-written file can never be used.

The protocol (Ansible's copy module is the model): check free space, upload under a temporary
name in the destination directory, compute sha256 ON THE DEVICE and compare, atomically rename
into place; the temporary file is removed whatever happens. A file already there with the
right hash is not sent again.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import ChecksumMismatch, EdgeDeployError, TransportError
from targets.hashing import sha256_file
from targets.transport import CommandResult, Transport

RUNNER_SOURCE = Path(__file__).resolve().parents[1] / "targets" / "device_runner.py"
TEMPORARY_PREFIX = ".edgedeploy-"  # every upload's temporary name starts so: sweep() finds what cuts left behind
RUN_DAYS = 7  # run directories on the device (inputs, outputs) older than this are removed


class Placement(BaseModel):
    """One file placed on the device."""

    model_config = ConfigDict(frozen=True)
    remote_path: str
    sha256: str
    size_bytes: int
    uploaded: bool  # False when the device already had it


def place_file(transport: Transport, local: Path, remote_path: str, *, sha256: str | None = None) -> Placement:
    """Upload ``local`` to ``remote_path`` atomically and verified; skip when already there."""
    sha256 = sha256 or sha256_file(local)
    size = local.stat().st_size
    directory, name = posixpath.split(remote_path)
    transport.makedirs(directory)
    if transport.sha256(remote_path) == sha256:
        return Placement(remote_path=remote_path, sha256=sha256, size_bytes=size, uploaded=False)
    free = transport.free_bytes(directory)
    if free < size:
        raise TransportError(
            "Not enough free disk on the device for the upload",
            host=transport.name, directory=directory, bytes_needed=size, bytes_free=free,
            fix="free space on the device or point connection.workdir at a larger disk",
        )
    temporary = posixpath.join(directory, f"{TEMPORARY_PREFIX}{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        transport.write(local, temporary)
        actual = transport.sha256(temporary)
        if actual != sha256:
            raise ChecksumMismatch(
                "The file on the device differs from the one sent; nothing was swapped in",
                host=transport.name, path=remote_path, expected_sha256=sha256, actual_sha256=actual,
            )
        transport.rename(temporary, remote_path)
    except BaseException:
        # Best effort: a board that is gone can't take the removal, and its error must not replace the one that
        # says what happened (host, path). What stays behind, sweep() removes on a later deploy.
        with contextlib.suppress(Exception):
            transport.remove(temporary)
        raise
    return Placement(remote_path=remote_path, sha256=sha256, size_bytes=size, uploaded=True)


def sweep(transport: Transport, workdir: str) -> CommandResult:
    """Remove what interrupted deploys and old runs left on the device: temporaries of uploads older than an hour
    (a live upload is younger), run directories older than RUN_DAYS days. Never fails a deploy."""
    script = ('find "$1" -name "$2*.tmp-*" -type f -mmin +60 -delete 2>/dev/null; '
              'if [ -d "$1/runs" ]; then find "$1/runs" -mindepth 1 -maxdepth 1 -type d -mtime +"$3" '
              '-exec rm -rf -- {} + 2>/dev/null; fi; exit 0')
    try:
        return transport.run(["sh", "-c", script, "edgedeploy-sweep", workdir, TEMPORARY_PREFIX, str(RUN_DAYS)],
                             timeout=120)
    except EdgeDeployError as error:
        return CommandResult(("sweep",), 1, "", error.what)


class DeployedArtifact(BaseModel):
    """Where everything the benchmark needs lies on the device."""

    model_config = ConfigDict(frozen=True)
    device: str
    runtime: str = "tvm"  # what loads `library` on the device: tvm, or onnxruntime for an .onnx artifact
    runner: Placement
    library: Placement
    manifest: Placement
    baseline_model: Placement
    inputs: Placement
    run_dir: str


def deploy(
    transport: Transport, workdir: str, run_id: str, *, library: Path, manifest: Path,
    baseline_model: Path, inputs: Path, runtime: str = "tvm",
) -> DeployedArtifact:
    """Place runner, library + manifest, the fp32 baseline model and the inputs on the device.

    Content-addressed directories make re-deploying the same artifact a no-op.
    """
    sweep(transport, workdir)
    lib_sha = sha256_file(library)
    model_sha = sha256_file(baseline_model)
    artifact_dir = posixpath.join(workdir, "artifacts", lib_sha[:16])
    run_dir = posixpath.join(workdir, "runs", run_id)
    # The library goes first and the manifest last: a manifest on the device means a complete artifact.
    placed_library = place_file(transport, library, posixpath.join(artifact_dir, library.name), sha256=lib_sha)
    placed_manifest = place_file(transport, manifest, posixpath.join(artifact_dir, "manifest.json"))
    return DeployedArtifact(
        device=transport.name, runtime=runtime,
        runner=place_file(transport, RUNNER_SOURCE, posixpath.join(workdir, "bin", "device_runner.py")),
        library=placed_library,
        manifest=placed_manifest,
        baseline_model=place_file(
            transport, baseline_model, posixpath.join(workdir, "models", model_sha[:16], "model.onnx"), sha256=model_sha
        ),
        inputs=place_file(transport, inputs, posixpath.join(run_dir, "inputs.npz")),
        run_dir=run_dir,
    )
