"""Device profiles: YAML files in device_profiles/, validated by pydantic.

A profile says what a device can compute (its units, their ISA and native precisions), what
runs on it (OS, Python, runtimes), how to compile for it and how to reach it. A lab's own file
can reuse a base profile with ``extends: NAME`` plus overrides.
"""

from __future__ import annotations

import functools
import platform
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgedeploy.errors import ProfileError
from targets.host import detect_host, detect_nvidia_gpu

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
    int8_dot_product: bool | None = Field(default=None, description="Has DP4A int8 dot products (compute "
                                          "capability 6.1+); null = derived from the compute capability.")
    cubin: bool = Field(default=True, description="Ship the SM's cubin (ptxas 12.9) beside the PTX; false = PTX "
                        "only, JIT-compiled by the board's driver (for a driver that refuses newer cubins).")

    @property
    def sm(self) -> str:
        """The SM name compilers use: sm_53 for compute capability 5.3."""
        return "sm_" + self.compute_capability.replace(".", "")

    @property
    def has_dp4a(self) -> bool:
        if self.int8_dot_product is not None:
            return self.int8_dot_product
        major, minor = (int(x) for x in self.compute_capability.split("."))
        return (major, minor) >= (6, 1)


RuntimeName = Literal["tvm", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"]
Unit = Literal["cpu", "gpu"]
RUNTIME_NAMES: tuple[RuntimeName, ...] = ("tvm", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt")
# onnxruntime's execution provider decides its unit; TVM runs where the profile compiles it for.
FIXED_UNITS: dict[str, Unit] = {"onnxruntime": "cpu", "onnxruntime-cuda": "gpu", "onnxruntime-tensorrt": "gpu"}
# onnxruntime's GPU runtimes, by the execution provider each is (targets/device_runner.py keeps its own copy: it runs
# on the board, alone; a test keeps the two equal).
PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
GPU_RUNTIMES = tuple(PROVIDERS)
# What to do when a board lacks a runtime (the checks, the preflight and deploy doctor say it).
TVM_MIN_PYTHON = (3, 10)  # apache-tvm 0.27's Requires-Python
HOW_TO_INSTALL = {
    "tvm": "pip install apache-tvm on the board (Python >= 3.10; a Jetson Nano's JetPack 4.6 has 3.6: a newer Python "
           "beside it, set in connection.python), or build TVM's runtime there (USE_CUDA=ON for its GPU), then set "
           "runtimes.tvm in the profile",
    "onnxruntime": "pip install onnxruntime on the board, then set runtimes.onnxruntime in the profile",
    "onnxruntime-cuda": "install onnxruntime-gpu on the board (a Jetson: the wheel for its JetPack from the Jetson "
                        "Zoo / Jetson AI Lab), then set runtimes.onnxruntime-cuda in the profile",
    "onnxruntime-tensorrt": "install onnxruntime-gpu built with TensorRT (the Jetson wheels are) and TensorRT "
                            "(part of JetPack), then set runtimes.onnxruntime-tensorrt in the profile",
}


class RuntimeSpec(_Frozen):
    """One runtime of the device: its version there (null = not installed) and the unit it computes on."""

    version: str | None = Field(default=None, description="Version installed on the device; null = absent.")
    unit: Unit = Field(default="cpu", description="The unit it runs the model on (TVM: what it is compiled for).")
    tensorrt: str | None = Field(default=None, description="onnxruntime-tensorrt: the TensorRT version it uses.")


class Runtimes(_Frozen):
    """Runtimes of the device, each a version string (on the CPU) or {version, unit}; absent = not installed."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    tvm: RuntimeSpec | None = Field(default=None, description="TVM's runtime (unit gpu: built with CUDA).")
    onnxruntime: RuntimeSpec | None = Field(default=None, description="onnxruntime on the CPU.")
    onnxruntime_cuda: RuntimeSpec | None = Field(default=None, alias="onnxruntime-cuda",
                                                 description="onnxruntime's CUDA execution provider.")
    onnxruntime_tensorrt: RuntimeSpec | None = Field(default=None, alias="onnxruntime-tensorrt",
                                                     description="onnxruntime's TensorRT execution provider.")

    @model_validator(mode="before")
    @classmethod
    def _plain_versions(cls, data: Any) -> Any:
        """``tvm: "0.27.0"`` is short for ``{version: "0.27.0"}``; onnxruntime's providers fix their unit."""
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            name = key.replace("_", "-")
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)  # `onnxruntime: 1.11` in YAML is a number
            if not (value is None or isinstance(value, str | dict)):
                raise ValueError(f"runtimes.{name} must be a version string or {{version, unit}}, not {value!r}")
            spec = {"version": value} if isinstance(value, str) or value is None else dict(value)
            if name in FIXED_UNITS:
                if spec.get("unit", FIXED_UNITS[name]) != FIXED_UNITS[name]:
                    raise ValueError(f"{name} runs on the {FIXED_UNITS[name].upper()}; remove its 'unit'")
                spec["unit"] = FIXED_UNITS[name]
            out[key] = spec
        return out

    def get(self, name: str) -> RuntimeSpec | None:
        return getattr(self, name.replace("-", "_"))


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
    lock_timeout: float = Field(default=3600.0, ge=0, description="Seconds to wait for the board while another run "
                                                                  "holds it (targets.board_lock), then stop.")

    @field_validator("python", mode="before")
    @classmethod
    def _one_word_is_a_command(cls, value: Any) -> Any:
        """``python: /usr/bin/python3``, the obvious spelling, is the one-element argv [/usr/bin/python3]."""
        return [value] if isinstance(value, str) else value

    @field_validator("python")
    @classmethod
    def _python_is_safe(cls, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in argv or ():
            if not re.fullmatch(SAFE_TOKEN, item):
                words = item.split()
                raise ValueError(
                    f"{item!r} is not one word of letters, digits and _ . / ~ + @ : = -: write connection.python as "
                    + (f"a list of words, e.g. [{', '.join(words)}]" if len(words) > 1 else
                       "a path without spaces, quotes or shell characters"))
        return argv

    def python_argv(self) -> list[str]:
        return list(self.python) if self.python else [sys.executable]


class DeviceProfile(_Frozen):
    """Everything the pipeline needs to know about one device."""

    name: str = Field(pattern=SAFE_NAME, description="Profile name, used in results and on the dashboard.")
    description: str = Field(default="", description="One line for people.")
    cpu: CpuUnit = Field(description="The CPU.")
    gpu: GpuUnit | None = Field(default=None, description="A CUDA GPU, if any.")
    memory_mb: int = Field(ge=1, description="Memory available to the model (shared with the GPU where it is).")
    os: str = Field(description="Operating system, e.g. 'Debian 12'.")
    python_version: str = Field(pattern=r"^3\.\d+$", description="Python on the device, e.g. 3.11.")
    runtimes: Runtimes = Field(default_factory=Runtimes, description="Runtimes on the device.")
    preferred_runtime: RuntimeName = Field(default="tvm", description="The runtime `deploy run` uses when no "
                                           "--runtime is given.")
    preferred_scheme: Precision = Field(default="fp32", description="The numeric format `deploy run` and `deploy "
                                        "check` use when no --quant is given (a Jetson's GPU: fp16).")
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
        """TVM's target for the GPU when TVM runs the model there (runtimes.tvm.unit: gpu), else None: LLVM's NVPTX
        backend, which writes PTX without a CUDA toolkit (pipeline/compiler/gpu.py)."""
        if self.gpu is None or self.unit_of("tvm") != "gpu":
            return None
        return {"kind": "nvptx", "mcpu": self.gpu.sm, "mtriple": "nvptx64-nvidia-cuda"}

    def default_scheme(self, runtime: str) -> Precision:
        """The scheme `deploy run` uses without --quant: the profile's preferred one where the unit ``runtime`` uses
        computes it natively (a Jetson's GPU: fp16), else fp32."""
        gpu = self.gpu if self.unit_of(runtime) == "gpu" else None
        native = gpu.precisions if gpu else self.cpu.precisions
        return self.preferred_scheme if self.preferred_scheme in native else "fp32"

    def has_runtime(self, runtime: str) -> bool:
        """Is ``runtime`` installed on the device (declared with a version)?"""
        spec = self.runtimes.get(runtime)
        return bool(spec and spec.version)

    def onnxruntime_for(self, runtime: str) -> str | None:
        """The onnxruntime version that loads what ``runtime`` runs: its own (a GPU provider's build), else the CPU
        one that also runs the fp32 baseline; None when the device has none."""
        own = self.runtimes.get(runtime) if runtime.startswith("onnxruntime") else None
        spec = own if own and own.version else self.runtimes.onnxruntime
        return spec.version if spec else None

    def board_id(self) -> str:
        """Which board this is, whatever the profile is called: user@host:port, or local (targets.board_lock)."""
        c = self.connection
        return f"{c.user or ''}@{c.host}:{c.port}" if c.transport == "ssh" else "local"

    def unit_of(self, runtime: str) -> Unit:
        """The unit ``runtime`` computes on here: onnxruntime's providers fix it; TVM's is the profile's say (its
        runtimes.tvm.unit), the CPU by default."""
        if runtime in FIXED_UNITS:
            return FIXED_UNITS[runtime]
        spec = self.runtimes.get(runtime)
        return spec.unit if spec else "cpu"

    @model_validator(mode="after")
    def _gpu_runtimes_need_a_gpu(self) -> DeviceProfile:
        for name in RUNTIME_NAMES:
            spec = self.runtimes.get(name)
            if spec and spec.unit == "gpu" and self.gpu is None:
                raise ValueError(f"runtimes.{name} runs on a GPU, and the profile has no 'gpu' section")
        return self


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


def _runtime_specs(data: dict[str, Any]) -> dict[str, Any]:
    """``tvm: "0.27.0"`` as ``{version: "0.27.0"}`` before merging, so a board's file that sets a version keeps the
    unit its base profile gave (extends: jetson-nano, then tvm: "0.27.0": still TVM on the GPU)."""
    runtimes = data.get("runtimes")
    if isinstance(runtimes, dict):
        data["runtimes"] = {k: {"version": v} if isinstance(v, str) else v for k, v in runtimes.items()}
    return data


def _raw_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ProfileError(f"Profile {path} extends itself", value=" -> ".join(map(str, seen + (path,))))
    data = _runtime_specs(_read_yaml(path))
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
    features = sorted(host.features & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                       "asimd", "asimddp", "fphp", "asimdhp", "neon"})
    vnni = bool(host.features & {"avx512_vnni", "avx_vnni", "asimddp"})
    fp16 = bool(host.features & {"fphp", "asimdhp", "avx512_fp16"})
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(host.arch, f"{host.arch}-linux-gnu")
    fields: dict[str, Any] = {
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
    gpu = detect_nvidia_gpu()
    if gpu is not None:
        fields["gpu"] = {"name": gpu.name, "compute_capability": gpu.compute_capability,
                         "cuda_version": gpu.cuda_version, "precisions": gpu_precisions(gpu.compute_capability)}
        fields["runtimes"] = _local_gpu_runtimes()
        fields["description"] += f", {gpu.name} (compute capability {gpu.compute_capability})"
    return fields


def gpu_precisions(compute_capability: str) -> list[str]:
    """What an NVIDIA GPU computes at full speed: fp16 on 5.3, 6.0, 6.2 and 7.0+ (consumer Pascal, 6.1, runs it at
    1/64 rate), int8 by DP4A from 6.1."""
    cc = tuple(int(x) for x in compute_capability.split("."))
    fp16 = cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0)
    return ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if cc >= (6, 1) else [])


@functools.cache
def _local_gpu_runtimes() -> dict[str, Any]:
    """onnxruntime's GPU providers where this machine's onnxruntime has them (onnxruntime-gpu, not the CPU build)."""
    try:
        import onnxruntime
    except ImportError:
        return {}
    providers, version = set(onnxruntime.get_available_providers()), onnxruntime.__version__
    return {name: {"version": version} for name, provider in PROVIDERS.items() if provider in providers}


def _fix(field: str, error: dict[str, Any]) -> str:
    """What to write instead, by the kind of mistake (pydantic's message says what is wrong, not what to write)."""
    kind, leaf = error["type"], field.rsplit(".", 1)[-1]
    if kind == "extra_forbidden":
        return "remove the field, or check its spelling (`deploy profiles show local` lists the fields)"
    if kind == "missing":
        return f"add '{field}' to the profile, or `extends:` a profile that has it"
    if kind in ("tuple_type", "list_type"):
        return f"write '{field}' as a list, e.g. `{leaf}: [first, second]` (one word: `{leaf}: word`)"
    if kind == "string_pattern_mismatch":
        return (f"write '{field}' with letters, digits and _ . / ~ + @ : = - only (no spaces, quotes, $ or other "
                "shell characters: it may reach a remote shell)")
    if kind in ("literal_error", "enum"):
        return f"write one of the values pydantic names: {error['msg'].removeprefix('Input should be ')}"
    if kind.startswith(("int_", "float_", "greater_than", "less_than")):
        return f"write a number for '{field}': {error['msg'][0].lower()}{error['msg'][1:]}"
    if kind in ("string_type", "bool_type", "bool_parsing", "dict_type"):
        expected = {"string_type": "text", "bool_type": "true or false", "bool_parsing": "true or false",
                    "dict_type": "a mapping of `key: value` lines"}[kind]
        return f"write {expected} for '{field}'"
    if kind == "value_error":  # our own validators say what to write
        return error["msg"].removeprefix("Value error, ")
    return f"correct '{field}': {error['msg'][0].lower()}{error['msg'][1:]}"


def _explain(path: Path, exc: ValidationError) -> ProfileError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    hint = _fix(field, first)
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
