"""A model at an opset and IR version the board's onnxruntime reads: each onnxruntime release loads ONNX opsets and
IR versions up to fixed ones, and a board's is often old (a Jetson Nano's JetPack 4.6 wheel is 1.11: opset 16, IR 8)
while exports are new (YOLOv5's exporter writes opset 17; onnx 1.23's helper stamps IR 14, which even onnxruntime 1.31
refuses). onnx's version converter takes most models down an opset or two, and a model that uses nothing of a newer
IR can say an older one: the artifact and the fp32 baseline go to the board so where they can, and the checks say
which it will be.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import version_converter

# Newest default-domain opset each onnxruntime release runs (onnxruntime's compatibility table).
ORT_MAX_OPSET = {(1, 10): 15, (1, 11): 16, (1, 12): 17, (1, 13): 17, (1, 14): 18, (1, 15): 19, (1, 16): 19,
                 (1, 17): 20, (1, 18): 21, (1, 19): 21, (1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}


# Newest ONNX IR version each onnxruntime release reads (the onnx release it was built with): the releases up to
# 1.16 from onnxruntime's compatibility table, and 1.31 as measured here ("max supported IR version: 13"); others
# unknown (no claim).
ORT_MAX_IR = {(1, 10): 8, (1, 11): 8, (1, 12): 8, (1, 13): 8, (1, 14): 9, (1, 15): 9, (1, 16): 9, (1, 31): 13}


def ort_max_ir(version: str | None) -> int | None:
    """The newest IR version onnxruntime ``version`` reads; None when not known."""
    return ORT_MAX_IR.get(tuple(int(x) for x in version.split(".")[:2])) if version else None


def with_ir(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto | None:
    """``model`` stamped with an older IR version, when nothing in it needs the newer one (onnx's checker, full, at
    that IR, says so), else None. onnx 1.23's helper stamps IR 14 on everything it writes."""
    older = onnx.ModelProto()
    older.CopyFrom(model)
    older.ir_version = ir_version
    try:
        onnx.checker.check_model(older, full_check=True)
    except Exception:  # a type or field of the newer IR: not this way
        return None
    return older


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
    (the same file for the same model, made once: re-deploying it sends nothing); ``path`` when it can't be converted
    (the checks warned: it won't load there)."""
    newest, newest_ir = ort_max_opset(version), ort_max_ir(version)
    model = onnx.load(str(path), load_external_data=False)
    opset, ir = model_opset(model), model.ir_version
    too_new, ir_too_new = newest is not None and opset > newest, newest_ir is not None and ir > newest_ir
    if not (too_new or ir_too_new) or _has_external_data(model):
        return path
    out = out_dir / f"{path.stem}.opset{newest if too_new else opset}.ir{newest_ir if ir_too_new else ir}.onnx"
    if out.is_file():
        return out
    if too_new and (model := converted(model, newest)) is None:
        return path
    if ir_too_new and model.ir_version > newest_ir and (model := with_ir(model, newest_ir)) is None:
        return path
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
