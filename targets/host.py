"""Facts about the machine this process runs on (the `local` profile's source)."""

from __future__ import annotations

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
class Toolchain:
    """What this machine can build with: its arch, the C compilers on PATH, the CUDA toolkit version."""

    arch: str
    compilers: frozenset[str]
    nvcc_version: str | None

    def has(self, compiler: str) -> bool:
        return compiler in self.compilers


CROSS_COMPILERS = ("gcc", "cc", "aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc")


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def detect_toolchain() -> Toolchain:
    return Toolchain(
        arch=platform.machine(),
        compilers=frozenset(c for c in CROSS_COMPILERS if shutil.which(c)),
        nvcc_version=_nvcc_version(),
    )
