"""What a workload is: a model family with its preprocessing, its data and its metric."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

TaskKind = Literal["classifier", "detector"]


@dataclass
class Samples:
    """Model inputs, one sample per row (each row is fed as a batch of one), and optional labels.

    ``labels`` is an int array [N] for classifiers; for detectors a list of [K,4] xyxy boxes per
    sample, in model-input pixels.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | list[np.ndarray] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def save(self, path: Path) -> None:
        """Write to .npz: one array per input, plus ``labels`` (classifier) or ``boxes``/``box_owner`` (detector)."""
        extra: dict[str, np.ndarray] = {}
        if isinstance(self.labels, np.ndarray):
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
            labels: np.ndarray | list[np.ndarray] | None = None
            if "labels" in npz.files:
                labels = npz["labels"]
            elif "boxes" in npz.files:
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
        labels = self.labels[:n] if self.labels is not None else None
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
