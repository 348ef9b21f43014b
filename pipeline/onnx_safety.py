"""Load an .onnx file without trusting it.

ONNX external data has had path-traversal CVEs (2022, 2024, 2025, 2026): a tensor's
``location`` can name ``../../etc/passwd``, an absolute path or a symlink. Every external
location is checked here, before onnx, onnxruntime or TVM read a byte of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_model

from edgedeploy.errors import ModelLoadError, UnsafeModelError
from targets.hashing import sha256_file

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3  # protobuf's own 2 GiB limit for one message


def iter_tensors(graph: onnx.GraphProto, functions=()) -> Iterator[TensorProto]:
    """Every TensorProto in a graph: initializers, sparse initializers, attribute tensors, subgraphs, and those of the
    model's ``functions`` (a function's Constant nodes carry tensors too)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)
    for function in functions:
        yield from _node_tensors(function.node)


def _node_tensors(nodes) -> Iterator[TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def _external_location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def check_external_data(model: onnx.ModelProto, base_dir: Path, *, max_bytes: int) -> int:
    """Reject external-data locations outside ``base_dir``; return the total external bytes."""
    base = base_dir.resolve()
    total = 0
    for tensor in iter_tensors(model.graph, model.functions):
        location = _external_location(tensor)
        if location is None:
            continue
        where = {"tensor": tensor.name or "<unnamed>", "location": repr(location) if "\0" in location else location}
        if not location or "\0" in location or os.path.isabs(location) or ".." in Path(location).parts or \
                "\\" in location:
            raise UnsafeModelError(
                "The model's external data points outside the model's folder",
                expected="a relative path inside the model's folder, without '..'",
                fix="re-save the model with onnx.save(..., save_as_external_data=True) next to it",
                **where,
            )
        candidate = base / location
        # A symlink anywhere on the way could lead out of the folder.
        probe = candidate
        while probe != base:
            if probe.is_symlink():
                raise UnsafeModelError(
                    "The model's external data goes through a symbolic link",
                    expected="plain files inside the model's folder",
                    fix="copy the data file next to the model instead of linking it",
                    **where,
                )
            probe = probe.parent
        resolved = candidate.resolve()
        if base not in resolved.parents:
            raise UnsafeModelError("The model's external data resolves outside the model's folder", **where)
        if not resolved.is_file():
            raise ModelLoadError(
                "The model's external data file is missing",
                fix="copy the data file next to the model",
                **where,
            )
        if resolved.stat().st_nlink > 1:  # a hard link can be any file of the filesystem its maker could read
            raise UnsafeModelError(
                "The model's external data file is a hard link",
                expected="a plain file inside the model's folder, with one link",
                fix="copy the data file next to the model instead of linking it",
                **where,
            )
        total += resolved.stat().st_size
        if total > max_bytes:
            raise ModelLoadError(
                "The model's external data is larger than the size cap",
                value=f"{total} bytes",
                expected=f"at most {max_bytes} bytes",
                fix="raise the cap with --max-model-mb if the model is really that large",
                **where,
            )
    return total


def load_model_safely(path: Path, *, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Read, contain and check an ONNX model; every failure is one ModelLoadError/UnsafeModelError."""
    if not path.exists():
        raise ModelLoadError(f"Model file {path} does not exist", fix="check the path")
    if not path.is_file():
        raise ModelLoadError(f"Model path {path} is not a file", fix="give the path of an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"Model file {path} is empty (0 bytes)", fix="export the model again")
    if size > max_bytes:
        raise ModelLoadError(
            f"Model file {path} is larger than the size cap",
            value=f"{size} bytes",
            expected=f"at most {max_bytes} bytes",
            fix="raise the cap with --max-model-mb if the model is really that large",
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... for garbage
        raise ModelLoadError(
            f"Model file {path} is not a readable ONNX model (truncated, or not ONNX at all)",
            value=f"{size} bytes; parser said: {str(exc)[:200] or type(exc).__name__}",
            fix="export the model again, or check that the download/copy finished",
        ) from exc
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(
            f"Model file {path} holds no ONNX graph (truncated, or not ONNX at all)",
            value=f"{size} bytes, {len(model.graph.node)} nodes",
            fix="export the model again",
        )
    check_external_data(model, path.parent, max_bytes=max_bytes - size)
    try:
        load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(
            f"Model file {path} fails onnx.checker",
            value=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
            fix="re-export the model with a current exporter and opset",
        ) from exc
    return model


def external_files(path: Path) -> list[Path]:
    """The external-data files a (checked: load_model_safely) model reads, each once, in a fixed order."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {_external_location(t) for t in iter_tensors(model.graph, model.functions)} - {None, ""}
    return [path.parent / location for location in sorted(locations)]


def model_digest(path: Path) -> str:
    """sha256 of what the model computes with: the .onnx file, and each external-data file it reads (by name and
    content). A model without external data keeps its file's plain sha256. (Only the .onnx once: a changed
    weights.bin served every int8 and fp16 run the stale quantized model from the cache.)"""
    files = external_files(path)
    if not files:
        return sha256_file(path)
    parts = [sha256_file(path)] + [f"{file.name}:{sha256_file(file)}" for file in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def self_contained(path: Path, out_dir: Path) -> Path:
    """``path`` itself, or, for a model whose weights are in external files, a copy with them inside (what goes to
    the device as the baseline: the .onnx alone would reach it without its weights)."""
    if not external_files(path):
        return path
    out = out_dir / f"{path.stem}.{model_digest(path)[:12]}.inline.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(load_model_safely(path), str(out))
    return out
