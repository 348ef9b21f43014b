"""Where a model's time goes, kernel by kernel, inside the whole model: a TVM library next to onnxruntime.

    .venv/bin/python bench/kernel_profile.py [--runs 100] [--threads 2] [--top 25] LIBRARY_DIR [MODEL.onnx]

LIBRARY_DIR holds a TVM ``model.so`` and its ``manifest.json`` (what ``deploy run`` / ``deploy compile`` write under
$EDGEDEPLOY_HOME/tuned/, or bench/cpu_table.py's --keep). Each kernel call is timed by the Relax VM's instrument hook
(before and after every call, so a call's time includes ~1-2 us of the hook; the whole model is timed without it
first). Kernels timed alone (MetaSchedule's estimate, `deploy tune`) miss what the model around them costs: the
input coming from memory another kernel just wrote rather than from cache, the thread pool waking once per
kernel. MODEL.onnx, if given, runs in onnxruntime with its profiler on, its nodes timed the same way.

TVM's kernels are grouped by kind (:func:`kind`), onnxruntime's nodes by op type, the largest first, then the
slowest one by one. Inputs are random (latency of these CNNs does not depend on the data).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile
import time
from pathlib import Path


def kind(name: str) -> str:
    """A TVM kernel's kind, from its name (the first op of the fused group names it)."""
    if name.startswith("vm.builtin"):
        return "VM built-ins (allocations, checks)"
    if re.search(r"(vnni|avx2|avx512bw|sdot|neon)_(matmul|conv)", name):
        return "integer dot-product kernels (1x1 convs, matmuls)"
    if re.match(r"(fused_)?conv2d", name):
        return "convs"
    if re.search(r"matmul|dense", name):
        return "matmuls"
    if re.search(r"mean|pool", name):
        return "pooling"
    if re.search(r"transpose|reshape", name):
        return "layout (transposes, reshapes)"
    return "other"


def _median_us(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6


def profile_tvm(library: Path, runs: int, rng) -> tuple[float, dict[str, tuple[float, int]]]:
    """(the whole model's p50 in us, kernel -> (median us per call, calls per run))."""
    import numpy as np
    import tvm
    from tvm import relax

    shape = json.loads((library / "manifest.json").read_text())["inputs"][0]["shape"]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library / "model.so")), tvm.cpu())
    x = tvm.runtime.tensor(rng.random(shape, dtype=np.float32))
    for _ in range(5):
        vm["main"](x)
    whole = []
    for _ in range(runs):
        start = time.perf_counter()
        vm["main"](x)
        whole.append(time.perf_counter() - start)
    calls: dict[str, list[float]] = collections.defaultdict(list)
    started: list[float] = [0.0]

    def hook(func, name, before_run, ret_value, *args):  # noqa: ARG001 - the VM's instrument signature
        now = time.perf_counter()
        if before_run:
            started[0] = now
        else:
            calls[name].append(now - started[0])
        return 0  # carry on

    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](x)
    return _median_us(whole), {name: (_median_us(v), len(v) // runs) for name, v in calls.items()}


def profile_onnxruntime(model: Path, threads: int, runs: int, rng) -> dict[str, tuple[float, int]]:
    """node (name, op type) -> (median us per call, calls per run), from onnxruntime's own profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = rng.random([d if isinstance(d, int) else 1 for d in spec.shape], dtype="float32")
    for _ in range(runs + 5):
        session.run(None, {spec.name: x})
    trace = Path(session.end_profiling())
    nodes: dict[str, list[float]] = collections.defaultdict(list)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            nodes[f"{event['args'].get('op_name')} {event['name'][:-len('_kernel_time')]}"].append(event["dur"] * 1e-6)
    trace.unlink()
    return {name: (_median_us(v), max(1, len(v) // (runs + 5))) for name, v in nodes.items()}


def _print(title: str, timings: dict[str, tuple[float, int]], top: int, kind_of) -> None:
    total = sum(us * n for us, n in timings.values())
    print(f"\n{title}: {len(timings)} kernels, their medians x calls add up to {total:.0f} us")
    by_kind: collections.Counter[str] = collections.Counter()
    for name, (us, n) in timings.items():
        by_kind[kind_of(name)] += us * n
    for name, us in by_kind.most_common():
        print(f"  {us:9.1f} us {100 * us / total:5.1f} %  {name}")
    print(f"  the {top} slowest:")
    for name, (us, n) in sorted(timings.items(), key=lambda item: -item[1][0] * item[1][1])[:top]:
        print(f"  {us:9.1f} us x{n}  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np

    rng = np.random.default_rng(0)
    whole, kernels = profile_tvm(args.library, args.runs, rng)
    print(f"TVM {args.library}: the whole model {whole:.0f} us p50 on {args.threads} threads")
    _print("TVM, in the model", kernels, args.top, kind)
    if args.model:
        nodes = profile_onnxruntime(args.model, args.threads, args.runs, rng)
        _print(f"onnxruntime {args.model}", nodes, args.top, lambda name: name.split()[0])  # by op type


if __name__ == "__main__":
    main()
