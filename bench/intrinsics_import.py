"""What registering TVM's tensor intrinsics costs a process: TVM's whole set (`import tvm.s_tir.tensor_intrin`, what
MetaSchedule's TuneContext does) against the target's own (pipeline.compiler.intrinsics, here x86).

    .venv/bin/python bench/intrinsics_import.py [--rounds 3] [--bare]

Each measurement is a fresh Python that first loads what the `deploy` process has loaded when it builds (TVM,
Prefect, SciPy's stats, onnxruntime; --bare: TVM alone), then registers the intrinsics; the CPU seconds of that
step alone are printed. The two ways take turns, round after round, so that a machine slowing down in between
slows both.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = {"deploy": "import tvm, prefect, scipy.stats, onnxruntime", "bare": "import tvm"}
WAYS = {
    "TVM's whole set": "import tvm.s_tir.tensor_intrin",
    "the target's (x86)": "from pipeline.compiler.intrinsics import load_tensor_intrinsics\n"
                          "load_tensor_intrinsics(tvm.target.Target({'kind': 'llvm', 'mtriple': 'x86_64-linux-gnu'}))",
}


def cpu_seconds(prelude: str, registration: str) -> float:
    code = f"{prelude}\nimport time\nstart = time.process_time()\n{registration}\nprint(time.process_time() - start)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(proc.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", action="store_true", help="load TVM alone first, not the deploy process's modules")
    args = parser.parse_args()
    prelude = PRELUDE["bare" if args.bare else "deploy"]
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        ways = list(WAYS) if round_ % 2 == 0 else list(reversed(WAYS))
        for way in ways:
            seconds[way].append(cpu_seconds(prelude, WAYS[way]))
            print(f"round {round_ + 1}: {way}: {seconds[way][-1]:.2f} s CPU", flush=True)
    print(f"\nafter `{prelude}`, CPU seconds to register the intrinsics (median of {args.rounds}):")
    for way, values in seconds.items():
        print(f"  {way:<20} {statistics.median(values):7.2f}  (all: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
