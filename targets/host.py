"""Facts about the machine this process runs on (the `local` profile's source)."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostFacts:
    """Architecture, ISA features, cores and memory of this host."""

    arch: str
    cpu_model: str
    features: frozenset[str]
    cores: int
    memory_mb: int


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", "unknown", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def detect_host() -> HostFacts:
    """Read arch, ISA flags and memory from the OS (Linux /proc; degrades to platform elsewhere)."""
    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostFacts(
        arch=platform.machine(),
        cpu_model=model,
        features=flags,
        cores=cores,
        memory_mb=_memory_mb(),
    )


@dataclass(frozen=True)
class NvidiaGpu:
    """An NVIDIA GPU of this host, as nvidia-smi reports it."""

    name: str
    compute_capability: str
    memory_mb: int
    cuda_version: str  # the newest CUDA the driver supports


@functools.cache
def detect_nvidia_gpu() -> NvidiaGpu | None:
    """The first NVIDIA GPU nvidia-smi lists, or None (no nvidia-smi, no GPU, no driver: all the same here)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        listed = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
        banner = subprocess.run([smi], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = [f.strip() for f in (listed.stdout.splitlines() or [""])[0].split(",")]
    cuda = re.search(r"CUDA Version:\s*(\d+\.\d+)", banner)
    if listed.returncode != 0 or len(fields) < 3 or not re.fullmatch(r"\d+\.\d+", fields[1]) or not cuda:
        return None
    try:
        memory = int(float(fields[2]))
    except ValueError:
        memory = 0
    return NvidiaGpu(name=fields[0], compute_capability=fields[1], memory_mb=memory, cuda_version=cuda.group(1))


@dataclass(frozen=True)
class CudaTools:
    """The parts of a CUDA 12 toolkit that pip wheels bring (nvidia-cuda-nvcc-cu12: libdevice, ptxas; nvidia-nvfatbin-
    cu12: nvFatbin), found without importing anything. CUDA 12.9 is the last line that still targets sm_53."""

    root: Path

    @property
    def libdevice(self) -> Path:
        return self.root / "nvvm" / "libdevice" / "libdevice.10.bc"

    @property
    def ptxas(self) -> Path | None:
        path = self.root / "bin" / "ptxas"
        return path if path.is_file() and os.access(path, os.X_OK) else None

    @property
    def nvfatbin(self) -> Path | None:
        for folder in _package_folders("nvidia.nvfatbin"):
            for library in sorted((folder / "lib").glob("libnvfatbin.so*")):
                return library
        return None

    def describe(self) -> str:
        parts = ["libdevice"] + (["ptxas"] if self.ptxas else []) + (["nvFatbin"] if self.nvfatbin else [])
        return f"{' + '.join(parts)} from {self.root}"


def _package_folders(name: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def cuda_tools() -> CudaTools | None:
    """The pip wheels' CUDA 12 toolkit, or None when nvidia-cuda-nvcc-cu12 is not installed."""
    for folder in _package_folders("nvidia.cuda_nvcc"):
        if CudaTools(folder).libdevice.is_file():
            return CudaTools(folder)
    return None


@dataclass(frozen=True)
class Toolchain:
    """What this machine can build with: its arch, the C compilers on PATH, the CUDA tools for GPU code."""

    arch: str
    compilers: frozenset[str]
    cuda: CudaTools | None

    def has(self, compiler: str) -> bool:
        return compiler in self.compilers


CROSS_COMPILERS = ("gcc", "cc", "aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc")


def detect_toolchain() -> Toolchain:
    return Toolchain(
        arch=platform.machine(),
        compilers=frozenset(c for c in CROSS_COMPILERS if shutil.which(c)),
        cuda=cuda_tools(),
    )
