#!/bin/sh
# The model zoo's exporter environment in $1 (default .lab/zoo): PyTorch 2.13.0 CPU (the wheel on this kind of
# machine's disk; a plain `torch` would pull several GB of CUDA packages), torchvision 0.28.0's architectures and
# Ultralytics' YOLOv8 definitions, both without their compiled extras (no weights are ever downloaded: the zoo is
# random-initialised, see scripts/zoo_export.py). Only `make zoo` needs it; the tests never do.
set -eu
OUT=${1:-.lab/zoo}
PYTHON=${PYTHON:-python3}
[ -f "$OUT/.ready" ] && exit 0
rm -rf "$OUT"
"$PYTHON" -m venv "$OUT"
PIP="$OUT/bin/pip"
"$PIP" install -q --disable-pip-version-check "torch==2.13.0" "onnx==1.23.2" numpy pillow
# torchvision's wheel is built against a CUDA torch: its C extension (nms, roi_align) can't load beside the CPU
# torch, and the classification/segmentation models never call it (zoo_export.py declares the two ops it names).
"$PIP" install -q --disable-pip-version-check --no-deps "torchvision==0.28.0" "ultralytics==8.4.190" \
  "ultralytics-thop==2.2.3"
"$PIP" install -q --disable-pip-version-check matplotlib opencv-python-headless pyyaml requests psutil polars
touch "$OUT/.ready"
