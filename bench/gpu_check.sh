#!/usr/bin/env bash
# The GPU check: TVM libraries compiled on a machine without a GPU (Jetson Nano sm_53 device code, JIT-compiled by
# the driver from PTX, and sm_90 cubins), run on an NVIDIA GPU machine with no TVM installed; prints one table.
#
#   here (no GPU):   .venv/bin/python bench/gpu_check/prepare.py        # writes bench/gpu_check/bundle (< 60 MB)
#   carry:           bench/gpu_check/bundle                             # with the repository's tracked files
#   there (GPU):     bash bench/gpu_check.sh [--only TEXT] [--min-runs N] [--min-seconds S]
#
# Needs there: python3 (3.12, or 3.11) with numpy, an NVIDIA driver and libcudart.so.13 (CUDA 13); onnxruntime
# (CPU) optional, for the CPU baseline. Exit 0 all OK, 1 a library failed, 2 no CUDA device. With $OUT set, the
# table is also written to $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check/run_on_gpu.py bench/gpu_check/bundle "$@"
