"""What a board's GPU stack really is, asked of the board's own Python: does the OS see an NVIDIA GPU, which execution
providers does its onnxruntime have, which TensorRT is installed, and can its TVM reach the GPU.

Asked only when a run needs the GPU (it imports onnxruntime, and TVM when TVM is to run there: seconds on a board,
half a minute under emulation). Python 3.6 grammar and standard library only (JetPack 4.x), each source in its own
``try``: a missing one is null, never an error of the probe.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import PreflightError
from targets.profiles import DeviceProfile
from targets.transport import Transport

GPU_PROBE = r'''
import glob, json, os, sys
nodes = glob.glob("/dev/nvhost-gpu") + glob.glob("/dev/nvhost-ctrl-gpu") + glob.glob("/dev/nvidia[0-9]*")
out = {"device_nodes": sorted(nodes), "providers": None, "onnxruntime": None, "tensorrt": None, "tvm_cuda": None,
       "jetson": None, "l4t": None}
try:
    with open("/proc/device-tree/model") as fh:
        out["jetson"] = fh.read().strip("\x00 \n")[:80]
except (OSError, UnicodeDecodeError):
    pass
try:
    with open("/etc/nv_tegra_release") as fh:
        out["l4t"] = fh.readline().strip()[:80]
except (OSError, UnicodeDecodeError):
    pass
libs = glob.glob("/usr/lib/*-linux-gnu/libnvinfer.so.*.*") + glob.glob("/usr/lib64/libnvinfer.so.*.*")
versions = [os.path.basename(p)[len("libnvinfer.so."):] for p in libs]
numeric = lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")]
out["tensorrt"] = max(versions, key=numeric) if versions else None
try:
    import onnxruntime
    out["onnxruntime"], out["providers"] = onnxruntime.__version__, onnxruntime.get_available_providers()
except Exception as exc:
    out["providers_error"] = "{}: {}".format(type(exc).__name__, exc)[:200]
if "tvm" in sys.argv[1:]:
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    try:
        import ctypes, tvm
        side = glob.glob(os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib", "libtvm_runtime_cuda.so*"))
        if side and not tvm.cuda(0).exist:  # runtime-only TVM never loads its CUDA runtime by itself
            ctypes.CDLL(side[0], mode=ctypes.RTLD_GLOBAL)
        out["tvm_cuda"] = bool(tvm.cuda(0).exist)
    except Exception as exc:
        out["tvm_cuda"] = False
        out["tvm_error"] = "{}: {}".format(type(exc).__name__, exc)[:200]
print(json.dumps(out))
'''


class GpuFacts(BaseModel):
    """The board's GPU stack, as its own Python sees it."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    device_nodes: list[str] = Field(description="/dev/nvhost-gpu (Jetson) or /dev/nvidiaN: the OS sees a GPU.")
    providers: list[str] | None = Field(description="onnxruntime's execution providers; None = no onnxruntime.")
    onnxruntime: str | None = Field(default=None, description="onnxruntime's version.")
    tensorrt: str | None = Field(default=None, description="TensorRT's version, from libnvinfer's file name.")
    tvm_cuda: bool | None = Field(default=None, description="tvm.cuda(0).exist; None = not asked.")
    jetson: str | None = Field(default=None, description="/proc/device-tree/model (a Jetson names itself there).")
    l4t: str | None = Field(default=None, description="/etc/nv_tegra_release's first line: the L4T release.")
    providers_error: str | None = Field(default=None, description="Why onnxruntime did not import.")
    tvm_error: str | None = Field(default=None, description="Why TVM did not import or reach CUDA.")


def probe_gpu(transport: Transport, profile: DeviceProfile, *, tvm: bool) -> GpuFacts:
    """The board's GPU stack; with ``tvm``, also whether its TVM reaches a CUDA device (runtime library only)."""
    result = transport.run([*profile.connection.python_argv(), "-c", GPU_PROBE, *(["tvm"] if tvm else [])],
                           timeout=300)
    try:
        return GpuFacts(**json.loads(result.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        raise PreflightError("The device's Python did not report its GPU stack", host=transport.name,
                             value=f"exit code {result.returncode}",
                             stderr=result.stderr.strip()[-400:] or "(empty)") from None
