"""Run a command against the x86 lab device: a real sshd on 127.0.0.1 (own host key, user key, port) whose
Python is this project's, as the tests' `lab_x86` fixture starts it; `{profile}` in the command becomes the
profile file that reaches it.

    .venv/bin/python scripts/with_lab_x86.py deploy bench --profile {profile} --out docs
    .venv/bin/python scripts/with_lab_x86.py --extends x86-server-vnni deploy run ... --profile {profile}

The device's class is `x86-server` (AVX2, no VNNI) unless `--extends` names another profile. An aarch64 one
(`--extends raspberry-pi-5`) makes it the emulated board of the tests' `lab_pi4` fixture instead: the same sshd,
whose Python is arm64 Debian's under qemu-aarch64 (scripts/make_aarch64_root.sh), with the runtimes its wheels are.
Its timings are an emulator's: what it proves is the path (cross-compiled code, tuning over SSH, accuracy).

The device, its keys and its working directory live in a temporary folder removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targets.profiles import load_profile  # noqa: E402
from tests.lab import aarch64_python, start_sshd, x86_python  # noqa: E402

EMULATED_RUNTIMES = {"tvm": "0.27.0", "onnxruntime": "1.27.0"}  # the emulated board's wheels


def main(argv: list[str]) -> int:
    extends = "x86-server"
    if argv[:1] == ["--extends"] and len(argv) > 1:
        extends, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    emulated = load_profile(extends).cpu.arch == "aarch64"
    name = "lab-aarch64" if emulated else "lab-x86"
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as base:
        device = start_sshd(Path(base) / "device", name)
        try:
            # The profile's CPU class with this machine's core count, so that neither
            # runtime starts more threads than there are cores.
            extra = {}
            python = x86_python()
            if emulated:
                python, extra = aarch64_python(), {"runtimes": EMULATED_RUNTIMES}
                if python is None:
                    print("the emulated aarch64 board is not built: run `make setup`", file=sys.stderr)
                    return 2
            profile = device.profile(extends=extends, python=python, cpu={"cores": os.cpu_count()}, **extra)
            command = [part.replace("{profile}", str(profile)) for part in argv]
            if command[0] == "deploy":
                command = [sys.executable, "-m", "edgedeploy", *command[1:]]
            print(f"{name}: sshd on 127.0.0.1:{device.port}, profile {profile}", file=sys.stderr)
            return subprocess.run(command).returncode
        finally:
            device.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
