"""Artifacts and their manifests: what runs on the device, tied by sha256 to the model it came from,
the scheme, the profile and the tool versions. No compiler imports here: an onnxruntime artifact is
packaged without TVM.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, ConfigDict, Field

from pipeline.ingest import ModelInfo
from pipeline.onnx_safety import self_contained
from pipeline.opset import for_onnxruntime, model_opset
from pipeline.quantize import QuantizedModel
from pipeline.versions import tool_versions
from targets.hashing import sha256_bytes, sha256_file
from targets.profiles import DeviceProfile

MANIFEST_SCHEMA = 1
# ELF e_machine of the library for each profile arch (a cross-link gone wrong shows up here).
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "armv7l": 40}


class CompiledArtifact(BaseModel):
    """What runs on the device (a TVM library, or an .onnx for onnxruntime) and its manifest, on this machine."""

    model_config = ConfigDict(frozen=True)
    library_path: str
    manifest_path: str
    sha256: str = Field(description="sha256 of the library.")
    runtime: str = Field(description="The runtime that loads the library on the device.")
    target: dict[str, Any]
    gpu_target: dict[str, Any] | None = None
    device_code: str = Field(default="cpu", description="cpu; ptx or ptx+cubin (GPU code in the library); onnx.")
    compile_seconds: float
    tuning: dict[str, Any] | None = Field(default=None, description="MetaSchedule tuning done for this build.")
    integer_ops: int = Field(default=0, description="conv2d/matmul computed in int8 x int8 -> int32 (TVM int8).")
    vnni_ops: int = Field(default=0, description="Of those, laid out for AVX-512 VNNI (compiler.passes.dot).")
    sdot_ops: int = Field(default=0, description="Of those, laid out for ARM dotprod's sdot (compiler.passes.dot).")
    dot_ops: dict[str, int] = Field(default_factory=dict, description="Of those, laid out for a dot-product "
                                    "instruction, by instruction (vpdpbusd, vpmaddubsw, sdot, smull+saddlp).")
    winograd_convs: int = Field(default=0, description="Float 3x3 convs computed by Winograd (passes.winograd).")
    cached: bool = Field(default=False, description="Reused from the artifact cache.")


def profile_sha256(profile: DeviceProfile) -> str:
    return sha256_bytes(profile.model_dump_json(exclude={"source"}).encode())


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file, None when it isn't one."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def write_manifest(
    artifact: Path, quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, *, runtime: str,
    seconds: float, extra: dict[str, Any],
) -> CompiledArtifact:
    """Write manifest.json next to the artifact. No timestamps: the same artifact always has the same
    manifest, so re-deploying it sends nothing."""
    digest = sha256_file(artifact)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "model": {"sha256": info.sha256, "source": info.source_path},
        "compiled_model": {"sha256": quantized.sha256, "scheme": quantized.config.model_dump()},
        "artifact": {"file": artifact.name, "sha256": digest, "runtime": runtime},
        "profile": {"name": profile.name, "sha256": profile_sha256(profile)},
        "inputs": [spec.model_dump() for spec in info.inputs],
        "outputs": [spec.model_dump() for spec in info.outputs],
        "tools": tool_versions(),
        **extra,
    }
    manifest_path = artifact.parent / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return CompiledArtifact(
        library_path=str(artifact), manifest_path=str(manifest_path), sha256=digest, runtime=runtime,
        target=extra.get("target", {}), gpu_target=extra.get("gpu_target"),
        device_code=extra.get("device_code", "cpu"), compile_seconds=seconds, integer_ops=extra.get("integer_ops", 0),
        vnni_ops=extra.get("vnni_ops", 0), sdot_ops=extra.get("sdot_ops", 0), dot_ops=extra.get("dot_ops", {}),
        winograd_convs=extra.get("winograd_convs", 0),
    )


def package_onnx(quantized: QuantizedModel, info: ModelInfo, profile: DeviceProfile, workdir: Path, *,
                 runtime: str = "onnxruntime") -> CompiledArtifact:
    """An onnxruntime artifact: the (quantized) .onnx itself, with the same kind of manifest as a library; ``runtime``
    names the execution provider (onnxruntime-cuda, onnxruntime-tensorrt: TensorRT builds its engine on the
    device, fp16/int8 as the manifest's scheme says)."""
    started = time.perf_counter()
    artifact = workdir / "model.onnx"
    # Weights in external files go inside the copy: the device gets one file (pipeline.onnx_safety.self_contained).
    model = for_onnxruntime(self_contained(Path(quantized.path), workdir / "inline"), profile.onnxruntime_for(runtime),
                            workdir / "converted")
    shutil.copyfile(model, artifact)
    return write_manifest(artifact, quantized, info, profile, runtime=runtime, seconds=time.perf_counter() - started,
                          extra={"device_code": "onnx", "opset": model_opset(onnx.load(str(artifact),
                                                                                        load_external_data=False))})
