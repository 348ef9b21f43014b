"""bench/kernel_profile.py on the digits CNN: every kernel of a real TVM library timed inside the model, next to
onnxruntime's own profile of the same model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline.compiler.build import compile_model
from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig, quantize
from pipeline.workloads import WORKLOADS
from targets.profiles import load_profile

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernel_profile.py"


def test_every_kernel_is_timed_in_the_model_and_onnxruntime_beside_it(tmp_path):
    model = WORKLOADS["digits-cnn"].model_path()
    info = ingest(model, tmp_path / "ingest")
    q = quantize(tmp_path / "ingest" / "model.static.onnx", tmp_path, QuantConfig(), None)
    (tmp_path / "lib").mkdir()
    compile_model(q, info, load_profile("local"), tmp_path / "lib")

    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "lib"), str(model), "--runs", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"the whole model \d+ us p50 on 2 threads", out)
    tvm_part, ort_part = out.split("\nonnxruntime ")
    # the CNN's three convs, kernels of their own in the library, each timed once per run where it ran
    assert re.search(r"TVM, in the model: \d+ kernels, their medians x calls add up to \d+ us", tvm_part)
    assert re.search(r"\d+\.\d us +\d+\.\d % +convs", tvm_part)
    assert len(re.findall(r" us x1  fused_conv2d", tvm_part)) == 3
    assert re.search(r"\d+ kernels, their medians x calls add up to \d+ us", ort_part)
    assert re.search(r"us x1  Conv ", ort_part) and re.search(r"us x1  Gemm ", ort_part)
