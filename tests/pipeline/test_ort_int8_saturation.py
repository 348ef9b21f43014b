"""Why onnxruntime's int8 run of a QDQ model is no reference for TVM's integer kernels, shown on an x86 CPU without
VNNI whatever CPU runs the suite: this interpreter under qemu-x86_64 as a Haswell (AVX2, no AVX-512).

There onnxruntime multiplies uint8 activations (int8 ones are shifted to uint8 first) by int8 weights with
VPMADDUBSW, which adds each pair of products into 16 bits and saturates (255 x 127 x 2 > 32767): outputs drift by
many quantization steps from what the model defines (tests.qdq_reference). With 7-bit weights (reduce_range, what
the checks switch to on such a CPU) no pair can overflow and the result is exact again. Where the CPU has VNNI
(vpdpbusd adds in 32 bits) all are exact.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads.base import Samples
from tests.pipeline.test_tvm_int8 import CALIBRATION_RANGE, _output_step, _small_model
from tests.qdq_reference import QdqReference

pytestmark = pytest.mark.slow

HASWELL = "Haswell-noTSX"
_RUN = """
import sys
import numpy as np
import onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__ as cpu

model, inputs, out = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
xs = np.load(inputs)
np.savez(out, y=np.concatenate([session.run(None, {"x": x[None]})[0] for x in xs]),
         avx2=cpu["AVX2"], avx512=cpu["AVX512F"])
"""


def _on_haswell(tmp_path, model: str, xs: np.ndarray) -> np.ndarray:
    """onnxruntime's outputs for ``xs``, computed on an emulated Haswell."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing: run `make setup` (apt package qemu-user)")
    script, inputs, out = tmp_path / "run.py", tmp_path / "inputs.npy", tmp_path / "out.npz"
    script.write_text(_RUN)
    np.save(inputs, xs)
    done = subprocess.run([qemu, "-cpu", HASWELL, sys.executable, str(script), model, str(inputs), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = np.load(out)
    assert result["avx2"] and not result["avx512"]  # the CPU this is about: AVX2 and nothing wider
    return result["y"]


@pytest.mark.parametrize(("activations", "reduce_range", "steps_off"), [
    ("uint8", False, "many"), ("int8", False, "many"), ("uint8", True, "none")])
def test_onnxruntime_int8_saturates_without_vnni_unless_weights_have_7_bits(tmp_path, activations, reduce_range,
                                                                            steps_off):
    onnx.save(_small_model(), str(tmp_path / "small.onnx"))
    rng = np.random.default_rng(1)
    calibration = Samples({"x": rng.uniform(*CALIBRATION_RANGE, (16, 3, 8, 8)).astype(np.float32)})
    config = QuantConfig(scheme="int8", activation_type=activations, reduce_range=reduce_range)
    path = quantize(tmp_path / "small.onnx", tmp_path, config, calibration).path
    xs = rng.uniform(*CALIBRATION_RANGE, (8, 3, 8, 8)).astype(np.float32)
    reference = QdqReference(path)
    exact = np.concatenate([reference.run(None, {"x": x[None]})[0] for x in xs])

    off = np.abs(_on_haswell(tmp_path, path, xs) - exact).max() / _output_step(path)
    if steps_off == "many":
        assert off >= 5, f"{off:.1f} steps: expected VPMADDUBSW's 16-bit saturation to show"  # 29 measured
    else:
        assert off <= 1, f"{off:.1f} steps"  # 0 measured
