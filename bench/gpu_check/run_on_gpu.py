"""GPU check, the GPU machine's side: run every TVM library of a bundle (bench/gpu_check/prepare.py) on CUDA device 0,
compare it with onnxruntime's CPU reference computed where the bundle was built, time it, and print ONE table.

    python3 bench/gpu_check/run_on_gpu.py BUNDLE [--only TEXT ...] [--min-runs 20] [--min-seconds 1]

Why a script of its own: the GPU machine has no TVM and no way to install it, so this uses only the standard library,
numpy, the bundle's runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``: no compiler library) and, where installed,
onnxruntime for a CPU baseline. It imports nothing from the repository.

What runtime-only TVM needs that ``import tvm`` does not do: in that mode TVM loads no backend, so its CUDA runtime
(``tvm/lib/libtvm_runtime_cuda.so``, NEEDED libcudart.so.13 and libcuda.so.1) is loaded here, after libcudart.so.13
is found (the loader's path, a CUDA toolkit folder, or a pip ``nvidia`` package such as PyTorch's).

Each library runs in a child process (a crash or a broken CUDA context costs one row, never the table), with
``CUDA_CACHE_DISABLE=1`` so the driver really JIT-compiles the sm_53 PTX: that is in "first run s" of those rows
(libraries for another SM than the GPU's run from their PTX; the sm_90 cubin loads as it is). Latency is end to end,
as an application sees it: input copied to the GPU, the model, output copied back (``.numpy()``, which synchronises).

Exit: 0 every row OK, 1 a row failed, 2 no CUDA device (the first line says why).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COSINE_NEEDED = {"fp32": 0.9999, "fp16": 0.999}
CUDART = "libcudart.so.13"
CUDART_FOLDERS = ("/usr/local/cuda/lib64", "/usr/local/cuda-*/lib64", "/usr/local/cuda-*/lib",
                  "/usr/local/cuda*/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu")
COLUMNS = (("model", "model"), ("device code", "device_code"), ("scheme", "scheme"), ("load s", "load_s"),
           ("first run s", "first_run_s"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"),
           ("ORT CPU p50 ms", "ort_cpu_p50_ms"), ("speed-up", "speedup"), ("max abs err", "max_abs_err"),
           ("cosine", "cosine"), ("top-1 agree", "top1_agreement"), ("verdict", "verdict"))


def decode_input(stored: np.ndarray, scale: float) -> np.ndarray:
    """A model input as fed, from its stored form (uint8 pixels, or float16): prepare.py computes the
    references from exactly this."""
    return stored.astype(np.float32) * np.float32(scale)


def load_samples(npz_path: Path, input_names: list[str]) -> tuple[list[list[np.ndarray]], np.ndarray, int]:
    """Per sample, its inputs as batches of one in the model's order; the reference first outputs (of a large output,
    every k-th element per sample); and that k."""
    with np.load(npz_path) as npz:
        columns = [decode_input(npz["input." + name], float(npz["scale." + name])) for name in input_names]
        reference, stride = npz["reference"], int(npz["reference_stride"])
    return [[column[i:i + 1] for column in columns] for i in range(len(reference))], reference, stride


def gpu_facts() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi not usable ({type(exc).__name__}: {exc})"
    return (done.stdout.strip() or done.stderr.strip() or f"nvidia-smi exit {done.returncode}").replace("\n", "; ")


def import_bundled_tvm(bundle: Path):
    """The bundle's runtime-only TVM, ahead of anything installed."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # else tvm_ffi imports torch and may build C++
    os.environ.setdefault("CUDA_CACHE_DISABLE", "1")  # every sm_53 load really JIT-compiles its PTX
    sys.path.insert(0, str(bundle / "site"))
    sys.dont_write_bytecode = True  # the bundle stays as prepared (and as small)
    import tvm
    import tvm.runtime.vm  # noqa: F401  (the Relax VM, in libtvm_runtime itself)

    return tvm


def load_tvm_cuda_runtime(tvm) -> str | None:
    """Load TVM's CUDA side library (runtime-only TVM does not); None when loaded, else why not."""
    candidates = [CUDART] + [path for folder in CUDART_FOLDERS for path in sorted(glob.glob(f"{folder}/{CUDART}"))]
    candidates += sorted(p for entry in sys.path for p in glob.glob(f"{entry}/nvidia/**/{CUDART}", recursive=True))
    tried = []
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as exc:
            tried.append(str(exc))
    side = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(side), mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        cudart = f"; {CUDART} not found ({tried[0]})" if len(tried) == len(candidates) else ""
        return f"TVM's CUDA runtime {side.name} did not load: {exc}{cudart}"
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(call, samples: list, args) -> list[float]:
    """Warm-up runs, then at least ``min_runs`` timed runs lasting ``min_seconds`` (``max_seconds`` at most)."""
    for i in range(args.warmup):
        call(samples[i % len(samples)])
    latencies: list[float] = []
    started = time.perf_counter()
    while (len(latencies) < args.min_runs or time.perf_counter() - started < args.min_seconds) \
            and time.perf_counter() - started < args.max_seconds:
        sample = samples[len(latencies) % len(samples)]
        t = time.perf_counter()
        call(sample)
        latencies.append((time.perf_counter() - t) * 1000.0)
    return latencies


def compare(outputs: np.ndarray, reference: np.ndarray, kind: str) -> dict:
    got, want = outputs.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
    norms = np.linalg.norm(got) * np.linalg.norm(want)
    facts = {"max_abs_err": float(np.max(np.abs(got - want))) if got.size else 0.0,
             "cosine": float(got @ want / norms) if norms else float(np.array_equal(got, want)),
             "finite": bool(np.isfinite(got).all())}
    if kind == "classifier":
        facts["top1_agreement"] = float(np.mean(outputs.reshape(len(outputs), -1).argmax(-1)
                                                == reference.reshape(len(reference), -1).argmax(-1)))
    return facts


def check_library(bundle: Path, entry: dict, model: dict, args, progress: dict) -> dict:
    """One library: verify, load, run every sample, compare, time (``progress["stage"]`` says how far it got). Runs in
    the child process."""
    tvm = import_bundled_tvm(bundle)
    if (reason := load_tvm_cuda_runtime(tvm)) or not tvm.cuda(0).exist:
        return {"error": reason or "tvm.cuda(0).exist is False"}
    dev = tvm.cuda(0)
    folder = bundle / entry["dir"]
    manifest = json.loads((folder / "manifest.json").read_text())
    library = folder / manifest["artifact"]["file"]
    if hashlib.sha256(library.read_bytes()).hexdigest() != manifest["artifact"]["sha256"]:
        return {"error": "the library does not match its manifest's sha256 (damaged in transfer?)"}
    samples, reference, stride = load_samples(bundle / model["inputs"], model["input_names"])
    progress["stage"], started = "load", time.perf_counter()
    main = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(library)), dev)["main"]
    load_s = time.perf_counter() - started

    def run(feeds):
        result = main(*[tvm.runtime.tensor(x, dev) for x in feeds])
        return (result if hasattr(result, "numpy") else result[0]).numpy()

    progress["stage"], started = "first run", time.perf_counter()
    first = run(samples[0])  # the driver loads the module here: for PTX of another SM, JIT-compiles it
    first_run_s = time.perf_counter() - started
    progress["stage"] = "samples"
    outputs = np.concatenate([first] + [run(s) for s in samples[1:]])
    outputs = outputs.reshape(len(outputs), -1)[:, ::stride] if stride > 1 else outputs
    progress["stage"] = "timing"
    latencies = time_calls(run, samples, args)
    return {"load_s": load_s, "first_run_s": first_run_s, "p50_ms": percentile(latencies, 50),
            "p90_ms": percentile(latencies, 90), "runs": len(latencies),
            **compare(outputs, reference, model["kind"])}


def ort_cpu_p50(bundle: Path, model: dict, args) -> float | str:
    """onnxruntime on the CPU, fp32 original model, where the bundle carries the .onnx."""
    if not model.get("onnx"):
        return "no .onnx"
    try:
        import onnxruntime as ort
    except ImportError:
        return "no onnxruntime"
    session = ort.InferenceSession(str(bundle / model["onnx"]), providers=["CPUExecutionProvider"])
    samples, _, _ = load_samples(bundle / model["inputs"], model["input_names"])
    names = [i.name for i in session.get_inputs()]
    latencies = time_calls(lambda feeds: session.run(None, dict(zip(names, feeds, strict=True))), samples, args)
    return percentile(latencies, 50)


def run_child(bundle: Path, entry: dict, args) -> dict:
    """``check_library`` in a fresh process: a crash or a broken CUDA context fails this row only."""
    command = [sys.executable, __file__, str(bundle), "--library", entry["dir"], "--min-runs", str(args.min_runs),
               "--min-seconds", str(args.min_seconds), "--max-seconds", str(args.max_seconds),
               "--warmup", str(args.warmup)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.library_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.library_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    said = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
    return {"error": f"child exited {done.returncode}: {said[:300]}"}


def verdict(row: dict) -> str:
    if "error" in row:
        return "ERROR: " + row["error"]
    needed = COSINE_NEEDED.get(row["scheme"], 0.999)
    ok = row["finite"] and row["cosine"] >= needed
    return ("OK" if ok else "FAIL") + f" (cos >= {needed})"


FORMATS = {"load_s": "{:.3f}", "first_run_s": "{:.3f}", "p50_ms": "{:.3f}", "p90_ms": "{:.3f}",
           "ort_cpu_p50_ms": "{:.3f}", "speedup": "{:.3g}x", "max_abs_err": "{:.2e}", "cosine": "{:.7f}",
           "top1_agreement": "{:.0%}"}


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return FORMATS[key].format(value) if key in FORMATS and isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    """Columns padded to their widest cell; the verdict last, unpadded (an error's text can be long)."""
    lines = [[title for title, _ in COLUMNS]] + [[cell(row, key) for _, key in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)] + [0]
    return "\n".join(" | ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--only", action="append", default=[], help="libraries whose folder name contains TEXT")
    parser.add_argument("--library", help=argparse.SUPPRESS)  # the child's one library
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-runs", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--library-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    bundle = args.bundle.resolve()
    index = json.loads((bundle / "index.json").read_text())
    if args.library:
        entry, progress = next(e for e in index["libraries"] if e["dir"] == args.library), {"stage": "start"}
        try:
            result = check_library(bundle, entry, index["models"][entry["model"]], args, progress)
        except Exception as exc:  # the runtime's own error, in the row
            said = (str(exc).strip().splitlines() or [""])[0][:300]
            result = {"error": f"{progress['stage']}: {type(exc).__name__}: {said}"}
        print(json.dumps(result))
        return 0
    gpu = gpu_facts()
    try:
        tvm = import_bundled_tvm(bundle)
    except Exception as exc:  # a bundle without its runtime, or one built for another Python
        print(f"cannot import the bundled TVM from {bundle / 'site'}: {type(exc).__name__}: {exc}")
        return 1
    reason = load_tvm_cuda_runtime(tvm)
    if reason or not tvm.cuda(0).exist:
        print(f"no CUDA device: {reason or 'TVM loaded its CUDA runtime and the driver reports no GPU'}")
        print(f"nvidia-smi: {gpu}; tvm {tvm.__version__} from {Path(tvm.__file__).parent}; "
              f"Python {sys.version.split()[0]}")
        return 2
    dev = tvm.cuda(0)
    print(f"GPU: {gpu}")
    print(f"TVM {tvm.__version__} (runtime only) from {Path(tvm.__file__).parent}, Python {sys.version.split()[0]}: "
          f"tvm.cuda(0).exist={dev.exist}, {dev.device_name}, compute {dev.compute_version}; "
          f"CUDA_CACHE_DISABLE={os.environ.get('CUDA_CACHE_DISABLE')}")
    gpu_sm = "sm_" + str(dev.compute_version).replace(".", "")
    entries = [e for e in index["libraries"] if all(text in e["dir"] for text in args.only)]
    baselines: dict[str, float | str] = {}
    rows = []
    for entry in entries:
        model = index["models"][entry["model"]]
        if entry["model"] not in baselines:
            try:
                baselines[entry["model"]] = ort_cpu_p50(bundle, model, args)
            except Exception as exc:
                baselines[entry["model"]] = f"{type(exc).__name__}: {exc}"[:80]
        result = run_child(bundle, entry, args)
        row = {"model": entry["model"], "scheme": entry["scheme"], "library": entry["dir"], **result}
        jit = entry["sm"] != gpu_sm
        row["device_code"] = f"{entry['sm']} ptx+cubin via JIT" if jit else f"{entry['sm']} cubin"
        baseline = baselines[entry["model"]]
        row["ort_cpu_p50_ms"] = baseline
        if isinstance(baseline, float) and "p50_ms" in row:
            row["speedup"] = baseline / row["p50_ms"]
        row["verdict"] = verdict(row)
        rows.append(row)
        print(f"  {entry['dir']}: {row['verdict']}", flush=True)
    print(table(rows))
    print("load s: load_module + VM; first run s: the driver loads the kernels, JIT-compiling the PTX where the device "
          "code says so (CUDA_CACHE_DISABLE=1); p50/p90: input to GPU, model, output back")
    if os.environ.get("OUT"):
        report = {"gpu": gpu, "tvm": tvm.__version__, "compute_version": dev.compute_version, "rows": rows}
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if rows and all(row["verdict"].startswith("OK") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
