"""A model at an opset the board's onnxruntime runs: each onnxruntime release loads ONNX opsets up to a fixed version,
and a board's is often old (a Jetson Nano's JetPack 4.6 wheel is 1.11: opset 16) while exports are new (YOLOv5's
exporter writes opset 17 by default). onnx's version converter takes most models down a version or two: the artifact
and the fp32 baseline are converted for the board where it can, and the checks say which it will be.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import version_converter

# Newest default-domain opset each onnxruntime release runs (onnxruntime's compatibility table).
ORT_MAX_OPSET = {(1, 10): 15, (1, 11): 16, (1, 12): 17, (1, 13): 17, (1, 14): 18, (1, 15): 19, (1, 16): 19,
                 (1, 17): 20, (1, 18): 21, (1, 19): 21, (1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}


def ort_max_opset(version: str | None) -> int | None:
    """The newest opset onnxruntime ``version`` runs; None when unknown (no version, or older than the table)."""
    if not version:
        return None
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    return ORT_MAX_OPSET.get(major_minor) or (max(ORT_MAX_OPSET.values()) if major_minor > max(ORT_MAX_OPSET) else None)


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def converted(model: onnx.ModelProto, opset: int) -> onnx.ModelProto | None:
    """``model`` at ``opset`` (onnx's version converter, checked), or None when an op has no adapter for the step."""
    try:
        down = version_converter.convert_version(model, opset)
        onnx.checker.check_model(down)
    except Exception:  # the converter asserts (RuntimeError) or writes an invalid graph: not convertible
        return None
    return down


def for_onnxruntime(path: Path, version: str | None, out_dir: Path) -> Path:
    """``path`` itself when onnxruntime ``version`` runs its opset, else a copy converted down to it in ``out_dir``
    (the same file for the same model: re-deploying it sends nothing); ``path`` when it can't be converted (the
    checks warned: it won't load there)."""
    newest = ort_max_opset(version)
    model = onnx.load(str(path), load_external_data=False)
    if newest is None or model_opset(model) <= newest or _has_external_data(model):
        return path
    down = converted(onnx.load(str(path)), newest)
    if down is None:
        return path
    out = out_dir / f"{path.stem}.opset{newest}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(down, str(out))
    return out


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
