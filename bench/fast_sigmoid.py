"""How long exp and sigmoid take per element in a TVM CPU kernel: TVM's own against pipeline.compiler.passes.fastmath's;
and a quantize (round, add the zero point, clip) dividing by its scale against multiplying by the reciprocal.

    .venv/bin/python bench/fast_sigmoid.py [--elements 1048576] [--threads 2]

One kernel per function over a float32 vector, 16 lanes at a time, split over the threads, on this machine's
CPU (the target LLVM detects). A multiply is the floor: what reading and writing the data costs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import tvm
    from tvm import s_tir, te, tirx

    from pipeline.compiler.passes.fastmath import fast_exp, fast_sigmoid

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": args.threads})
    n = args.elements
    x = tvm.runtime.tensor(np.random.default_rng(0).uniform(-8, 8, n).astype(np.float32))
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    functions = {"tvm exp": tirx.exp, "tvm sigmoid": tirx.sigmoid, "fast_exp": fast_exp,
                 "fast_sigmoid": fast_sigmoid, "multiply (floor)": lambda v: v * tirx.const(1.5, "float32"),
                 "quantize, divide": lambda v: quantize(v / tirx.const(0.047, "float32")),
                 "quantize, reciprocal": lambda v: quantize(v * tirx.const(1 / 0.047, "float32"))}

    def quantize(scaled):
        f32 = functools.partial(tirx.const, dtype="float32")
        return tirx.max(tirx.min(tirx.round(scaled) + f32(128.0), f32(255.0)), f32(0.0))
    print(f"{n} float32 elements, {args.threads} threads, {target.attrs['mcpu']}")

    def elementwise(scalar):
        a = te.placeholder((n,), "float32", name="a")
        return te.create_prim_func([a, te.compute((n,), lambda i: scalar(a[i]), name="b")])

    for name, scalar in functions.items():
        schedule = s_tir.Schedule(elementwise(scalar))
        (loop,) = schedule.get_loops(schedule.get_sblock("b"))
        outer, lanes = schedule.split(loop, [None, 16])
        schedule.parallel(outer)
        schedule.vectorize(lanes)
        library = tvm.compile(schedule.mod, target=target)
        timer = library.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=5, min_repeat_ms=50)
        seconds = sorted(timer(x, y).results)
        print(f"  {name:18s} {seconds[len(seconds) // 2] * 1e9 / n:7.2f} ns/element (median of 5)")


if __name__ == "__main__":
    main()
