"""Device-side benchmark runner: the very script copied to a board and run there.

Standard library + numpy + the runtime only, and Python 3.6 compatible (JetPack 4.x), so: no
dataclasses, no walrus, no ``from __future__ import annotations``. It

1. copies the artifact into a private directory (mode 700) and checks THAT copy's sha256 against the one the
   controller sent (``--sha256``; the manifest on the device, as writable as the library, must say the same)
   BEFORE loading the same copy: a tampered library is never loaded, and one swapped between the hash and the
   load can't be either,
2. loads the artifact in the requested runtime: tvm (a Relax VM library, through TVM's runtime alone:
   ``TVM_USE_RUNTIME_LIB=1``, so a board needs TVM's runtime, not its compiler; on the GPU when the manifest says
   the library carries GPU code), or onnxruntime with the CPU, CUDA or TensorRT execution provider (an .onnx;
   TensorRT builds its engine into the run's cache directory, fp16/int8 as the manifest's scheme says),
3. runs warm-up iterations (not counted), then timed iterations cycling through the input
   samples (``--batch`` rows per inference) until both the minimum count and the minimum duration are reached and every sample
   has run once; a wall-clock limit stops it early and marks the run invalid,
4. writes every output of every sample to an .npz (``outputs``: the first; ``output_1``, ...: the others) and
   prints ONE JSON object on stdout,
5. for a TVM library, then times every kernel call of a few more runs (the Relax VM's instrument hook): where
   the time goes on the device, measured after the timed loop so the hook never touches the latencies.

Exit codes: 0 measured (check "valid"), 3 refused or failed (JSON has "error", and "fix" where the device lacks
something: a provider, a CUDA device).
"""

import argparse
import atexit
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time

import numpy as np


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def private_copy(path, near):
    """``path`` copied into a fresh directory only this user can enter, beside ``near`` (the run's directory: on
    the disk the preflight measured, swept with old runs, never a noexec /tmp), removed when the runner exits
    (TERM included): what is hashed is what is loaded (an .so for TVM, an .onnx for onnxruntime keeps its name)."""
    directory = tempfile.mkdtemp(prefix="edgedeploy-run-", dir=near)  # mode 700
    atexit.register(shutil.rmtree, directory, True)
    copy = os.path.join(directory, os.path.basename(path))
    shutil.copyfile(path, copy)
    return copy


def fail(kind, message, **extra):
    out = {"ok": False, "error": kind, "message": message}
    out.update(extra)
    print(json.dumps(out))
    sys.exit(3)


class Missing(Exception):
    """The device lacks what the artifact needs (a provider, a CUDA device): reported with how to get it."""

    def __init__(self, message, fix):
        Exception.__init__(self, message)
        self.fix = fix


GPU_PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


KERNELS_SHOWN = 12


def tvm_environment(threads):
    """This process's TVM settings, before TVM is imported: its thread pool's size, and the runtime alone (no 259 MB
    compiler library to load). Set by main(), the runner's own process: set by load_tvm, they leaked from a test
    worker that called it into every later deploy subprocess, which could not import TVM's compiler."""
    if threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


def load_tvm(path, device="cpu"):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
    if device == "cuda" and not dev.exist:
        why = load_tvm_cuda_runtime(tvm)
        dev = tvm.cuda(0)
        if not dev.exist:
            raise Missing("the library carries GPU code and TVM here has no CUDA device (tvm.cuda(0).exist is "
                          "False: {})".format(why or "no NVIDIA GPU or driver"),
                          "build TVM's runtime on the board with USE_CUDA=ON (README: A real Jetson), or run "
                          "where TVM's CUDA runtime finds its CUDA")
    vm = VirtualMachine(tvm.runtime.load_module(path), dev)
    main = vm["main"]  # looked up once: each lookup makes a new function object
    staged = {}  # one device tensor per input and shape, refilled each call (no allocation in the timed call)
    # numpy's views of CPU tensors: one memcpy in and out, where TVM's copyfrom / .numpy() take ~15 / ~10 us in
    # Python (more than a 0.03-ms model's kernels). numpy < 1.22 (JetPack 4's 1.19) has no from_dlpack; a GPU tensor
    # has no host view (and .numpy() waits for the device).
    dlpack = device == "cpu" and hasattr(np, "from_dlpack")

    def stage(index, x):
        key = (index, x.shape, x.dtype)  # the dtype itself: str(dtype) takes ~4 us (numpy writes it in Python)
        if key not in staged:
            tensor = tvm.runtime.empty(x.shape, str(x.dtype), dev)
            view = host_view(tensor) if dlpack else None
            staged[key] = (tensor, view if view is not None and view.flags.writeable else None)
        tensor, view = staged[key]
        if view is None:
            tensor.copyfrom(x)  # makes it contiguous itself
        else:
            np.copyto(view, x)
        return tensor  # not the caller's array zero-copy: the kernels assume TVM's 64-byte alignment

    def fetch(tensor):  # a numpy array the caller owns, as onnxruntime returns
        view = host_view(tensor) if dlpack else None
        return tensor.numpy() if view is None else view.copy()

    def run(feeds):  # every output of the model, in its order
        result = main(*[stage(index, x) for index, x in enumerate(feeds)])
        return [fetch(result)] if hasattr(result, "shape") else [fetch(r) for r in result]

    def profile_kernels(feeds, runs):
        return kernel_times(vm, lambda: run(feeds), runs)

    versions = {"tvm": getattr(tvm, "__version__", "unknown")}
    if device == "cuda":  # kernel launches are asynchronous: host-side timings would not be the GPU's
        versions["device"] = "cuda:0 compute {}".format(dev.compute_version)
        return run, versions, None
    return run, versions, profile_kernels


def host_view(tensor):
    """numpy's view of a CPU tensor (DLPack), or None where this TVM or dtype has none."""
    try:
        return np.from_dlpack(tensor)
    except (TypeError, RuntimeError, BufferError, ValueError):
        return None


def load_tvm_cuda_runtime(tvm):
    """TVM's CUDA runtime, which runtime-only TVM never loads: a side library next to libtvm_runtime (the wheel's
    libtvm_runtime_cuda.so; a source build may link CUDA into libtvm_runtime itself). None when loaded, else why not."""
    import ctypes
    import glob

    folder = os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib")
    side = glob.glob(os.path.join(folder, "libtvm_runtime_cuda.so*"))
    if not side:
        return "a TVM runtime built without CUDA (no libtvm_runtime_cuda.so in {})".format(folder)
    try:
        ctypes.CDLL(side[0], mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:  # its CUDA runtime (libcudart) or the driver (libcuda) is not there
        return "{} did not load: {}".format(os.path.basename(side[0]), exc)
    return None


def kernel_times(vm, run_once, runs):
    """Per inference: each function the VM calls (kernels, allocations), its calls and microseconds, heaviest
    first; and the sum over all of them. The hook is a Python call around each kernel (a few microseconds)."""
    totals = {}
    started = []

    def instrument(func, name, before_run, ret_value, *args):
        now = time.perf_counter()
        if before_run:
            started.append(now)
        else:
            calls, seconds = totals.get(name, (0, 0.0))
            totals[name] = (calls + 1, seconds + now - started.pop())
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            run_once()
    finally:
        vm.set_instrument(lambda *args: 0)
    rows = sorted(totals.items(), key=lambda item: -item[1][1])
    kernels = [{"name": name, "calls": calls // runs, "us": seconds / runs * 1e6}
               for name, (calls, seconds) in rows[:KERNELS_SHOWN]]
    return kernels, sum(seconds for _, seconds in totals.values()) / runs * 1e6


def load_onnxruntime(path, threads, runtime="onnxruntime", precision="fp32", cache_dir=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    wanted = GPU_PROVIDERS.get(runtime, "CPUExecutionProvider")
    available = ort.get_available_providers()
    if wanted not in available:
        raise Missing("onnxruntime {} here has no {} (it has {})".format(ort.__version__, wanted, ", ".join(available)),
                      "install onnxruntime-gpu for this board (a Jetson: the wheel for its JetPack, from the Jetson "
                      "Zoo / Jetson AI Lab), built with {}".format(wanted))
    providers = ["CPUExecutionProvider"]
    if runtime in GPU_PROVIDERS:
        providers = [("CUDAExecutionProvider", {"device_id": "0"})] + providers
    if runtime == "onnxruntime-tensorrt":  # onnxruntime 1.11 reads these as strings
        providers = [("TensorrtExecutionProvider", {
            "device_id": "0", "trt_fp16_enable": str(precision == "fp16"), "trt_int8_enable": str(precision == "int8"),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir or "."})] + providers
    session = ort.InferenceSession(path, options, providers=providers)
    if wanted not in session.get_providers():  # onnxruntime falls back to the CPU when CUDA/TensorRT fail to load
        raise Missing("onnxruntime fell back to {} instead of {}: its CUDA/TensorRT libraries did not load (the "
                      "reason is in its log on stderr)".format(", ".join(session.get_providers()), wanted),
                      "check that CUDA, cuDNN and TensorRT of the board's JetPack are installed and match this "
                      "onnxruntime-gpu build")
    names = [i.name for i in session.get_inputs()]

    def run(feeds):  # every output of the model, in its order
        return session.run(None, dict(zip(names, feeds)))

    versions = {"onnxruntime": ort.__version__, "provider": wanted}
    return run, versions, None


def peak_rss_mb():
    # VmHWM is this process image's own high-water mark. ru_maxrss is NOT: Linux carries the
    # parent's peak across fork+exec, so a runner started by a big process would report its parent.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", choices=["tvm", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"],
                   required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--manifest", help="manifest.json (scheme, device code); its artifact.sha256 must be --sha256")
    p.add_argument("--sha256", help="the sha256 the controller uploaded: the artifact must have it")
    p.add_argument("--inputs", required=True, help=".npz: one array per model input, one sample per row")
    p.add_argument("--input-order", required=True, help="comma-separated model input names")
    p.add_argument("--outputs", required=True, help=".npz to write every output of every sample into")
    p.add_argument("--batch", type=int, default=1, help="samples (rows of --inputs) per inference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iterations", type=int, default=20)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kernel-runs", type=int, default=3,
                   help="runs after the timed loop whose every kernel call is timed (TVM only; 0 = none)")
    args = p.parse_args(argv)

    expected, manifest = args.sha256, {}
    if args.manifest:
        with open(args.manifest) as fh:
            manifest = json.load(fh)
        stated = manifest.get("artifact", {}).get("sha256")
        if expected and stated != expected:
            fail("tampered", "the manifest on the device names another artifact than the one uploaded; refusing "
                 "to load it", path=args.manifest, expected=expected, actual=stated)
        expected = expected or stated
    if not expected:
        fail("usage", "give --sha256: an artifact is never loaded unverified")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that atexit cleans up
    artifact = private_copy(args.artifact, os.path.dirname(os.path.abspath(args.outputs)))
    actual = sha256_file(artifact)
    if actual != expected:
        fail("tampered", "artifact does not match the one uploaded; refusing to load it",
             path=args.artifact, expected=expected, actual=actual)

    names = args.input_order.split(",")
    with np.load(args.inputs) as npz:
        columns = [npz[name] for name in names]
    batch = args.batch  # rows per inference: a batch-4 model takes rows 0-3, then 4-7, ...
    n_samples = len(columns[0]) // batch
    samples = [[col[i * batch:(i + 1) * batch] for col in columns] for i in range(n_samples)]

    precision = manifest.get("compiled_model", {}).get("scheme", {}).get("scheme", "fp32")
    gpu_code = manifest.get("device_code") in ("ptx", "ptx+cubin")
    t0 = time.perf_counter()
    try:
        if args.runtime == "tvm":
            tvm_environment(args.threads)
            run, versions, profile_kernels = load_tvm(artifact, "cuda" if gpu_code else "cpu")
        else:
            cache = os.path.join(os.path.dirname(os.path.abspath(args.outputs)), "trt-engines")
            if args.runtime == "onnxruntime-tensorrt" and not os.path.isdir(cache):
                os.makedirs(cache)
            run, versions, profile_kernels = load_onnxruntime(artifact, args.threads, args.runtime, precision, cache)
    except Missing as exc:
        fail("missing", str(exc), fix=exc.fix)
    except Exception as exc:  # the runtime's own error, reported as JSON
        fail("load", "{}: {}".format(type(exc).__name__, exc))
    load_seconds = time.perf_counter() - t0

    started = time.perf_counter()
    deadline = started + args.max_seconds
    first_run_seconds = None  # the GPU loads (or JIT-compiles) its code here: kept apart from latency, like the load
    for i in range(args.warmup):
        t = time.perf_counter()
        run(samples[i % n_samples])
        if first_run_seconds is None:
            first_run_seconds = time.perf_counter() - t

    outputs = [None] * n_samples
    latencies = []
    timed_start = time.perf_counter()
    stopped_by_limit = False
    i = 0
    while True:
        enough = (len(latencies) >= args.min_iterations
                  and time.perf_counter() - timed_start >= args.min_seconds
                  and i >= n_samples)
        if enough:
            break
        if time.perf_counter() >= deadline:
            stopped_by_limit = True
            break
        feeds = samples[i % n_samples]
        t = time.perf_counter()
        out = run(feeds)
        latencies.append((time.perf_counter() - t) * 1000.0)
        if i < n_samples:
            outputs[i] = [np.asarray(o) for o in out]
        i += 1
    timed_seconds = time.perf_counter() - timed_start

    covered = sum(1 for o in outputs if o is not None)
    reasons = []
    if len(latencies) < args.min_iterations:
        reasons.append("{} timed iterations < minimum {}".format(len(latencies), args.min_iterations))
    if timed_seconds < args.min_seconds:
        reasons.append("{:.2f} s timed < minimum {} s".format(timed_seconds, args.min_seconds))
    if covered < n_samples:
        reasons.append("only {} of {} samples ran".format(covered * batch, n_samples * batch))
    if stopped_by_limit:
        reasons.append("stopped by the {} s time limit".format(args.max_seconds))

    kernels, kernels_total_us, kernel_error = [], None, None
    if profile_kernels and args.kernel_runs > 0 and not stopped_by_limit:  # no runs past the time limit
        try:
            kernels, kernels_total_us = profile_kernels(samples[0], args.kernel_runs)
        except Exception as exc:  # an older TVM without the hook: the latencies still stand
            kernel_error = "{}: {}".format(type(exc).__name__, exc)

    ran = [o for o in outputs if o is not None]
    # "outputs": the first output of every sample (what scoring reads); output_1, output_2, ...: the others
    np.savez(args.outputs, outputs=np.concatenate([o[0] for o in ran], axis=0),
             **{"output_{}".format(j): np.concatenate([o[j] for o in ran], axis=0) for j in range(1, len(ran[0]))})
    print(json.dumps({
        "ok": True,
        "runtime": args.runtime,
        "artifact_sha256": actual,
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "latency_ms": latencies,
        "warmup": args.warmup,
        "timed_seconds": timed_seconds,
        "load_seconds": load_seconds,
        "first_run_seconds": first_run_seconds,
        "batch": batch,
        "samples": n_samples * batch,
        "samples_covered": covered * batch,
        "peak_rss_mb": peak_rss_mb(),
        "valid": not reasons,
        "invalid_reason": "; ".join(reasons) or None,
        "kernels": kernels,
        "kernels_total_us": kernels_total_us,
        "kernel_runs": args.kernel_runs if kernels else 0,
        "kernel_error": kernel_error,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
