"""`deploy doctor`: what a session with the device finds, each check reported, none raised. Kept light (no onnx,
onnxruntime or TVM): it is all the command imports."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from edgedeploy.errors import EdgeDeployError, HostKeyError
from pipeline.preflight import gpu_refusal, probe
from targets.connect import open_transport
from targets.gpu_probe import probe_gpu
from targets.profiles import RUNTIME_NAMES, DeviceProfile
from targets.transport import Transport


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
            wanted = runtime == "numpy" or profile.has_runtime(runtime)
            present = getattr(facts, runtime)
            rows.append(DoctorRow(check=runtime, ok=present or not wanted,
                                  detail=("installed" if present else "missing") +
                                  ("" if wanted else " (the profile doesn't expect it)")))
        rows += _gpu_rows(transport, profile)
        rows.append(DoctorRow(check="free disk", ok=facts.free_bytes > 100 * 2**20,
                              detail=f"{facts.free_bytes / 2**30:.1f} GiB free in {workdir}"))
    except EdgeDeployError as exc:
        rows.append(DoctorRow(check="device", ok=False, detail=exc.render()))
    finally:
        transport.close()
    return rows


def _gpu_rows(transport: Transport, profile: DeviceProfile) -> list[DoctorRow]:
    """For a profile whose runtimes use a GPU: what the board's GPU stack is, and each such runtime's readiness."""
    on_gpu = [name for name in RUNTIME_NAMES if profile.unit_of(name) == "gpu" and profile.has_runtime(name)]
    if not on_gpu:
        return []
    gpu = probe_gpu(transport, profile, tvm="tvm" in on_gpu)
    rows = [DoctorRow(check="GPU", ok=bool(gpu.device_nodes),
                      detail=", ".join(filter(None, [gpu.jetson, gpu.l4t, " ".join(gpu.device_nodes)]))
                      or "no CUDA device nodes (/dev/nvhost-gpu, /dev/nvidia*)"),
            DoctorRow(check="TensorRT", ok=bool(gpu.tensorrt) or "onnxruntime-tensorrt" not in on_gpu,
                      detail=f"libnvinfer {gpu.tensorrt}" if gpu.tensorrt else "libnvinfer not found")]
    for name in on_gpu:
        refusal = gpu_refusal(gpu, profile, name, transport.name)
        rows.append(DoctorRow(check=name, ok=refusal is None,
                              detail=refusal.render() if refusal else "ready on the GPU"))
    return rows
