"""Images for the model zoo: scenes of shapes on gradients, drawn with Pillow from a seed (no dataset to download).

Not photographs, but real image statistics where it matters for calibration and agreement: smooth regions, edges,
colour, texture noise. Both the exporter (to settle each BatchNorm's statistics) and the runner (calibration and
evaluation data) draw from here, each with its own seeds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def scene(size: int, seed: int) -> Image.Image:
    """One RGB scene: a two-colour gradient, 4-12 filled shapes, a little blur and sensor noise."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 13)):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.5))))
    noisy = np.asarray(image, np.float32) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def batch(count: int, size: int, *, seed: int, normalise: str = "imagenet") -> np.ndarray:
    """``count`` scenes as float32 NCHW: ImageNet mean/std (classifiers, segmentation) or [0, 1] (YOLO)."""
    rows = []
    for i in range(count):
        pixels = np.asarray(scene(size, seed * 100_003 + i), np.float32) / 255.0
        if normalise == "imagenet":
            pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
        rows.append(pixels.transpose(2, 0, 1))
    return np.stack(rows).astype(np.float32)
