"""A detector's own labels: COCO instances read beside their images, each family's outputs decoded, mapped back
through the letterbox and scored by pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgedeploy.errors import DataError
from pipeline.coco import coco_map, decode_output, load_coco
from pipeline.ingest import TensorSpec

# Original image 640 x 480 into a 320 x 320 input: scale 0.5; Ultralytics centres it (40 px bands above and below),
# YOLOX puts it top-left.
SPEC = TensorSpec(name="images", shape=(1, 3, 320, 320), dtype="float32")
TRUTH = [(7, [100.0, 60.0, 200.0, 120.0]), (3, [400.0, 300.0, 80.0, 160.0])]  # category id, x y w h (original)


@pytest.fixture
def annotations(tmp_path):
    Image.new("RGB", (640, 480), (90, 120, 150)).save(tmp_path / "street.jpg")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 42, "file_name": "street.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": i + 1, "image_id": 42, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for i, (cat, box) in enumerate(TRUTH)],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}, {"id": 9, "name": "dog"}],
    }))
    return tmp_path / "instances.json"


def _in_input(box: list[float], offset: tuple[float, float]) -> tuple[float, float, float, float]:
    """cx, cy, w, h in model-input pixels of an original x y w h box."""
    x, y, w, h = (v * 0.5 for v in box)
    return x + w / 2 + offset[0], y + h / 2 + offset[1], w, h


def _rows(offset: tuple[float, float], anchors: int = 12) -> np.ndarray:
    """[anchors, 5 + 3 classes]: the two truths (class index = position of the category id in sorted order),
    plus background anchors with low scores."""
    rows = np.zeros((anchors, 8), np.float32)
    rows[:, :4] = [160, 160, 10, 10]
    rows[:, 4], rows[:, 5:] = 0.01, 0.01
    for i, (category, box) in enumerate(TRUTH):
        rows[i, :4] = _in_input(box, offset)
        rows[i, 4] = 0.95
        rows[i, 5 + [3, 7, 9].index(category)] = 0.9
    return rows


@pytest.mark.parametrize("decode", ["yolov5", "yolov8"])
def test_ultralytics_outputs_map_back_to_the_annotated_boxes(annotations, decode):
    inputs, labels = load_coco(annotations, SPEC, decode)
    assert inputs["images"].shape == (1, 3, 320, 320) and 0.0 <= inputs["images"].min() <= inputs["images"].max() <= 1
    assert labels.letterbox.tolist() == [[0.5, 0.0, 40.0]]  # centred: 40 px of grey above
    rows = _rows((0.0, 40.0))
    if decode == "yolov8":  # [4 + classes, anchors], no objectness
        rows = np.concatenate([rows[:, :4], rows[:, 5:] * rows[:, 4:5]], 1).T
    scores = coco_map(rows[None][None], labels)
    assert scores == {"mAP@0.5:0.95": pytest.approx(1.0), "mAP@0.5": pytest.approx(1.0)}
    if decode == "yolov5":  # boxes 40 input px off (as if the letterbox were not undone) score less
        assert coco_map(_rows((0.0, 0.0))[None][None], labels)["mAP@0.5:0.95"] < 0.5


def test_yolox_outputs_are_raw_grid_offsets(annotations):
    inputs, labels = load_coco(annotations, SPEC, "yolox")
    assert labels.letterbox.tolist() == [[0.5, 0.0, 0.0]] and inputs["images"].max() > 1  # top-left, 0-255 BGR
    anchors = sum((320 // s) ** 2 for s in (8, 16, 32))
    raw = np.full((anchors, 8), -10.0, np.float32)
    raw[:, 4:] = 0.001
    for category, box in TRUTH:  # one stride-8 cell per box, its offset and log size
        cx, cy, w, h = _in_input(box, (0.0, 0.0))
        gx, gy = int(cx // 8), int(cy // 8)
        cell = gy * 40 + gx
        raw[cell, :4] = [cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8)]
        raw[cell, 4], raw[cell, 5 + [3, 7, 9].index(category)] = 0.9, 0.9
    decoded = decode_output(raw[None], "yolox", 320, 320)
    assert len(decoded) == 2
    assert coco_map(raw[None][None], labels)["mAP@0.5:0.95"] == pytest.approx(1.0)


def test_coco_needs_a_decode_and_its_images(annotations, tmp_path):
    with pytest.raises(DataError, match="need to know how the model's outputs read") as caught:
        load_coco(annotations, SPEC, None)
    assert "--decode yolov5|yolov8|yolox" in caught.value.fix
    (tmp_path / "street.jpg").unlink()
    with pytest.raises(DataError, match="'street.jpg' of instances.json is not there"):
        load_coco(annotations, SPEC, "yolov8")
    (tmp_path / "broken.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="Cannot read .* as COCO instances"):
        load_coco(tmp_path / "broken.json", SPEC, "yolov8")
