"""Versions of the tools that shaped a result (recorded in manifests and results)."""

from __future__ import annotations

import platform
from importlib import metadata

TOOLS = ("edgedeploy", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "numpy", "prefect",
         "nvidia-cuda-nvcc-cu12", "nvidia-nvfatbin-cu12")  # the last two: libdevice, ptxas, nvFatbin for GPU code


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
