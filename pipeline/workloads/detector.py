"""YOLOX-style glyph detector `common_det.onnx` from the ddddocr wheel (MIT), 416x416.

Evaluated on glyphs drawn with Pillow at known positions, so the boxes hold by construction.
The model outputs [1, 3549, 6] = 52^2 + 26^2 + 13^2 anchors (strides 8/16/32): cx, cy, w, h
(grid-relative, log-scale sizes), objectness and one class score; decoding and NMS happen
outside the model, as ddddocr does them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.workloads.base import Samples
from pipeline.workloads.orientation import _package_file

SIZE = 416
STRIDES = (8, 16, 32)
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def render_glyphs(rng: np.random.Generator, width: int = 416, height: int = 256) -> tuple[Image.Image, np.ndarray]:
    """An image with 3-5 glyphs in distinct cells of a 4x2 grid, and their xyxy boxes."""
    background = tuple(int(c) for c in rng.integers(200, 256, 3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    boxes = []
    for cell in rng.permutation(8)[: int(rng.integers(3, 6))]:
        font = ImageFont.load_default(size=int(rng.integers(36, 56)))
        x = int(cell % 4) * width // 4 + int(rng.integers(5, 30))
        y = int(cell // 4) * height // 2 + int(rng.integers(5, 40))
        glyph = GLYPHS[int(rng.integers(len(GLYPHS)))]
        draw.text((x, y), glyph, font=font, fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
        boxes.append(draw.textbbox((x, y), glyph, font=font))
    return image, np.array(boxes, np.float32)


def letterbox(image: Image.Image) -> tuple[np.ndarray, float]:
    """ddddocr's preprocessing: fit into 416x416 (top-left, pad 114), BGR, float 0-255, CHW."""
    rgb = image.convert("RGB")
    ratio = min(SIZE / rgb.height, SIZE / rgb.width)
    resized = rgb.resize((int(rgb.width * ratio), int(rgb.height * ratio)), Image.Resampling.BILINEAR)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    canvas[: resized.height, : resized.width] = np.asarray(resized)
    return canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32), ratio


def decode(output: np.ndarray, *, score_threshold: float = 0.1, nms_threshold: float = 0.45) -> np.ndarray:
    """Raw [1, 3549, 6] output -> [K, 5] (x1, y1, x2, y2, score) after class-agnostic NMS."""
    grids, strides = [], []
    for stride in STRIDES:
        side = SIZE // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred = output.reshape(-1, 6).astype(np.float64)
    centre = (pred[:, :2] + grid) * stride
    size = np.exp(np.clip(pred[:, 2:4], -20, 20)) * stride
    scores = pred[:, 4] * pred[:, 5]
    keep = scores > score_threshold
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)[keep]
    scores = scores[keep]
    if not len(scores):
        return np.zeros((0, 5))
    return np.concatenate([boxes, scores[:, None]], 1)[nms(boxes, scores, nms_threshold)]


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = list(np.argsort(-scores))
    keep: list[int] = []
    while order:
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order:
            overlaps = iou(boxes[best], boxes[order])
            order = [o for o, v in zip(order, overlaps, strict=True) if v <= threshold]
    return keep


class DetectorWorkload:
    name = "yolox-glyph-detector"
    kind = "detector"
    metric = "mAP@0.5"
    sha256 = "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"
    input_name = "images"

    def model_path(self) -> Path:
        return _package_file("ddddocr", "common_det.onnx")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return letterbox(image)[0]

    def _images(self, n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
        rng = np.random.default_rng(seed)
        xs, boxes = [], []
        for _ in range(n):
            image, truth = render_glyphs(rng)
            x, ratio = letterbox(image)
            xs.append(x[0])
            boxes.append(truth * ratio)
        return np.stack(xs), boxes

    def calibration(self, n: int) -> Samples:
        x, _ = self._images(n, seed=1)
        return Samples({self.input_name: x}, None, "rendered glyph images (seed 1)")

    def evaluation(self, n: int | None) -> Samples:
        x, boxes = self._images(n or 12, seed=2)
        return Samples({self.input_name: x}, boxes, "rendered glyph images with exact boxes (seed 2)")
