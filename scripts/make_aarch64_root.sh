#!/usr/bin/env bash
# Build an arm64 Debian Python 3.11 with the aarch64 TVM, onnxruntime and numpy wheels, to run under
# qemu-aarch64: the emulated Raspberry Pi (4 or 5) of the test lab. Idempotent; run as root (apt).
#   scripts/make_aarch64_root.sh DEST   (default .lab/aarch64)
set -euo pipefail
dest=${1:-.lab/aarch64}
root="$dest/root"
site="$dest/site"
pip=${PIP:-pip}

# aarch64_wheels GROUP REQUIREMENT...: download aarch64 wheels into wheels/GROUP, unpack them into the site directory.
aarch64_wheels() {
  local group="$dest/wheels/$1"
  shift
  "$pip" download --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --dest "$group" "$@"
  for whl in "$group"/*.whl; do python3 -m zipfile -e "$whl" "$site"; done
}

if [ ! -e "$dest/.ready" ]; then
  mkdir -p "$root" "$site" "$dest/debs" "$dest/wheels"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  apt-get update -o Acquire::Languages=none
  ( cd "$dest/debs" && apt-get download \
      python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64 zlib1g:arm64 \
      libexpat1:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 \
      libstdc++6:arm64 libgcc-s1:arm64 libgomp1:arm64 libzstd1:arm64 libncursesw6:arm64 libtinfo6:arm64 \
      libreadline8:arm64 libuuid1:arm64 libdb5.3:arm64 libgdbm6:arm64 libnsl2:arm64 libtirpc3:arm64 \
      libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 libcom-err2:arm64 libkrb5support0:arm64 \
      libkeyutils1:arm64 libcrypt1:arm64 mime-support media-types )
  for deb in "$dest"/debs/*.deb; do dpkg -x "$deb" "$root"; done

  # onnxruntime 1.28+ for aarch64 dies with SIGSEGV at import under Debian 12's qemu-user 7.2 (1.27.0 is
  # the newest that runs there; real boards are unaffected), so the emulated board gets 1.27.0.
  aarch64_wheels runtimes "apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post1" "onnxruntime==1.27.0" "numpy==2.4.6" \
    typing_extensions ml_dtypes flatbuffers packaging protobuf coloredlogs humanfriendly sympy mpmath
  touch "$dest/.ready"
fi

# TVM's RPC server, for tuning with every candidate timed on the board (pipeline.compiler.tuning.board): its `rpc` extra.
if [ ! -d "$site/cloudpickle" ] || [ ! -d "$site/psutil" ]; then
  aarch64_wheels rpc cloudpickle psutil
fi

# The board's `python3`: qemu-aarch64 with itself as argv[0] (qemu -0), so sys.executable is this script and a
# Python the board's Python starts (TVM's RPC server starts its worker so) runs under qemu too: no binfmt_misc here.
root_abs=$(realpath "$root") site_abs=$(realpath "$site")
cat > "$dest/python3" <<WRAPPER
#!/bin/sh
exec env PYTHONPATH=$site_abs qemu-aarch64 -L $root_abs -0 "\$0" $root_abs/usr/bin/python3.11 "\$@"
WRAPPER
chmod +x "$dest/python3"
echo "aarch64 Python ready: $dest/python3"
