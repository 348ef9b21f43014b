"""Stage 3, compile: the only module that imports tvm.

TVM Relax imports the (static, possibly QDQ) ONNX model and builds a shared library for the
profile's target, cross-linked where the device is another architecture. The manifest written
next to it ties the library to its model, profile, scheme and tool versions by sha256.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import tvm
from pydantic import BaseModel, ConfigDict, Field
from tvm.relax.frontend import onnx as onnx_frontend

from edgedeploy.errors import CompileError
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.ingest import ModelInfo
from pipeline.quantize import QuantizedModel
from pipeline.versions import tool_versions
from targets.profiles import DeviceProfile

MANIFEST_SCHEMA = 1


class CompiledArtifact(BaseModel):
    """A compiled library and its manifest, on this machine."""

    model_config = ConfigDict(frozen=True)
    library_path: str
    manifest_path: str
    sha256: str = Field(description="sha256 of the library.")
    runtime: str = Field(description="The runtime that loads the library on the device.")
    target: dict[str, Any]
    compile_seconds: float


def profile_sha256(profile: DeviceProfile) -> str:
    return sha256_bytes(profile.model_dump_json(exclude={"source"}).encode())


def resolve_target(profile: DeviceProfile) -> dict[str, Any]:
    """The profile's target with a host-detected mcpu filled in (the `local` profile leaves it open)."""
    target = profile.tvm_target()
    if "mcpu" not in target:
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    return target


def compile_model(
    quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, workdir: Path
) -> CompiledArtifact:
    """Import into TVM Relax, build for the profile's CPU, export the library, write the manifest."""
    target_dict = resolve_target(profile)
    started = time.perf_counter()
    try:
        model = onnx.load(quantized.path)
        shape_dict = {spec.name: list(spec.shape) for spec in info.inputs}
        mod = onnx_frontend.from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
        executable = tvm.compile(mod, target=tvm.target.Target(target_dict))
        library = workdir / "model.so"
        executable.export_library(str(library), **({"cc": profile.cross_compiler} if profile.cross_compiler else {}))
    except Exception as exc:
        raise CompileError(
            f"TVM could not compile the {quantized.config.label()} model for profile {profile.name!r}",
            value=str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__,
            fix="run `deploy check` to see which ops the compiler can't import",
            target=json.dumps(target_dict),
        ) from exc
    seconds = time.perf_counter() - started
    digest = sha256_file(library)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"sha256": info.sha256, "source": info.source_path},
        "compiled_model": {"sha256": quantized.sha256, "scheme": quantized.config.model_dump()},
        "artifact": {"file": library.name, "sha256": digest, "runtime": "tvm"},
        "profile": {"name": profile.name, "sha256": profile_sha256(profile)},
        "target": target_dict,
        "inputs": [spec.model_dump() for spec in info.inputs],
        "outputs": [spec.model_dump() for spec in info.outputs],
        "tools": tool_versions(),
        "compile_seconds": round(seconds, 3),
    }
    manifest_path = workdir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return CompiledArtifact(
        library_path=str(library), manifest_path=str(manifest_path), sha256=digest, runtime="tvm",
        target=target_dict, compile_seconds=seconds,
    )


def tvm_importable_ops() -> frozenset[str]:
    """ONNX op types TVM's Relax frontend can import (its converter table)."""
    return frozenset(onnx_frontend._get_convert_map())
