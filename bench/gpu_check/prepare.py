"""GPU check, this machine's side: build the bundle that bench/gpu_check/run_on_gpu.py runs on an NVIDIA GPU machine.

    .venv/bin/python bench/gpu_check/prepare.py [--out DIR] [--models M ...] [--profiles sm53 sm90]
        [--schemes fp32 fp16] [--onnx M ...]

Why: the GPU machine has no TVM, cannot install anything and receives at most 64 MiB, so everything it needs travels
in one folder: runtime-only TVM (no 259 MB compiler library) with tvm-ffi for CPython 3.12 (and 3.11, this
machine's, so the bundle is checked here), the libraries compiled here for the two profiles beside this file (Jetson
Nano sm_53 device code, which the GPU's driver JIT-compiles from PTX, and sm_90, the H100's own cubin; host code for
x86-64), a few samples per model and onnxruntime's CPU outputs for them, as references.

Bundle: site/ (tvm, tvm_ffi, typing_extensions), libs/<model>-<profile>-<scheme>/ (model.so, manifest.json),
inputs/<model>.npz, onnx/<model>.onnx (only those named by --onnx: the CPU baseline there), index.json. The whole
plan rarely fits 60 MB (a library holds its weights: fp32 and fp16 for two profiles is 3x the model), so the
default is a chosen subset (DEFAULT_PLAN) and other selections go to other folders (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import run_on_gpu  # noqa: E402  (decode_input: the references see the inputs exactly as the GPU machine feeds them)

PROFILES = {"sm53": HERE / "gpu-check-sm53.yaml", "sm90": HERE / "gpu-check-sm90.yaml"}
BUDGET_MB = 60.0
SAMPLES = {"digits-cnn": 8, "pp-lcnet-orientation": 4, "yolox-glyph-detector": 2, "yolov5n": 2}
YOLOV5 = {"size": "n", "imgsz": 640, "opset": 12, "seed": 0}  # YOLOv5s: 28 MB of weights, 3x that in libraries
REFERENCE_ELEMENTS = 65536  # per sample; a larger output is compared on every k-th element
# Library sizes measured (MB, fp32 / fp16, sm53 and sm90 alike): digits 0.2 / 0.3, LCNet 7.3 / 4.2, YOLOv5n@640
# 9.5 / 6.0, YOLOX 21.9 / 12.5; the runtime (site/) 12. Every model x profile x scheme is ~135 MB: the default
# bundle leaves out YOLOX and YOLOv5n's fp32 libraries (build those into another folder with --out).
DEFAULT_PLAN = ([(m, p, s) for m in ("digits-cnn", "pp-lcnet-orientation") for p in PROFILES for s in ("fp32", "fp16")]
                + [("yolov5n", p, "fp16") for p in PROFILES])
DEFAULT_ONNX = ("digits-cnn", "yolov5n")
# What runtime-only `import tvm` and the Relax VM need (prepare checks it by running a VM from the copy alone).
KEEP_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so", "libtvm_ffi.so", "libtvm_ffi_testing.so")  # core NEEDs it
DROP_DIRS = {"__pycache__", "include", "3rdparty", "src", "cython", "stub", "share", "cmake", "lib64"}


@dataclass
class ModelSource:
    """A model as the bundle needs it: the fp32 .onnx, its kind, and its samples in stored form (input, scale)."""

    name: str
    kind: str
    onnx_path: Path
    stored: dict[str, tuple[np.ndarray, float]]


def stored_form(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Inputs that are whole pixel values travel as uint8, others as float16; the references are computed from the
    decoded form (run_on_gpu.decode_input), so the comparison stays exact while the bundle stays small."""
    if np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8), 1.0
    return x.astype(np.float16), 1.0


def yolov5_samples(n: int, imgsz: int) -> np.ndarray:
    """Glyph images (the detector workload's renderer) padded to a square, RGB uint8: the model sees them / 255."""
    from pipeline.workloads.detector import render_glyphs

    rng = np.random.default_rng(5)
    images = np.full((n, 3, imgsz, imgsz), 114, np.uint8)
    for i in range(n):
        image, _ = render_glyphs(rng, imgsz, imgsz * 5 // 8)
        images[i, :, : image.height] = np.asarray(image).transpose(2, 0, 1)
    return images


def model_source(name: str, workdir: Path) -> ModelSource:
    if name == "yolov5n":
        spec = importlib.util.spec_from_file_location("make_yolov5s", REPO / "scripts" / "make_yolov5s.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        import onnx

        path = workdir / "yolov5n.onnx"
        onnx.save(module.build_yolov5(**YOLOV5), str(path))
        x = yolov5_samples(SAMPLES[name], YOLOV5["imgsz"])
        return ModelSource(name, "detector", path, {"images": (x, 1 / 255)})
    from pipeline.workloads import WORKLOADS

    workload = WORKLOADS[name]
    samples = workload.evaluation(SAMPLES.get(name, 4))
    return ModelSource(name, workload.kind, workload.model_path(),
                       {key: stored_form(value) for key, value in samples.inputs.items()})


def write_inputs(source: ModelSource, path: Path) -> tuple[list[str], int]:
    """The stored inputs and onnxruntime's CPU outputs (fp32 model) for them; returns input order and stride."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(source.onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    decoded = {k: run_on_gpu.decode_input(array, scale) for k, (array, scale) in source.stored.items()}
    count = len(next(iter(decoded.values())))
    outputs = np.concatenate([session.run(None, {k: decoded[k][i:i + 1] for k in names})[0] for i in range(count)])
    per_sample = outputs.reshape(count, -1)
    stride = 1 if source.kind == "classifier" else max(1, math.ceil(per_sample.shape[1] / REFERENCE_ELEMENTS))
    arrays = {f"input.{k}": a for k, (a, _) in source.stored.items()}
    arrays |= {f"scale.{k}": np.float32(s) for k, (_, s) in source.stored.items()}
    np.savez_compressed(path, **arrays, reference=per_sample[:, ::stride] if stride > 1 else outputs,
             reference_stride=np.int64(stride))
    return names, stride


def compile_library(info, profile_key: str, scheme: str, dest: Path) -> dict:
    """quantize -> compile_model, as `deploy compile` runs them on an ingested model; library + manifest to dest."""
    from pipeline.compiler.build import compile_model
    from pipeline.quantize import QuantConfig, quantize
    from targets.profiles import load_profile

    profile = load_profile(str(PROFILES[profile_key]))
    model_dir = Path(info.prepared_path).parent
    quantized = quantize(Path(info.prepared_path), model_dir, QuantConfig(scheme=scheme), None)
    build_dir = model_dir / f"{profile_key}-{scheme}"
    build_dir.mkdir(parents=True, exist_ok=True)
    artifact = compile_model(quantized, info, profile, build_dir)
    dest.mkdir(parents=True)
    shutil.copy2(artifact.library_path, dest / Path(artifact.library_path).name)
    shutil.copy2(artifact.manifest_path, dest / "manifest.json")
    return {"device_code": artifact.device_code, "sm": profile.gpu.sm, "compile_s": round(artifact.compile_seconds, 1)}


def imported_packages(package: str) -> set[str]:
    """The (sub)packages of ``package`` that runtime-only ``import tvm`` and the Relax VM import, as paths."""
    code = (f"import sys, tvm, tvm.runtime.vm; print(' '.join(m.replace('.', '/') for m, v in sys.modules.items() "
            f"if m.startswith('{package}.') and hasattr(v, '__path__')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"TVM_USE_RUNTIME_LIB": "1", "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1"})
    return set(done.stdout.split())


def copy_package(source: Path, dest: Path) -> None:
    """A package without what its runtime import never reads: subpackages it does not import (at any depth),
    headers, sources, caches, build files, libraries other than KEEP_LIBS."""
    wanted = imported_packages(source.name) | {f"{source.name}/lib"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        dropped = {n for n in names if n in DROP_DIRS or n.endswith((".pyi", ".txt", ".pyx", ".pxd"))}
        inside = Path(folder).relative_to(source.parent)
        dropped |= {n for n in names if (Path(folder) / n).is_dir() and (inside / n).as_posix() not in wanted}
        if Path(folder).name == "lib":
            dropped |= {n for n in names if n not in KEEP_LIBS}
        return dropped

    shutil.copytree(source, dest, ignore=ignore)


def tvm_ffi_wheel(python: str, cache: Path) -> Path:
    """apache-tvm-ffi's wheel for ``python`` (e.g. 3.12), the version installed here, from the package registry."""
    from importlib.metadata import version

    cache.mkdir(parents=True, exist_ok=True)
    wanted = version("apache-tvm-ffi")
    tag = "cp" + python.replace(".", "")
    found = sorted(cache.glob(f"apache_tvm_ffi-{wanted}-{tag}-*.whl"))
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64"):
        if found:
            break
        subprocess.run([sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={wanted}", "--no-deps",
                        "--only-binary=:all:", "--python-version", python, "--platform", platform, "-d", str(cache)],
                       check=False, capture_output=True)
        found = sorted(cache.glob(f"apache_tvm_ffi-{wanted}-{tag}-*.whl"))
    if not found:
        raise SystemExit(f"no apache-tvm-ffi {wanted} wheel for CPython {python} (pip download found none)")
    return found[0]


def copy_runtime(site: Path, *, python: str | None = "3.12") -> None:
    """Runtime-only tvm (the tvm wheel has no CPython-specific file) and tvm_ffi: the ``python`` wheel's package
    plus this interpreter's ``core`` extension beside its own, and typing_extensions (tvm_ffi imports it)."""
    import tvm
    import tvm_ffi
    import typing_extensions

    copy_package(Path(tvm.__file__).parent, site / "tvm")
    ffi_here = Path(tvm_ffi.__file__).parent
    if python:
        with tempfile.TemporaryDirectory() as unpacked:
            with zipfile.ZipFile(tvm_ffi_wheel(python, Path.home() / ".cache" / "edgedeploy-gpu-check")) as wheel:
                wheel.extractall(unpacked)
            copy_package(Path(unpacked) / "tvm_ffi", site / "tvm_ffi")
        for core in ffi_here.glob("core.cpython-*.so"):
            shutil.copy2(core, site / "tvm_ffi" / core.name)
    else:
        copy_package(ffi_here, site / "tvm_ffi")
    shutil.copy2(typing_extensions.__file__, site / "typing_extensions.py")


def verify_runtime(site: Path, workdir: Path) -> str:
    """Run a Relax VM (a CPU build of digits-cnn) with nothing on the path but the bundle's site and numpy."""
    from pipeline.compiler.build import compile_model
    from pipeline.ingest import ingest
    from pipeline.quantize import QuantConfig, quantize
    from pipeline.workloads import WORKLOADS
    from targets.profiles import Runtimes, load_profile

    cpu_only = load_profile(str(PROFILES["sm53"])).model_copy(update={"gpu": None, "runtimes": Runtimes()})
    info = ingest(WORKLOADS["digits-cnn"].model_path(), workdir / "verify")
    library = compile_model(quantize(Path(info.prepared_path), workdir, QuantConfig(), None), info, cpu_only,
                            workdir / "verify").library_path
    numpy_only = workdir / "numpy-only"
    numpy_only.mkdir()
    for entry in Path(np.__file__).parents[1].glob("numpy*"):
        (numpy_only / entry.name).symlink_to(entry)
    code = ("import numpy as np, tvm, tvm.runtime.vm as vm; m = vm.VirtualMachine(tvm.runtime.load_module("
            f"{str(library)!r}), tvm.cpu()); y = m['main'](tvm.runtime.tensor(np.ones((1, 1, 8, 8), 'float32')));"
            "print(tvm.__file__, tvm.__version__, y.numpy().shape)")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300,
                          env={"TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": f"{site}:{numpy_only}",
                               "PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode != 0 or str(site) not in done.stdout:
        raise SystemExit(f"the bundled runtime-only TVM does not run a VM:\n{done.stdout}{done.stderr[-2000:]}")
    return done.stdout.strip()


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def build_bundle(out: Path, plan: list[tuple[str, str, str]], *, onnx_models: tuple[str, ...] = (),
                 python: str | None = "3.12", verify: bool = True, budget_mb: float = BUDGET_MB) -> dict:
    """Write the bundle for ``plan`` ((model, profile, scheme) each) into ``out`` (replaced), and its index.json."""
    from pipeline.ingest import ingest

    if out.exists():
        shutil.rmtree(out)
    (out / "libs").mkdir(parents=True)
    (out / "inputs").mkdir()
    (out / ".gitignore").write_text("*\n!.gitignore\n" if out == HERE / "bundle" else "*\n")  # git sees none
    index: dict = {"models": {}, "libraries": [], "plan": [list(p) for p in plan]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_runtime(out / "site", python=python)
        index["runtime_check"] = verify_runtime(out / "site", work) if verify else None
        for name in dict.fromkeys(m for m, _, _ in plan):
            source = model_source(name, work)
            names, stride = write_inputs(source, out / "inputs" / f"{name}.npz")
            entry = {"kind": source.kind, "inputs": f"inputs/{name}.npz", "input_names": names,
                     "reference_stride": stride, "onnx": None}
            if name in onnx_models:
                (out / "onnx").mkdir(exist_ok=True)
                shutil.copy2(source.onnx_path, out / "onnx" / f"{name}.onnx")
                entry["onnx"] = f"onnx/{name}.onnx"
            index["models"][name] = entry
            info = ingest(source.onnx_path, work / name)
            for model, profile_key, scheme in (p for p in plan if p[0] == name):
                folder = f"libs/{model}-{profile_key}-{scheme}"
                facts = compile_library(info, profile_key, scheme, out / folder)
                index["libraries"].append({"dir": folder, "model": model, "profile": profile_key, "scheme": scheme,
                                           **facts})
                print(f"  {folder}: {folder_mb(out / folder):.1f} MB, compiled in {facts['compile_s']} s", flush=True)
    (out / "index.json").write_text(json.dumps(index, indent=2))
    index["size_mb"] = folder_mb(out)
    if index["size_mb"] > budget_mb:
        raise SystemExit(f"{out} holds {index['size_mb']:.1f} MB, over the {budget_mb} MB budget: carry less")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "bundle")
    parser.add_argument("--models", nargs="+", choices=sorted(SAMPLES), help="default: DEFAULT_PLAN")
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=sorted(PROFILES))
    parser.add_argument("--schemes", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"])
    parser.add_argument("--onnx", nargs="*", default=None, help=f"models whose .onnx travels (default {DEFAULT_ONNX})")
    args = parser.parse_args(argv)
    plan = ([(m, p, s) for m in args.models for p in args.profiles for s in args.schemes] if args.models
            else DEFAULT_PLAN)
    started = time.perf_counter()
    index = build_bundle(args.out.resolve(), plan, onnx_models=tuple(DEFAULT_ONNX if args.onnx is None else args.onnx))
    print(f"runtime check: {index['runtime_check']}")
    for part in sorted(args.out.iterdir()):
        print(f"  {part.name:<12} {folder_mb(part) if part.is_dir() else part.stat().st_size / 1e6:7.2f} MB")
    print(f"bundle {args.out}: {index['size_mb']:.1f} MB (budget {BUDGET_MB} MB), {len(index['libraries'])} libraries, "
          f"prepared in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
