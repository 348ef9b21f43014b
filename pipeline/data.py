"""Stage 3 of 8, data: calibration and evaluation samples, from the workload or given by the user (an .npz of input
tensors or a folder of images).

.npz: one array per model input, named like the input (a single-input model may use ``inputs``),
with one sample per row: shape (N, *input_shape[1:]), whatever the batch (a batch-4 model takes 4 rows per
inference); an optional int array ``labels`` (N,) gives classification labels. A folder: images (png/jpg/bmp)
run through the workload's preprocessing; images in sub-folders are labelled by the sorted sub-folder names
(ImageFolder convention).
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import DataError
from pipeline.coco import load_coco
from pipeline.ingest import TensorSpec, batch_of, sample_shape
from pipeline.scoring import Scoring, scoring_for
from pipeline.workloads.base import CocoLabels, Decode, Samples, TaskKind, Workload

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    batch = batch_of(specs)
    for spec in specs:
        key = spec.name if spec.name in arrays else ("inputs" if len(specs) == 1 and "inputs" in arrays else None)
        if key is None:
            raise DataError(
                f"{path} has no array for model input {spec.name!r}",
                value=sorted(arrays), expected=f"an array named {spec.name!r}",
                fix=f"np.savez(path, {spec.name}=x, labels=y)",
            )
        arr = arrays[key]
        want = sample_shape(spec, batch)
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != tuple(want):
            raise DataError(
                f"Array {key!r} in {path} has the wrong shape for input {spec.name!r}",
                value=tuple(arr.shape), expected=f"(N, {', '.join(map(str, want))}): one sample per row",
            )
        if arr.dtype != np.dtype(spec.dtype):
            raise DataError(
                f"Array {key!r} in {path} has the wrong dtype for input {spec.name!r}",
                value=str(arr.dtype), expected=spec.dtype, fix=f"save it with .astype(np.{spec.dtype})",
            )
        inputs[spec.name] = arr
    counts = {len(a) for a in inputs.values()}
    if len(counts) != 1 or 0 in counts:
        raise DataError(f"{path}: inputs have different or zero sample counts", value=sorted(counts))
    return inputs


def _load_npz(path: Path, specs: Sequence[TensorSpec]) -> Samples:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"Cannot read {path} as an .npz file", value=str(exc)[:200],
                        fix="write it with numpy.savez") from exc
    inputs = _check_arrays(path, arrays, specs)
    labels = arrays.get("labels")
    n = len(next(iter(inputs.values())))
    if labels is not None and (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"'labels' in {path} must be integers, one per sample",
                        value=f"{labels.dtype} {labels.shape}", expected=f"int ({n},)")
    return Samples(inputs, labels, source=str(path))


def _load_folder(path: Path, specs: Sequence[TensorSpec], preprocess: Callable[[Image.Image], np.ndarray]) -> Samples:
    if len(specs) != 1:
        raise DataError(f"An image folder can feed only a single-input model; this one has {len(specs)} inputs",
                        value=str(path), fix="give an .npz with one array per input")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files = [(f, classes.index(f.parent.name) if f.parent != path else -1)
             for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"No images in {path}", expected=f"files ending in {', '.join(sorted(IMAGE_SUFFIXES))}")
    rows, labels = [], []
    for file, label in files:
        try:
            with Image.open(file) as image:
                rows.append(preprocess(image)[0])
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Cannot read image {file}", value=str(exc)[:200]) from exc
        labels.append(label)
    inputs = _check_arrays(path, {specs[0].name: np.stack(rows)}, specs)
    has_labels = classes and all(label >= 0 for label in labels)
    return Samples(inputs, np.array(labels, np.int64) if has_labels else None, source=str(path))


def generic_preprocess(spec: TensorSpec) -> Callable[[Image.Image], np.ndarray]:
    """For models no workload knows: resize to the input's HxW, RGB (or grey for 1 channel), scale to [0,1]."""
    channels, height, width = spec.shape[-3:]

    def preprocess(image: Image.Image) -> np.ndarray:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(image, np.float32) / 255.0
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        return arr[None].astype(spec.dtype)

    return preprocess


def load_samples(path: Path, specs: Sequence[TensorSpec], preprocess: Callable[[Image.Image], np.ndarray] | None = None,
                 *, decode: Decode | None = None, images: Path | None = None, limit: int | None = None) -> Samples:
    """Read user data and check it against the model's inputs; every mismatch is one DataError. A .json is COCO
    instances (its images letterboxed as ``decode``'s family does: pipeline/coco.py), read up to ``limit`` images."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data path {path} does not exist", fix="give an .npz file or a folder of images")
    if path.is_dir():
        return _load_folder(path, specs, preprocess or generic_preprocess(specs[0]))
    if path.suffix == ".json":
        if len(specs) != 1:
            raise DataError("COCO annotations feed a single-input model", value=len(specs))
        inputs, labels = load_coco(path, specs[0], decode, images, limit)
        return Samples(inputs, labels, source=f"{path} (COCO, {len(labels)} images, --decode {decode})")
    if path.suffix != ".npz":
        raise DataError(f"Data file {path} is not an .npz", value=path.suffix or "(no suffix)",
                        expected=".npz of input tensors, a folder of images, or COCO instances (.json)")
    return _load_npz(path, specs)


class PreparedData(BaseModel):
    """Calibration and evaluation samples, written to .npz in the run directory."""

    model_config = ConfigDict(frozen=True)
    workload: str | None
    kind: TaskKind | None = Field(description="classifier / detector; None when unknown (no accuracy metric).")
    calibration_path: str | None
    calibration_samples: int
    calibration_source: str
    eval_path: str
    eval_samples: int
    eval_source: str
    has_labels: bool

    @property
    def scoring(self) -> Scoring:
        """How this data's outputs are scored: the metric against its labels, and agreement with fp32."""
        return scoring_for(self.kind)


def whole_batches(samples: Samples, batch: int, what: str) -> Samples:
    """The samples that fill whole batches (a batch-N model runs N rows at a time; the rest is left out, as its
    source says); fewer than one batch is refused."""
    if batch <= 1 or len(samples) % batch == 0:
        return samples
    if len(samples) < batch:
        raise DataError(f"The {what} data has fewer samples than one batch", value=len(samples),
                        expected=f"at least {batch} (the model's batch)",
                        fix="give more samples, or a smaller --batch")
    kept = samples.head(len(samples) - len(samples) % batch)
    left = len(samples) - len(kept)
    return dataclasses.replace(kept, source=f"{samples.source} ({left} left out: whole batches of {batch})")


def prepare_data(
    specs: Sequence[TensorSpec], workload: Workload | None, run_dir: Path, *, scheme: str,
    calib_data: str | None, eval_data: str | None, calib_samples: int, eval_samples: int | None,
    decode: Decode | None = None, images: str | None = None,
) -> PreparedData:
    """Pick the data for this run: the user's if given, else the workload's generator; checked against the model."""
    preprocess = workload.preprocess if workload else None
    folder = Path(images) if images else None
    calibration: Samples | None = None
    if scheme == "int8":
        if calib_data:
            calibration = load_samples(Path(calib_data), specs, preprocess, decode=decode, images=folder,
                                       limit=calib_samples).head(calib_samples)
        elif workload:
            calibration = workload.calibration(calib_samples)
        else:
            raise DataError(
                "int8 needs calibration data, and no reference workload knows this model",
                fix="pass --calib-data PATH (an .npz of inputs or a folder of images; 100-500 samples)",
            )
    if eval_data:
        evaluation = load_samples(Path(eval_data), specs, preprocess, decode=decode, images=folder,
                                  limit=eval_samples).head(eval_samples)
    elif workload:
        evaluation = workload.evaluation(eval_samples)
    else:  # latency and agreement with the fp32 reference still mean something without labels
        from pipeline.ingest import sample_inputs

        n = eval_samples or 8
        rows = [sample_inputs(specs, seed=i) for i in range(n)]
        evaluation = Samples({s.name: np.concatenate([r[s.name] for r in rows]) for s in specs}, None,
                             "random inputs (no --eval-data): no accuracy, agreement only")
    batch = batch_of(specs)
    evaluation = whole_batches(evaluation, batch, "evaluation")
    calibration = whole_batches(calibration, batch, "calibration") if calibration is not None else None
    run_dir.mkdir(parents=True, exist_ok=True)
    calib_path = None
    if calibration is not None:
        calib_path = run_dir / "calibration.npz"
        calibration.save(calib_path)
    eval_path = run_dir / "eval.npz"
    evaluation.save(eval_path)
    return PreparedData(
        workload=workload.name if workload else None,
        kind="coco" if isinstance(evaluation.labels, CocoLabels) else workload.kind if workload else (
            "classifier" if evaluation.labels is not None else None),
        calibration_path=str(calib_path) if calib_path else None,
        calibration_samples=len(calibration) if calibration is not None else 0,
        calibration_source=calibration.source if calibration is not None else "",
        eval_path=str(eval_path), eval_samples=len(evaluation), eval_source=evaluation.source,
        has_labels=evaluation.labels is not None,
    )
