"""Before any upload: is the device what its profile says, and does it have what the run needs?"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import PreflightError
from targets.gpu_probe import GpuFacts, probe_gpu
from targets.profiles import HOW_TO_INSTALL, PROVIDERS, DeviceProfile
from targets.transport import Transport

# Runs on the device's Python (>= 3.6): finds the runtimes without importing them (import tvm takes
# ~25 s under emulation).
# Its argument, the workdir: whose it is and its mode (a workdir others can write is a library others can swap).
PROBE = (
    "import json, os, sys, platform, importlib.util as u; st = os.stat(sys.argv[1]); "
    "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
    "'numpy': u.find_spec('numpy') is not None, 'tvm': u.find_spec('tvm') is not None, "
    "'onnxruntime': u.find_spec('onnxruntime') is not None, "
    "'workdir_owned': st.st_uid == os.getuid(), 'workdir_mode': st.st_mode & 0o777}))"
)


class DeviceFacts(BaseModel):
    """What the device itself reports."""

    model_config = ConfigDict(frozen=True)
    machine: str
    python: str
    numpy: bool
    tvm: bool
    onnxruntime: bool
    free_bytes: int
    workdir: str
    workdir_owned: bool = True
    workdir_mode: int = 0o700


def gpu_refusal(facts: GpuFacts, profile: DeviceProfile, runtime: str, host: str) -> PreflightError | None:
    """Why ``runtime`` can't run on this board's GPU, or None: the board named, what is missing, how to install it."""
    if not facts.device_nodes:
        return PreflightError(
            f"{profile.name} ({host}) shows no CUDA device: {runtime} needs the board's NVIDIA GPU",
            value="no /dev/nvhost-gpu, /dev/nvhost-ctrl-gpu or /dev/nvidia*",
            fix="check that this is the board the profile describes and that its NVIDIA driver (JetPack's L4T) is "
                "installed; or use --runtime onnxruntime (its CPU)",
        )
    if runtime in PROVIDERS and PROVIDERS[runtime] not in (facts.providers or []):
        have = (f"onnxruntime {facts.onnxruntime} has {', '.join(facts.providers or [])}"
                if facts.providers is not None else "no onnxruntime")
        return PreflightError(f"{profile.name} ({host}) has no {PROVIDERS[runtime]} for {runtime}", value=have,
                              fix=HOW_TO_INSTALL[runtime])
    if runtime == "tvm" and not facts.tvm_cuda:
        return PreflightError(f"{profile.name} ({host}): TVM there reaches no CUDA device (tvm.cuda(0).exist is "
                              "False)", value=facts.tvm_error or "a TVM runtime built without CUDA",
                              fix=HOW_TO_INSTALL["tvm"])
    return None


def probe(transport: Transport, profile: DeviceProfile, workdir: str) -> DeviceFacts:
    """Ask the device's own Python what it is (under qemu, uname would report the host)."""
    transport.makedirs(workdir)
    result = transport.run([*profile.connection.python_argv(), "-c", PROBE, workdir], timeout=120)
    try:
        facts = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PreflightError(
            "The device's Python did not run", host=transport.name,
            value=" ".join(profile.connection.python_argv()), stderr=result.stderr.strip()[-400:] or "(empty)",
            fix="check connection.python in the profile",
        ) from None
    return DeviceFacts(**facts, free_bytes=transport.free_bytes(workdir), workdir=workdir)


def preflight(transport: Transport, profile: DeviceProfile, workdir: str, *, bytes_needed: int,
              runtimes: tuple[str, ...] = ("tvm", "onnxruntime")) -> DeviceFacts:
    """Refuse before upload when the device doesn't match the profile or lacks room or runtimes."""
    facts = probe(transport, profile, workdir)
    if facts.machine != profile.cpu.arch:
        raise PreflightError(
            f"The device is {facts.machine}, but profile {profile.name!r} says {profile.cpu.arch}",
            host=transport.name, fix="use the profile that matches this device",
        )
    if not facts.workdir_owned or facts.workdir_mode & 0o022:
        raise PreflightError(
            "Other users of the device can change what runs there: its workdir is "
            + ("not this user's" if not facts.workdir_owned else f"writable by them (mode {facts.workdir_mode:o})"),
            host=transport.name, directory=workdir,
            fix=f"chmod 700 {workdir} on the device (its owner), or point connection.workdir at a directory of "
                "this user's own")
    modules = sorted({"tvm" if name == "tvm" else "onnxruntime" for name in runtimes})
    missing = [name for name in ("numpy", *modules) if not getattr(facts, name)]
    if missing:
        raise PreflightError(
            f"The device's Python lacks {', '.join(missing)}", host=transport.name, python=facts.python,
            fix=f"install {' '.join(missing)} for the device's Python ({' '.join(profile.connection.python_argv())})",
        )
    on_gpu = [name for name in runtimes if profile.unit_of(name) == "gpu"]
    if on_gpu:
        gpu = probe_gpu(transport, profile, tvm="tvm" in on_gpu)
        for name in on_gpu:
            if refusal := gpu_refusal(gpu, profile, name, transport.name):
                raise refusal
    if facts.free_bytes < bytes_needed:
        raise PreflightError(
            "Not enough free disk on the device for the upload", host=transport.name, directory=workdir,
            bytes_needed=bytes_needed, bytes_free=facts.free_bytes,
            fix="free space on the device or point connection.workdir at a larger disk",
        )
    return facts
