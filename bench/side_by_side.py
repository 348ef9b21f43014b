"""Time compiled TVM libraries and onnxruntime models side by side in one process, in alternating rounds.

    .venv/bin/python bench/side_by_side.py [--rounds 20] [--runs 5] [--threads 2] FIRST OTHER...

Each argument is an .onnx file (onnxruntime, CPU) or a directory holding a TVM ``model.so`` and its
``manifest.json`` (what ``deploy run`` / ``deploy compile`` write under $EDGEDEPLOY_HOME/tuned/). Every round
runs each one ``--runs`` times in turn, so a machine whose speed drifts slows them all alike; ratios are to the
first. Inputs are random (latency of these CNNs does not depend on the data).

Between two runtimes' turns it waits ``--settle`` seconds: after its last call, each runtime's thread pool keeps
spinning for a while (measured here after PP-LCNet: TVM ~0.1 s of CPU within 0.2 s, onnxruntime 0.03-0.06 s), and
a runtime whose turn starts meanwhile shares the two cores with it. Without the wait onnxruntime fp32 ran
PP-LCNet in 9.2 ms next to TVM, 4.7 ms alone (`docs/lab-x86/int8-float-between.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def _runner(path: Path, threads: int, rng) -> Callable[[], object]:
    import numpy as np

    if path.suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        x = rng.random([d if isinstance(d, int) else 1 for d in spec.shape], dtype=np.float32)
        return lambda: session.run(None, {spec.name: x})
    import tvm
    from tvm import relax

    shape = json.loads((path / "manifest.json").read_text())["inputs"][0]["shape"]
    main = relax.VirtualMachine(tvm.runtime.load_module(str(path / "model.so")), tvm.cpu())["main"]
    x = tvm.runtime.tensor(rng.random(shape, dtype=np.float32))
    return lambda: main(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds between two runtimes' turns")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np

    rng = np.random.default_rng(0)
    runners = {path: _runner(path, args.threads, rng) for path in args.paths}
    for run in runners.values():
        for _ in range(3):  # warm-up
            run()
    seconds: dict[Path, list[float]] = {path: [] for path in args.paths}
    for _ in range(args.rounds):
        for path, run in runners.items():
            time.sleep(args.settle)  # the previous runtime's spinning threads go idle first
            for _ in range(args.runs):
                start = time.perf_counter()
                run()
                seconds[path].append(time.perf_counter() - start)
    first = float(np.median(seconds[args.paths[0]]))
    for path in args.paths:
        p50 = float(np.median(seconds[path]))
        print(f"{p50 * 1e3:9.2f} ms p50  {np.percentile(seconds[path], 10) * 1e3:9.2f} ms p10  "
              f"{p50 / first:5.2f}x the first  {path}")


if __name__ == "__main__":
    main()
