"""One 3x3 conv layer, tuned the same number of trials per task, as a direct conv and by Winograd F(4x4, 3x3)
(pipeline.compiler.passes.winograd); by default YOLOX's heaviest: 96 -> 96 channels at 52x52, bias, SiLU.

    .venv/bin/python bench/winograd_layer.py [--channels 96] [--size 52] [--trials 48] [--rounds 10]

The layer sits between two 1x1 convs (as in YOLOX's bottlenecks), so that the permutes at the network's ends
are not fused into it. Prints, for each variant, the tuned kernels' best times from its database and the layer's
kernels timed in the built library (Relax VM, both libraries in turns), with the largest difference from
onnxruntime's output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layers(channels: int, size: int):
    """x -> 1x1 conv -> SiLU -> 3x3 conv -> SiLU -> 1x1 conv -> SiLU, random weights: ONNX model and an input."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, name = [], [], "x"
    for i, k in enumerate((1, 3, 1)):
        w = rng.standard_normal((channels, channels, k, k)) / np.sqrt(k * k * channels)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [name, f"w{i}", f"b{i}"], [f"c{i}"], pads=[k // 2] * 4, kernel_shape=[k, k]),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"y{i}"])]
        name = f"y{i}"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model, rng.standard_normal(shape).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--size", type=int, default=52)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from pipeline.compiler.passes.fastmath import fast_math
    from pipeline.compiler.passes.layout import channels_last
    from pipeline.compiler.passes.winograd import count_winograd_convs, winograd_convs
    from pipeline.compiler.tuning.search import tune_and_compile
    from targets.device_runner import kernel_times

    model, x = layers(args.channels, args.size)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    target = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
    machines = {}
    for variant in ("direct", "winograd"):
        mod = channels_last(from_onnx(model, shape_dict={"x": list(x.shape)}, keep_params_in_input=False))
        if variant == "winograd":
            mod = winograd_convs(mod)
            assert count_winograd_convs(mod) == 1
        mod, _ = fast_math(mod)
        executable, tuning = tune_and_compile(mod, target, args.trials, Path(tempfile.mkdtemp()) / "db")
        vm = relax.VirtualMachine(executable, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        machines[variant] = vm
        print(f"{variant}: {tuning.tasks} tasks, {tuning.records} trials, {tuning.seconds:.0f} s of tuning; "
              f"max |difference| from onnxruntime {np.abs(got - expected).max():.2e}", file=sys.stderr)
    rows: dict[str, dict[str, list[float]]] = {variant: {} for variant in machines}
    for _ in range(args.rounds):  # in turns: this machine's speed drifts
        for variant, vm in machines.items():
            kernels, _ = kernel_times(vm, lambda vm=vm: vm["main"](tvm.runtime.tensor(x)), 20)
            for kernel in kernels:
                if not kernel["name"].startswith("vm.builtin"):
                    rows[variant].setdefault(kernel["name"], []).append(kernel["us"])
    print("| variant | kernel | median us per inference |\n|---|---|---|")
    for variant, kernels in rows.items():
        for name, times in kernels.items():
            print(f"| {variant} | {name} | {np.median(times):.0f} |")
        print(f"| {variant} | **all** | **{sum(np.median(t) for t in kernels.values()):.0f}** |")


if __name__ == "__main__":
    main()
