"""User data: wrong shapes, dtypes and formats are one clear DataError each."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgedeploy.errors import DataError
from pipeline.data import load_samples, prepare_data
from pipeline.ingest import TensorSpec
from pipeline.workloads.base import Samples

SPEC = [TensorSpec(name="x", shape=(1, 3, 8, 8), dtype="float32")]


def test_npz_by_input_name_with_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float32), labels=np.arange(5))
    samples = load_samples(path, SPEC)
    assert len(samples) == 5 and list(samples.labels) == [0, 1, 2, 3, 4]


def test_wrong_shape_names_file_and_expected_shape(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="wrong shape") as info:
        load_samples(path, SPEC)
    assert str(path) in str(info.value) and "(N, 3, 8, 8)" in info.value.expected


def test_wrong_dtype(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 3, 8, 8), np.float64))
    with pytest.raises(DataError, match="wrong dtype") as info:
        load_samples(path, SPEC)
    assert "astype(np.float32)" in info.value.fix


def test_missing_input_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((5, 3, 8, 8), np.float32), other=np.zeros(2))
    with pytest.raises(DataError, match="no array for model input 'x'"):
        load_samples(path, SPEC)


def test_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="Cannot read"):
        load_samples(path, SPEC)


def test_image_folder_with_class_subfolders(tmp_path):
    for label, colour in (("cat", 10), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), (colour, colour, colour)).save(tmp_path / label / f"{i}.png")
    samples = load_samples(tmp_path, SPEC)
    assert samples.inputs["x"].shape == (4, 3, 8, 8)
    assert list(samples.labels) == [0, 0, 1, 1]


def test_int8_for_unknown_model_needs_calibration_data(tmp_path):
    with pytest.raises(DataError, match="--calib-data"):
        prepare_data(SPEC, None, tmp_path, scheme="int8", calib_data=None, eval_data=None,
                     calib_samples=10, eval_samples=None)


def test_detector_labels_round_trip(tmp_path):
    boxes = [np.array([[1, 2, 3, 4]], np.float32), np.zeros((0, 4), np.float32), np.ones((2, 4), np.float32)]
    Samples({"x": np.zeros((3, 3, 8, 8), np.float32)}, boxes).save(tmp_path / "s.npz")
    loaded = Samples.load(tmp_path / "s.npz", ["x"])
    assert [b.tolist() for b in loaded.labels] == [b.tolist() for b in boxes]
