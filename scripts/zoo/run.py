"""Run the zoo through `deploy run` and write the model-coverage table: `.venv/bin/python scripts/zoo/run.py
build/zoo` (after scripts/zoo/export.py and scripts/make_yolov5s.py; `make zoo` does all three).

Each model: TVM fp32 and int8, onnxruntime int8, and onnxruntime dynamic int8 where its weights sit in MatMul/Gemm
(the transformer-like ones), every run next to onnxruntime fp32 on this machine (profile `local`), with calibration
(32) and evaluation (8) images from scripts/zoo/images.py. A row is what the command printed with --json and its
exit code: nothing is filled in by hand. TVM runs untuned (the first run a user makes); short measurements
(5 timed iterations, one round): the latencies are indicative, the agreement is exact.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import ZOO, ZooModel  # noqa: E402
from images import batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / ".venv" / "bin" / "deploy"
MEASURE = ["--min-iterations", "5", "--min-seconds", "0", "--rounds", "1", "--warmup", "1", "--eval-samples", "8",
           "--calib-samples", "32"]
BEGIN, END = "<!-- zoo table: begin (scripts/zoo/run.py writes it) -->", "<!-- zoo table: end -->"


def plans(entry: ZooModel) -> list[tuple[str, str]]:
    runs = [("tvm", "fp32"), ("tvm", "int8"), ("onnxruntime", "int8")]
    return runs + ([("onnxruntime", "dynamic")] if entry.dynamic else [])


def data_files(entry: ZooModel, model: Path, folder: Path) -> tuple[Path, Path]:
    """calibration (32 images) and evaluation (8) .npz files for the model's input, one sample per row."""
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    calib, evaluation = folder / f"{entry.name}.calib.npz", folder / f"{entry.name}.eval.npz"
    if not calib.exists():
        np.savez(calib, **{name: batch(32, entry.size, seed=1, normalise=entry.normalise)})
        np.savez(evaluation, **{name: batch(8, entry.size, seed=2, normalise=entry.normalise)})
    return calib, evaluation


def deploy_run(model: Path, runtime: str, scheme: str, calib: Path, evaluation: Path, timeout: float) -> dict:
    argv = [str(DEPLOY), "run", str(model), "--profile", "local", "--runtime", runtime, "--quant", scheme,
            "--eval-data", str(evaluation), *MEASURE, "--json"]
    if scheme == "int8":
        argv += ["--calib-data", str(calib)]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"exit": None, "error": f"no answer within {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    answer = json.loads(lines[-1]) if lines else {"ok": False, "what": done.stderr.strip()[-300:]}
    return {"exit": done.returncode, "seconds": round(seconds, 1), "answer": answer}


def row(entry: ZooModel, runtime: str, scheme: str, outcome: dict) -> dict:
    answer = outcome.get("answer") or {}
    common = {"model": entry.name, "family": entry.family, "runtime": runtime, "scheme": scheme,
              "exit": outcome["exit"], "seconds": outcome["seconds"]}
    if "agreement" not in answer:
        return {**common, "result": "error", "error": outcome.get("error") or answer.get("what")
                or answer.get("message") or str(answer)[:300]}
    agreement = answer["agreement"]
    passed = outcome["exit"] == 0 and answer["valid"] and (scheme != "fp32" or agreement["cosine"] >= 0.999)
    return {**common, "result": "pass" if passed else "fail", "valid": answer["valid"],
            "cosine": agreement["cosine"], "top1": agreement.get("top1") if entry.classifier else None,
            "max_abs": agreement["max_abs"],
            "p50_ms": answer["latency_ms"]["p50"], "onnxruntime_fp32_p50_ms": answer["baseline"]["latency_ms"]["p50"],
            "speedup": answer["speedup"], "parameters": answer["model"]["parameters"],
            "gflops": answer["model"]["flops"] / 1e9, "label": answer["scheme"]}


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return f"{name} ({', '.join(features) or 'no AVX2'}), {info.count('processor')} cores, {platform.machine()}"


def table(rows: list[dict]) -> str:
    lines = ["| model | family | runtime | scheme | result | cosine vs fp32 | top-1 agreement | p50 ms | "
             "onnxruntime fp32 p50 ms | speed-up | wall s |", "|" + "---|" * 11]
    for r in rows:
        if r["result"] == "error":
            lines.append(f"| {r['model']} | {r['family']} | {r['runtime']} | {r['scheme']} | **error** (exit "
                         f"{r['exit']}): {r['error'][:160].replace('|', '/')} | | | | | | {r['seconds']} |")
            continue
        top1 = "" if r["top1"] is None else f"{r['top1'] * 100:.1f} %"
        lines.append(f"| {r['model']} | {r['family']} | {r['runtime']} | {r['label']} | {r['result']} | "
                     f"{r['cosine']:.5f} | {top1} | {r['p50_ms']:.1f} | {r['onnxruntime_fp32_p50_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['seconds']} |")
    return "\n".join(lines)


def write_doc(doc: Path, rows: list[dict], started: float) -> None:
    text = doc.read_text() if doc.exists() else f"# Model coverage\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    passed = sum(r["result"] == "pass" for r in rows)
    body = (f"{BEGIN}\nRun {date.today().isoformat()} on {cpu()}, `deploy run --profile local` "
            f"({' '.join(MEASURE)}), {len(rows)} runs, {passed} passed, {time.perf_counter() - started:.0f} s.\n\n"
            f"{table(rows)}\n{END}")
    doc.write_text(head + body + tail)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path, help="the folder export.py and make_yolov5s.py wrote")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "model-coverage.md")
    parser.add_argument("--only", nargs="*", help="names from scripts/zoo/catalog.py")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = args.zoo / "coverage.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    for entry in ZOO:
        model = args.zoo / f"{entry.name}.onnx"
        if (args.only and entry.name not in args.only) or not model.exists():
            continue
        calib, evaluation = data_files(entry, model, args.zoo)
        for runtime, scheme in plans(entry):
            outcome = deploy_run(model, runtime, scheme, calib, evaluation, args.timeout)
            rows = [r for r in rows if (r["model"], r["runtime"], r["scheme"]) != (entry.name, runtime, scheme)]
            rows.append(row(entry, runtime, scheme, outcome))
            print(json.dumps(rows[-1]), flush=True)
            results.write_text(json.dumps(rows, indent=1))
    order = {e.name: i for i, e in enumerate(ZOO)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), r["runtime"] != "tvm", r["scheme"]))
    write_doc(args.doc, rows, started)
    return 0 if all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
