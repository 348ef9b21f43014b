"""Facts about the machine this process runs on (the `local` profile's source)."""

from __future__ import annotations

import os
import platform
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
