"""A user's own labels and reference: a detector scored on COCO annotations by pycocotools, and a model that came
int8 measured against the fp32 model it was made from (--reference)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgedeploy.errors import OptionError
from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.config import RunConfig
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from pipeline.workloads.detector import render_glyphs
from tests.conftest import conv_model, int8_on_this_host

pytestmark = pytest.mark.slow
QUICK = BenchmarkSettings(warmup=1, min_iterations=3, min_seconds=0.1, rounds=1)


def _glyph_annotations(folder):
    """Eight images of glyphs drawn at known places (the boxes hold by construction), as COCO instances."""
    rng = np.random.default_rng(5)
    images, annotations = [], []
    for i in range(8):
        image, boxes = render_glyphs(rng)
        image.save(folder / f"glyphs_{i}.png")
        images.append({"id": 100 + i, "file_name": f"glyphs_{i}.png", "width": image.width, "height": image.height})
        annotations += [{"id": len(annotations) + k + 1, "image_id": 100 + i, "category_id": 7, "iscrowd": 0,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "area": float((x2 - x1) * (y2 - y1))} for k, (x1, y1, x2, y2) in enumerate(boxes)]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 7, "name": "glyph"}]}))
    return path


def test_a_detector_is_scored_on_coco_annotations_by_pycocotools(prefect_server, tmp_path):
    detector = WORKLOADS["yolox-glyph-detector"].model_path()  # YOLOX head, raw outputs
    result = deploy_run(RunConfig(model_path=str(detector), profile="local", runtime="onnxruntime",
                                  quant=QuantConfig(scheme="fp32"), eval_data=str(_glyph_annotations(tmp_path)),
                                  decode="yolox", bench=QUICK))
    assert result.valid and result.accuracy.metric == "mAP@0.5:0.95" and result.accuracy.samples == 8
    map50, baseline50 = result.accuracy.others["mAP@0.5"]
    assert map50 > 0.9 and baseline50 == map50  # it finds the glyphs; the same model on both sides
    assert 0.3 < result.accuracy.value < map50  # the strict IoUs cost: its boxes are not the text's own


def test_a_qdq_model_is_measured_against_its_reference(prefect_server, tmp_path):
    digits = WORKLOADS["digits-cnn"]
    # as the checks quantize for onnxruntime here: 8-bit weights saturate its kernels on a CPU without VNNI
    qdq = quantize(digits.model_path(), tmp_path, int8_on_this_host(), digits.calibration(50)).path
    alone = deploy_run(RunConfig(model_path=qdq, profile="local", runtime="onnxruntime", bench=QUICK))
    against = deploy_run(RunConfig(model_path=qdq, profile="local", runtime="onnxruntime", bench=QUICK,
                                   reference=str(digits.model_path())))
    assert alone.valid and against.valid and against.model.reference == str(digits.model_path())
    assert alone.agreement.max_abs == 0  # onnxruntime on the same QDQ model, both sides
    assert 0 < against.agreement.max_abs and against.agreement.cosine > 0.99  # int8 against the real fp32


def test_a_reference_with_other_inputs_is_refused(tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(conv_model(), str(other))
    with pytest.raises(OptionError, match="--reference has other inputs than the model"):
        deploy_run(RunConfig(model_path=str(WORKLOADS["digits-cnn"].model_path()), profile="local",
                             reference=str(other), bench=QUICK))
