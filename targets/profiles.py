"""Device profiles: YAML files in device_profiles/, validated by pydantic.

A profile says what a device can compute (its units, their ISA and native precisions), what
runs on it (OS, Python, runtimes), how to compile for it and how to reach it. A lab's own file
can reuse a base profile with ``extends: NAME`` plus overrides.
"""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgedeploy.errors import ProfileError
from targets.host import detect_host

PROFILES_DIR = Path(__file__).resolve().parents[1] / "device_profiles"

# Anything that may reach a remote shell: no spaces, quotes, $, ;, |, &, backticks or newlines.
SAFE_TOKEN = r"^[A-Za-z0-9_./~+@:=-]+$"
SAFE_NAME = r"^[a-z0-9][a-z0-9_.-]*$"

Precision = Literal["fp32", "fp16", "int8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuUnit(_Frozen):
    """The device's CPU, as the compiler and the checks see it."""

    arch: Literal["x86_64", "aarch64", "armv7l"] = Field(description="Machine architecture (uname -m).")
    triple: str = Field(pattern=SAFE_TOKEN, description="LLVM target triple, e.g. aarch64-linux-gnu.")
    mcpu: str | None = Field(
        default=None,
        pattern=SAFE_TOKEN,
        description="LLVM CPU name (cortex-a72, haswell, ...); null = this host's CPU as LLVM detects it.",
    )
    mattr: tuple[str, ...] = Field(default=(), description="Extra LLVM attributes, e.g. +neon.")
    features: tuple[str, ...] = Field(
        default=(), description="ISA features (avx2, fma, avx512_vnni, asimddp, ...)."
    )
    cores: int = Field(ge=1, description="Cores the model may use.")
    precisions: tuple[Precision, ...] = Field(description="Precisions the CPU computes natively.")
    int8_dot_product: bool = Field(description="Has an int8 dot-product instruction (VNNI, ARM dotprod).")
    llvm_opt_level: int | None = Field(
        default=None, ge=0, le=3, description="LLVM optimisation level for code generation (null = TVM's default, 3)."
    )


class GpuUnit(_Frozen):
    """A CUDA GPU on the device."""

    kind: Literal["cuda"] = Field(default="cuda", description="GPU programming model.")
    name: str = Field(description="Marketing name, for messages.")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$", description="CUDA compute capability, e.g. 5.3.")
    cuda_version: str = Field(pattern=r"^\d+\.\d+$", description="CUDA version on the device.")
    precisions: tuple[Precision, ...] = Field(description="Precisions the GPU computes natively.")


class Runtimes(_Frozen):
    """Runtimes present on the device (version strings; null = absent)."""

    tvm: str | None = Field(default=None, description="TVM runtime version on the device.")
    onnxruntime: str | None = Field(default=None, description="onnxruntime version on the device.")


class Connection(_Frozen):
    """How to reach the device. Every value that can reach a shell is validated here and quoted later."""

    transport: Literal["local", "ssh"] = Field(description="local = this machine; ssh = a board over SSH.")
    host: str | None = Field(default=None, pattern=SAFE_TOKEN, description="SSH host name or address.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")
    user: str | None = Field(default=None, pattern=SAFE_TOKEN, description="SSH user.")
    key_file: str | None = Field(default=None, pattern=SAFE_TOKEN, description="Private key file for SSH.")
    known_hosts: str | None = Field(
        default=None, pattern=SAFE_TOKEN, description="known_hosts file to verify host keys."
    )
    python: tuple[str, ...] | None = Field(
        default=None,
        description="argv that runs the device's Python; null on a local device = this interpreter.",
    )
    workdir: str = Field(pattern=SAFE_TOKEN, description="Directory on the device for artifacts and runs.")

    @field_validator("python")
    @classmethod
    def _python_is_safe(cls, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in argv or ():
            if not re.fullmatch(SAFE_TOKEN, item):
                raise ValueError(f"each part of connection.python must match {SAFE_TOKEN}; {item!r} does not")
        return argv

    def python_argv(self) -> list[str]:
        return list(self.python) if self.python else [sys.executable]


class DeviceProfile(_Frozen):
    """Everything the pipeline needs to know about one device."""

    name: str = Field(pattern=SAFE_NAME, description="Profile name, used in results and on the dashboard.")
    description: str = Field(default="", description="One line for people.")
    cpu: CpuUnit = Field(description="The CPU.")
    gpu: GpuUnit | None = Field(default=None, description="A CUDA GPU, if any.")
    run_on: Literal["cpu", "gpu"] = Field(default="cpu", description="Which unit runs the model.")
    memory_mb: int = Field(ge=1, description="Memory available to the model (shared with the GPU where it is).")
    os: str = Field(description="Operating system, e.g. 'Debian 12'.")
    python_version: str = Field(pattern=r"^3\.\d+$", description="Python on the device, e.g. 3.11.")
    runtimes: Runtimes = Field(default_factory=Runtimes, description="Runtimes on the device.")
    cross_compiler: str | None = Field(
        default=None, pattern=SAFE_TOKEN,
        description="C compiler that links libraries for this device (null = host cc).",
    )
    connection: Connection = Field(description="How to reach the device.")
    source: str | None = Field(default=None, description="File the profile was read from (filled in by the loader).")

    def tvm_target(self) -> dict[str, Any]:
        """TVM 0.27 target for the CPU, as a JSON dict (mcpu None = resolved by the compiler to the host CPU)."""
        target: dict[str, Any] = {"kind": "llvm", "mtriple": self.cpu.triple, "num-cores": self.cpu.cores}
        if self.cpu.mcpu:
            target["mcpu"] = self.cpu.mcpu
        if self.cpu.mattr:
            target["mattr"] = list(self.cpu.mattr)
        if self.cpu.llvm_opt_level is not None:
            target["opt-level"] = self.cpu.llvm_opt_level
        return target

    def tvm_gpu_target(self) -> dict[str, Any] | None:
        """TVM target for the GPU when the model runs there (its host is the CPU target), else None."""
        if self.run_on != "gpu" or self.gpu is None:
            return None
        return {"kind": "cuda", "arch": "sm_" + self.gpu.compute_capability.replace(".", "")}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"Cannot read profile file {path}", value=exc.strerror) from exc
    except yaml.YAMLError as exc:
        raise ProfileError(
            f"Profile file {path} is not valid YAML", value=str(exc).splitlines()[0],
            fix="fix the YAML syntax at the position given",
        ) from exc
    if not isinstance(data, dict):
        raise ProfileError(f"Profile file {path} must hold a mapping", value=type(data).__name__)
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ProfileError(f"Profile file {candidate} does not exist", value=name_or_path)
        return candidate.resolve()
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"Unknown device profile {name_or_path!r}",
            value=name_or_path,
            expected=f"one of {', '.join(available_profiles())}, or a path to a .yaml profile file",
            fix="run `deploy profiles list`",
        )
    return path


def _raw_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ProfileError(f"Profile {path} extends itself", value=" -> ".join(map(str, seen + (path,))))
    data = _read_yaml(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ProfileError(f"In {path}: field 'extends' must be a profile name", value=base_name)
    base_path = _resolve_path(base_name) if "/" in base_name else PROFILES_DIR / f"{base_name}.yaml"
    if not base_path.is_file():
        raise ProfileError(f"In {path}: base profile {base_name!r} does not exist", value=base_name,
                           expected=f"one of {', '.join(available_profiles())}")
    base = _raw_profile(base_path, seen + (path,))
    base.pop("name", None)
    return _merge(base, data)


def _detected_fields() -> dict[str, Any]:
    """Fill a `detect: true` profile from this host."""
    host = detect_host()
    features = sorted(host.features & {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni",
                                       "asimd", "asimddp", "fphp", "asimdhp", "neon"})
    vnni = bool(host.features & {"avx512_vnni", "avx_vnni", "asimddp"})
    fp16 = bool(host.features & {"fphp", "asimdhp", "avx512_fp16"})
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(host.arch, f"{host.arch}-linux-gnu")
    return {
        "cpu": {
            "arch": host.arch,
            "triple": triple,
            "mcpu": None,
            "features": features,
            "cores": host.cores,
            "precisions": ["fp32", "int8"] + (["fp16"] if fp16 else []),
            "int8_dot_product": vnni,
        },
        "memory_mb": host.memory_mb,
        "os": platform.platform(terse=True),
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "description": f"This machine: {host.cpu_model}, {host.cores} cores, {host.memory_mb} MB",
    }


def _explain(path: Path, exc: ValidationError) -> ProfileError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    hint = "remove the field, or check its spelling" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return ProfileError(
        f"Invalid device profile {path}: field '{field}'{more}",
        value=repr(first.get("input")),
        expected=first["msg"],
        fix=hint,
    )


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a profile by name (device_profiles/NAME.yaml) or from a YAML file, resolving `extends`."""
    path = _resolve_path(name_or_path)
    raw = _raw_profile(path)
    if raw.pop("detect", False):
        raw = _merge(_detected_fields(), raw)
    raw["source"] = str(path)
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise _explain(path, exc) from exc
