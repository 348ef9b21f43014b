"""Before any upload: is the device what its profile says, and does it have what the run needs?"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import PreflightError
from targets.profiles import DeviceProfile
from targets.transport import Transport

# Runs on the device's Python (>= 3.6): finds the runtimes without importing them (import tvm takes
# ~25 s under emulation).
PROBE = (
    "import json, platform, importlib.util as u; "
    "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
    "'numpy': u.find_spec('numpy') is not None, 'tvm': u.find_spec('tvm') is not None, "
    "'onnxruntime': u.find_spec('onnxruntime') is not None}))"
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


def probe(transport: Transport, profile: DeviceProfile, workdir: str) -> DeviceFacts:
    """Ask the device's own Python what it is (under qemu, uname would report the host)."""
    result = transport.run([*profile.connection.python_argv(), "-c", PROBE], timeout=120)
    try:
        facts = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PreflightError(
            "The device's Python did not run", host=transport.name,
            value=" ".join(profile.connection.python_argv()), stderr=result.stderr.strip()[-400:] or "(empty)",
            fix="check connection.python in the profile",
        ) from None
    transport.makedirs(workdir)
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
    missing = [name for name in ("numpy", *runtimes) if not getattr(facts, name)]
    if missing:
        raise PreflightError(
            f"The device's Python lacks {', '.join(missing)}", host=transport.name, python=facts.python,
            fix=f"install {' '.join(missing)} for the device's Python ({' '.join(profile.connection.python_argv())})",
        )
    if facts.free_bytes < bytes_needed:
        raise PreflightError(
            "Not enough free disk on the device for the upload", host=transport.name, directory=workdir,
            bytes_needed=bytes_needed, bytes_free=facts.free_bytes,
            fix="free space on the device or point connection.workdir at a larger disk",
        )
    return facts
