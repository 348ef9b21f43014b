"""The table of docs/performance.md for one device profile: workload x {untuned, tuned M minutes} x {fp32, int8} for
TVM, next to onnxruntime fp32 (every run's own baseline) and onnxruntime int8, each a `deploy run --json`.

    .venv/bin/python bench/cpu_table.py --profile local --minutes 0 10 --out /tmp/table.md
    .venv/bin/python bench/cpu_table.py --profile avx2-here.yaml --workloads pp-lcnet-orientation --minutes 10

`--keep DIR` keeps each run's result (`deploy run --json`: the kernel profile of a TVM build too) as
DIR/<workload>-<runtime>-<scheme>-<minutes>.json; the homes themselves are temporary. Each run gets a fresh
$EDGEDEPLOY_HOME (its own tuning database and results database), so "10 min" means ten minutes
from nothing, and an untuned build takes no records. The machine and its CPU features head the table: compare
numbers within one table only (ratios; the VMs drift).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

WORKLOADS = ("digits-cnn", "pp-lcnet-orientation", "yolox-glyph-detector")


def cpu_line() -> str:
    model, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    features = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(features)} ({platform.machine()})"


def deploy_run(args: list[str], home: Path) -> dict:
    env = {**os.environ, "EDGEDEPLOY_HOME": str(home)}
    env.pop("EDGEDEPLOY_DB_URL", None)
    done = subprocess.run([sys.executable, "-m", "edgedeploy", "run", *args, "--json"], capture_output=True, text=True,
                          env=env, timeout=4 * 3600)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "what": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}


def cell(result: dict) -> str:
    if "latency_ms" not in result:
        return f"failed: {result.get('what', '?')}"
    accuracy = result["accuracy"]
    quality = f"{accuracy['metric']} {accuracy['value'] * 100:.1f} %" if accuracy.get("value") is not None else \
        f"cos {result['agreement']['cosine']:.4f}"
    shipped = f"{result['latency_ms']['p50']:.2f} ms ({result['speedup']:.2f}x, {quality})"
    check = result.get("tuning_check")
    if not check:
        return shipped
    # A tuned run measures its tuned library against the build before the tuning and ships the faster: both here.
    base = result["baseline"]["latency_ms"]["p50"]
    tuned, before = min(check["tuned_ms"]), min(check["before_ms"])
    return (f"{shipped}; in turns: tuned {tuned:.2f} ms ({base / tuned:.2f}x), untuned {before:.2f} ms "
            f"({base / before:.2f}x), the {check['shipped']} one shipped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--schemes", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--minutes", nargs="+", type=float, default=[0.0], help="0 = untuned")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="a folder for each run's result (JSON)")
    options = parser.parse_args()

    def kept(result: dict, name: str) -> dict:
        if options.keep:
            options.keep.mkdir(parents=True, exist_ok=True)
            (options.keep / f"{name}.json").write_text(json.dumps(result, indent=1))
        return result

    rows = [f"Profile `{options.profile}`, {cpu_line()}, {date.today()}; each cell: TVM p50 (x onnxruntime fp32 in "
            "the same run, accuracy).", "",
            "| workload | onnxruntime fp32 | onnxruntime int8 | " + " | ".join(
                f"TVM {s} {'untuned' if not m else f'{m:g} min'}" for s in options.schemes for m in options.minutes)
            + " |", "|---" * (3 + len(options.schemes) * len(options.minutes)) + "|"]
    with tempfile.TemporaryDirectory(prefix="cpu-table-") as tmp:
        for workload in options.workloads:
            base = ["--profile", options.profile, workload]
            ort = deploy_run([*base, "--runtime", "onnxruntime", "--quant", "int8"], Path(tmp) / f"{workload}-ort")
            kept(ort, f"{workload}-onnxruntime-int8")
            cells = [f"{ort['baseline']['latency_ms']['p50']:.2f} ms" if "baseline" in ort else "?", cell(ort)]
            for scheme in options.schemes:
                for minutes in options.minutes:
                    tuned = ["--tune-minutes", f"{minutes:g}"] if minutes else []
                    home = Path(tmp) / f"{workload}-{scheme}-{minutes:g}"
                    result = deploy_run([*base, "--runtime", "tvm", "--quant", scheme, *tuned], home)
                    cells.append(cell(kept(result, f"{workload}-tvm-{scheme}-{minutes:g}")))
                    print(workload, scheme, minutes, cells[-1], flush=True)
            rows.append(f"| {workload} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) + "\n"
    print(table)
    if options.out:
        options.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
