"""What a workload is: a model family with its preprocessing, its data and its metric."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

TaskKind = Literal["classifier", "detector", "coco"]
Decode = Literal["yolov5", "yolov8", "yolox"]  # how a detector's outputs read: pipeline/coco.py


@dataclass
class CocoLabels:
    """COCO-style ground truth of evaluation images (pipeline/coco.py reads and scores it), as the .npz keeps it: one
    row per image or per box."""

    decode: Decode
    image_ids: np.ndarray  # [N] the annotation file's image ids
    image_sizes: np.ndarray  # [N, 2] width, height of the original image
    letterbox: np.ndarray  # [N, 3] scale, x offset, y offset: input pixel = original * scale + offset
    boxes: np.ndarray  # [M, 4] x, y, w, h in original pixels
    box_classes: np.ndarray  # [M] category ids
    box_owner: np.ndarray  # [M] row of the image
    box_crowd: np.ndarray  # [M] iscrowd
    box_area: np.ndarray  # [M]
    categories: np.ndarray  # [K] category ids; the model's class i is categories[i]
    input_size: np.ndarray  # [2] width, height of the model input the images were letterboxed to

    def __len__(self) -> int:
        return len(self.image_ids)

    def head(self, n: int) -> CocoLabels:
        keep = self.box_owner < n
        return CocoLabels(self.decode, self.image_ids[:n], self.image_sizes[:n], self.letterbox[:n],
                          self.boxes[keep], self.box_classes[keep], self.box_owner[keep], self.box_crowd[keep],
                          self.box_area[keep], self.categories, self.input_size)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"coco_{name}": np.asarray(value) for name, value in vars(self).items()}

    @classmethod
    def from_arrays(cls, npz) -> CocoLabels | None:
        if "coco_image_ids" not in npz.files:
            return None
        fields = {name: npz[f"coco_{name}"] for name in cls.__dataclass_fields__}
        return cls(**{**fields, "decode": str(fields["decode"])})

    def ground_truth(self) -> dict:
        """The annotations as pycocotools' COCO() takes them."""
        return {
            "images": [{"id": int(i), "width": int(w), "height": int(h)}
                       for i, (w, h) in zip(self.image_ids, self.image_sizes, strict=True)],
            "annotations": [{"id": k + 1, "image_id": int(self.image_ids[owner]), "bbox": [float(v) for v in box],
                             "category_id": int(cls), "iscrowd": int(crowd), "area": float(area)}
                            for k, (box, cls, owner, crowd, area) in enumerate(zip(
                                self.boxes, self.box_classes, self.box_owner, self.box_crowd, self.box_area,
                                strict=True))],
            "categories": [{"id": int(c)} for c in self.categories],
        }


@dataclass
class Samples:
    """Model inputs, one sample per row (fed ``batch`` rows at a time: ``batches``), and optional labels.

    ``labels`` is an int array [N] for classifiers; for detectors a list of [K,4] xyxy boxes per
    sample, in model-input pixels; or a user's COCO annotations (CocoLabels).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | list[np.ndarray] | CocoLabels | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def save(self, path: Path) -> None:
        """Write to .npz: one array per input, plus ``labels`` (classifier) or ``boxes``/``box_owner`` (detector)."""
        extra: dict[str, np.ndarray] = {}
        if isinstance(self.labels, CocoLabels):
            extra = self.labels.arrays()
        elif isinstance(self.labels, np.ndarray):
            extra["labels"] = self.labels
        elif self.labels is not None:
            boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in self.labels]
            extra["boxes"] = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
            extra["box_owner"] = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(boxes)])
        np.savez(path, **self.inputs, **extra)

    @classmethod
    def load(cls, path: Path, input_names: list[str]) -> Samples:
        with np.load(path, allow_pickle=False) as npz:
            inputs = {name: npz[name] for name in input_names}
            labels: np.ndarray | list[np.ndarray] | CocoLabels | None = CocoLabels.from_arrays(npz)
            if labels is None and "labels" in npz.files:
                labels = npz["labels"]
            elif labels is None and "boxes" in npz.files:
                owner, boxes = npz["box_owner"], npz["boxes"]
                labels = [boxes[owner == i] for i in range(len(next(iter(inputs.values()))))]
        return cls(inputs, labels, str(path))

    def batches(self, batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """The inputs of each inference in turn: ``batch`` consecutive rows of every input (the rows are whole
        batches: the data stage trims them)."""
        for start in range(0, len(self) - batch + 1, batch):
            yield {name: arr[start:start + batch] for name, arr in self.inputs.items()}

    def head(self, n: int | None) -> Samples:
        if n is None or n >= len(self):
            return self
        labels = self.labels.head(n) if isinstance(self.labels, CocoLabels) else \
            self.labels[:n] if self.labels is not None else None
        return Samples({k: v[:n] for k, v in self.inputs.items()}, labels, self.source, self.notes)


class Workload(Protocol):
    """A reference model with everything needed to quantize and evaluate it honestly."""

    name: str
    kind: TaskKind
    metric: str
    sha256: str  # of the bundled .onnx, so `deploy run` recognises the model

    def model_path(self) -> Path: ...
    def preprocess(self, image: Image.Image) -> np.ndarray: ...
    def calibration(self, n: int) -> Samples: ...
    def evaluation(self, n: int | None) -> Samples: ...
