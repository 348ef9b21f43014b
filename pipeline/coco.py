"""A detector's own labels: COCO-style annotations (an instances .json beside its images), the model's outputs decoded
as its family writes them (``--decode yolov5|yolov8|yolox``), scored by pycocotools' COCOeval: mAP@0.5:0.95 (the
headline, COCO's own) and mAP@0.5.

Images are letterboxed to the model's input as each family's own code does (Ultralytics: centred, grey 114, RGB
/ 255; YOLOX: top-left, grey 114, BGR 0-255), and every detection is mapped back to the original image before it is
scored, so the numbers are comparable with the family's own validation (at its confidence 0.001, class-aware NMS at
IoU 0.6 or 0.65, at most 300 detections per image; close, not bit-equal: their resizing is OpenCV's).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgedeploy.errors import DataError
from pipeline.ingest import TensorSpec
from pipeline.workloads.base import CocoLabels, Decode
from pipeline.workloads.detector import nms

DECODES: tuple[Decode, ...] = ("yolov5", "yolov8", "yolox")
CONFIDENCE = 0.001  # the families' validation threshold: mAP counts low-confidence detections too
MAX_DETECTIONS = 300
NMS_IOU = {"yolov5": 0.6, "yolov8": 0.7, "yolox": 0.65}


def letterbox(image: Image.Image, width: int, height: int, decode: Decode) -> tuple[np.ndarray, tuple[float, ...]]:
    """The image as the family's own preprocessing feeds it: CHW float32, and (scale, x offset, y offset)."""
    rgb = image.convert("RGB")
    scale = min(width / rgb.width, height / rgb.height)
    new_w, new_h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    canvas = np.full((height, width, 3), 114, np.uint8)
    x0, y0 = (0, 0) if decode == "yolox" else ((width - new_w) // 2, (height - new_h) // 2)
    canvas[y0:y0 + new_h, x0:x0 + new_w] = np.asarray(rgb.resize((new_w, new_h), Image.Resampling.BILINEAR))
    if decode == "yolox":
        pixels = canvas[:, :, ::-1].astype(np.float32)  # BGR, 0-255
    else:
        pixels = canvas.astype(np.float32) / 255.0
    return pixels.transpose(2, 0, 1), (scale, float(x0), float(y0))


def _image_folder(annotations: Path, images: Path | None, file_name: str) -> Path:
    for folder in ([images] if images else [annotations.parent, annotations.parent / "images"]):
        if (folder / file_name).is_file():
            return folder / file_name
    raise DataError(f"Image {file_name!r} of {annotations.name} is not there", value=str(images or annotations.parent),
                    fix="put the images next to the .json (or in images/ beside it), or pass --images DIR")


def load_coco(annotations: Path, spec: TensorSpec, decode: Decode | None, images: Path | None = None,
              limit: int | None = None) -> tuple[dict[str, np.ndarray], CocoLabels]:
    """The images of a COCO instances file, letterboxed for ``spec``, and their ground truth."""
    if decode is None:
        raise DataError(f"{annotations.name}: COCO annotations need to know how the model's outputs read",
                        fix=f"pass --decode {'|'.join(DECODES)}")
    try:
        data = json.loads(annotations.read_text())
        entries, boxes = data["images"], data.get("annotations", [])
        categories = sorted(int(c["id"]) for c in data["categories"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"Cannot read {annotations} as COCO instances", value=str(exc)[:200],
                        expected='a JSON object with "images", "annotations" and "categories"') from exc
    if len(spec.shape) != 4 or spec.shape[1] != 3:
        raise DataError("COCO images feed a model with one NCHW RGB input", value=list(spec.shape))
    height, width = spec.shape[2], spec.shape[3]
    entries = entries[:limit] if limit else entries
    rows, sizes, transforms = [], [], []
    for entry in entries:
        path = _image_folder(annotations, images, entry["file_name"])
        try:
            with Image.open(path) as image:
                pixels, transform = letterbox(image, width, height, decode)
                sizes.append(image.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Cannot read image {path}", value=str(exc)[:200]) from exc
        rows.append(pixels)
        transforms.append(transform)
    row_of = {int(entry["id"]): row for row, entry in enumerate(entries)}
    kept = [b for b in boxes if int(b["image_id"]) in row_of]
    labels = CocoLabels(
        decode=decode, image_ids=np.array([int(e["id"]) for e in entries], np.int64),
        image_sizes=np.array(sizes, np.int64).reshape(-1, 2), letterbox=np.array(transforms, np.float64),
        boxes=np.array([b["bbox"] for b in kept], np.float64).reshape(-1, 4),
        box_classes=np.array([int(b["category_id"]) for b in kept], np.int64),
        box_owner=np.array([row_of[int(b["image_id"])] for b in kept], np.int64),
        box_crowd=np.array([int(b.get("iscrowd", 0)) for b in kept], np.int64),
        box_area=np.array([float(b.get("area", b["bbox"][2] * b["bbox"][3])) for b in kept], np.float64),
        categories=np.array(categories, np.int64), input_size=np.array([width, height], np.int64))
    return {spec.name: np.stack(rows).astype(spec.dtype)}, labels


def _yolox_grid(anchors: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for stride in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(width // stride), np.arange(height // stride))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if len(grid) != anchors:
        raise DataError("--decode yolox: the output's anchors don't fit strides 8/16/32 of the input",
                        value=anchors, expected=len(grid), fix="check --decode (yolov5 and yolov8 outputs are decoded "
                        "in the model)")
    return grid, stride


def decode_output(output: np.ndarray, decode: Decode, width: int, height: int) -> np.ndarray:
    """One image's raw output -> [K, 6]: x1, y1, x2, y2 (input pixels), score, class index; after class-aware NMS."""
    pred = output.astype(np.float64)
    if decode == "yolov8":  # [4 + classes, anchors]: cx, cy, w, h, class scores (no objectness)
        pred = pred.reshape(pred.shape[-2], pred.shape[-1]).T
        xywh, scores = pred[:, :4], pred[:, 4:]
    else:  # [anchors, 5 + classes]: cx, cy, w, h, objectness, class scores
        pred = pred.reshape(-1, pred.shape[-1])
        xywh, scores = pred[:, :4], pred[:, 5:] * pred[:, 4:5]
        if decode == "yolox":  # raw head output: grid offsets and log sizes, in strides
            grid, stride = _yolox_grid(len(pred), width, height)
            xywh = np.concatenate([(xywh[:, :2] + grid) * stride, np.exp(np.clip(xywh[:, 2:], -20, 20)) * stride], 1)
    rows, classes = np.nonzero(scores > CONFIDENCE)  # every class over the threshold (multi-label, as val does)
    if not len(rows):
        return np.zeros((0, 6))
    centre, size = xywh[rows, :2], xywh[rows, 2:]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
    conf = scores[rows, classes]
    top = np.argsort(-conf)[:30_000]  # the families' cap before NMS
    boxes, conf, classes = boxes[top], conf[top], classes[top]
    keep = nms(boxes + classes[:, None] * 8192.0, conf, NMS_IOU[decode])[:MAX_DETECTIONS]  # class-aware
    return np.concatenate([boxes[keep], conf[keep, None], classes[keep, None]], 1)


def coco_map(outputs: np.ndarray, labels: CocoLabels) -> dict[str, float]:
    """mAP@0.5:0.95 and mAP@0.5 of the outputs (one row per image) by pycocotools' COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    width, height = (int(v) for v in labels.input_size)
    n = min(len(outputs), len(labels))
    detections = []
    for row in range(n):
        scale, x0, y0 = labels.letterbox[row]
        img_w, img_h = labels.image_sizes[row]
        for x1, y1, x2, y2, score, cls in decode_output(outputs[row], labels.decode, width, height):
            if int(cls) >= len(labels.categories):
                continue  # a class the annotations don't have
            bx1, bx2 = np.clip([(x1 - x0) / scale, (x2 - x0) / scale], 0, img_w)
            by1, by2 = np.clip([(y1 - y0) / scale, (y2 - y0) / scale], 0, img_h)
            detections.append({"image_id": int(labels.image_ids[row]), "category_id": int(labels.categories[int(cls)]),
                               "bbox": [float(bx1), float(by1), float(bx2 - bx1), float(by2 - by1)],
                               "score": float(score)})
    if not detections or not len(labels.boxes):
        return {"mAP@0.5:0.95": 0.0, "mAP@0.5": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        truth = COCO()
        truth.dataset = labels.head(n).ground_truth()
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.imgIds = [int(i) for i in labels.image_ids[:n]]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP@0.5:0.95": max(float(evaluation.stats[0]), 0.0), "mAP@0.5": max(float(evaluation.stats[1]), 0.0)}
