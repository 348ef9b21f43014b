"""Build a model for this machine twice, TVM's plain build (every kernel a naive loop: what an untuned build was
until default schedules) and with default schedules (pipeline/compiler/tuning/defaults.py), into directories that
bench/side_by_side.py times next to onnxruntime fp32:

    .venv/bin/python bench/default_schedules.py MODEL.onnx|WORKLOAD OUT_DIR
    .venv/bin/python bench/side_by_side.py OUT_DIR/model.onnx OUT_DIR/plain OUT_DIR/default
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import tvm

from pipeline.compiler.build import _cpu_build
from pipeline.compiler.frontend import relax_module, resolve_target
from pipeline.compiler.tuning.defaults import vector_lanes
from pipeline.ingest import ingest
from pipeline.quantize import QuantConfig, QuantizedModel
from pipeline.workloads import WORKLOADS
from targets.hashing import sha256_file
from targets.profiles import load_profile


def main(argv: list[str]) -> int:
    model = Path(argv[0]) if Path(argv[0]).exists() else WORKLOADS[argv[0]].model_path()
    out = Path(argv[1])
    info = ingest(model, out / "ingest")
    shutil.copyfile(info.prepared_path, out / "model.onnx")
    quantized = QuantizedModel(path=info.prepared_path, sha256=sha256_file(Path(info.prepared_path)),
                               config=QuantConfig(scheme="fp32"))
    profile = load_profile("local")
    cpu = resolve_target(profile)
    mod, _ = relax_module(quantized, info, profile)
    builds = {"plain": tvm.compile(mod, target=tvm.target.Target(cpu)),
              "default": _cpu_build(mod, cpu, vector_lanes(profile))[0]}
    for name, executable in builds.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        executable.export_library(str(folder / "model.so"))
        (folder / "manifest.json").write_text(json.dumps({"inputs": [spec.model_dump() for spec in info.inputs]}))
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
