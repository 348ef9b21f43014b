#!/bin/sh
# A Python 3.6 with numpy 1.19 and onnxruntime 1.10 (the newest x86-64 onnxruntime wheel for 3.6) in $1: the device
# runner as a Jetson Nano's JetPack 4.x runs it (Python 3.6; the Jetson Zoo's onnxruntime-gpu there is 1.11), so
# tests/targets/test_device_runner.py measures with it. Without pyenv's 3.6 on this machine the step is skipped and
# that test says so.
set -eu
OUT=$1
PY36=${PY36:-/root/.pyenv/versions/3.6.15/bin/python}
if [ ! -x "$PY36" ]; then
  echo "no Python 3.6 at $PY36: the runner's Python 3.6 tests will skip"
  exit 0
fi
[ -f "$OUT/.ready" ] && exit 0
rm -rf "$OUT"
"$PY36" -m venv "$OUT"
"$OUT/bin/pip" install -q --disable-pip-version-check "pip==21.3.1"   # the last pip that knows manylinux2014 on 3.6
"$OUT/bin/pip" install -q --disable-pip-version-check "numpy==1.19.5" "onnxruntime==1.10.0"
touch "$OUT/.ready"
