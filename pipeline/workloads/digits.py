"""Digits: a small CNN trained by the repo on scikit-learn's 1,797 real 8x8 handwritten digits.

The accuracy case: the data is real and labelled, so int8 loss shows up as lost top-1 points.
The model and the script that trained it live in assets/ (seed and split below).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.workloads.base import Samples

SEED = 20261121
TEST_FRACTION = 0.25


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): stratified, seeded; x is float32 [N,1,8,8] in [0,1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test


class DigitsWorkload:
    name = "digits-cnn"
    kind = "classifier"
    metric = "top1"
    sha256 = "d063c4544ce8a4f2881675c852301bedeb5226d26afa5050bab0594d10af4758"
    input_name = "image"

    def model_path(self) -> Path:
        return Path(__file__).with_name("assets") / "digits_cnn.onnx"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        grey = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
        return (grey / 255.0)[None, None]

    def calibration(self, n: int) -> Samples:
        x_train, _, _, _ = load_split()
        return Samples({self.input_name: x_train[:n]}, None, "sklearn digits, training split")

    def evaluation(self, n: int | None) -> Samples:
        _, _, x_test, y_test = load_split()
        return Samples({self.input_name: x_test}, y_test, "sklearn digits, held-out 25 % split").head(n)
