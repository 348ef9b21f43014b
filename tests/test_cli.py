"""The `deploy` command as a user runs it: a subprocess, talking to the session's Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.flows.conftest import prefect_server  # noqa: F401 - the shared server fixture

pytestmark = pytest.mark.slow

REQUIRED = [
    "model.sha256", "profile", "scheme", "runtime", "artifact.sha256",
    *(f"latency_ms.{k}" for k in ("p50", "p90", "p99", "mean", "n")),
    "baseline.runtime", *(f"baseline.latency_ms.{k}" for k in ("p50", "p90", "p99", "mean", "n")),
    "speedup", "accuracy.metric", "accuracy.value", "accuracy.baseline",
    "agreement.top1", "agreement.cosine", "agreement.max_abs", "valid",
]


def deploy(*args: str, api_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url, "EDGEDEPLOY_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edgedeploy", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _lookup(obj: dict, dotted: str):
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def test_run_json_prints_one_object_with_every_key(prefect_server, isolated_home):  # noqa: F811
    proc = deploy("run", "digits-cnn", "--quant", "int8", "--min-iterations", "5", "--min-seconds", "0.1",
                  "--json", api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    for key in REQUIRED:
        _lookup(result, key)
    assert result["profile"] == "local" and result["scheme"].startswith("int8") and result["valid"] is True
    assert result["baseline"]["runtime"].startswith("onnxruntime") and result["accuracy"]["metric"] == "top1"
    assert json.loads(Path(result["result_path"]).read_text())["run_id"] == result["run_id"]


def test_run_table(prefect_server, isolated_home):  # noqa: F811
    proc = deploy("run", "digits-cnn", "--min-iterations", "5", "--min-seconds", "0.1",
                  api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    for text in ("side by side", "p50 ms", "speed-up vs onnxruntime fp32", "top1", "valid measurement"):
        assert text in proc.stdout


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(os.urandom(2048))
    empty = tmp / "empty.onnx"
    empty.write_bytes(b"")
    wrong_dtype = tmp / "calib.npz"
    np.savez(wrong_dtype, image=np.zeros((4, 1, 8, 8), np.float64))
    return {
        "garbage model": ([str(garbage)], "not a readable ONNX model"),
        "empty model": ([str(empty)], "is empty"),
        "missing model": ([str(tmp / "nope.onnx")], "does not exist"),
        "unknown profile": (["digits-cnn", "--profile", "jetson-nanoo"], "Unknown device profile"),
        "bad input shape": (["digits-cnn", "--input-shape", "image=1,x"], "--input-shape"),
        "wrong calibration dtype": (["digits-cnn", "--quant", "int8", "--calib-data", str(wrong_dtype)],
                                    "wrong dtype"),
        "partial without int8": (["digits-cnn", "--partial"], "--partial"),
    }


@pytest.mark.parametrize("case", [
    "garbage model", "empty model", "missing model", "unknown profile", "bad input shape",
    "wrong calibration dtype", "partial without int8",
])
def test_bad_input_is_one_clear_error(prefect_server, isolated_home, tmp_path, case):  # noqa: F811
    args, message = _bad_inputs(tmp_path)[case]
    proc = deploy("run", *args, "--json", api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    error = json.loads(proc.stdout)
    assert error["ok"] is False and message in error["what"] + str(error.get("value")) + str(error.get("expected"))
    assert "error:" in proc.stderr


def test_check_refuses_with_reasons_and_exit_4(isolated_home):
    proc = deploy("check", "digits-cnn", "--profile", "raspberry-pi-4", "--quant", "fp16", "--json",
                  api_url="http://127.0.0.1:9/api", home=isolated_home)  # no server needed for checks
    assert proc.returncode == 4, proc.stderr
    report = json.loads(proc.stdout)
    assert report["refused"] is True
    (precision,) = [r for r in report["results"] if r["check"] == "precision vs arithmetic"]
    assert precision["verdict"] == "refuse" and "fp16 arithmetic" in precision["reason"]


def test_check_table_passes_for_fp32_on_a_pi(isolated_home):
    proc = deploy("check", "digits-cnn", "--profile", "raspberry-pi-4", api_url="http://127.0.0.1:9/api",
                  home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    assert "precision vs arithmetic" in proc.stdout and "refuse" not in proc.stdout


def test_run_stops_before_quantizing_when_a_check_refuses(prefect_server, isolated_home, tmp_path):  # noqa: F811
    board = tmp_path / "no-fp16.yaml"
    board.write_text("extends: local\nname: no-fp16\ncpu:\n  precisions: [fp32, int8]\n")
    proc = deploy("run", "digits-cnn", "--profile", str(board), "--quant", "fp16", "--json",
                  api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    error = json.loads(proc.stdout)
    assert error["error"] == "CheckRefused" and "precision vs arithmetic" in error["what"]
    assert not list(isolated_home.rglob("model.fp16.onnx")) and not list(isolated_home.rglob("model.so"))


def test_a_gpu_runtime_on_a_machine_without_a_gpu_is_refused_in_one_message(prefect_server, isolated_home):  # noqa: F811
    for command in (["check"], ["run"], ["run", "--quant", "auto"]):
        proc = deploy(*command, "digits-cnn", "--profile", "local", "--runtime", "onnxruntime-cuda",
                      api_url=prefect_server, home=isolated_home)
        assert proc.returncode == 4, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "nvidia-smi found none" in proc.stdout + proc.stderr


def test_the_nano_checks_default_to_tensorrt_fp16_and_refuse_int8_for_dp4a(isolated_home):
    proc = deploy("check", "digits-cnn", "--profile", "jetson-nano", "--json", api_url="http://127.0.0.1:9/api",
                  home=isolated_home)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["runtime"] == "onnxruntime-tensorrt" and report["scheme"] == "fp16"
    proc = deploy("check", "digits-cnn", "--profile", "jetson-nano", "--quant", "int8", "--runtime",
                  "onnxruntime-tensorrt", "--json", api_url="http://127.0.0.1:9/api", home=isolated_home)
    assert proc.returncode == 4
    (precision,) = [r for r in json.loads(proc.stdout)["results"] if r["check"] == "precision vs arithmetic"]
    assert precision["verdict"] == "refuse" and "DP4A" in precision["fact"]


def test_a_transformer_with_dynamic_int8_on_onnxruntime_and_refused_on_tvm(prefect_server, isolated_home,  # noqa: F811
                                                                          tmp_path):
    import onnx

    from tests.conftest import int8_on_this_host, tiny_vit

    model = tmp_path / "vit.onnx"
    onnx.save(tiny_vit(), str(model))
    proc = deploy("run", str(model), "--quant", "dynamic", "--runtime", "onnxruntime", "--min-iterations", "10",
                  "--min-seconds", "0.2", "--json", api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = int8_on_this_host("dynamic").label()  # reduce-range where the CPU has no VNNI
    assert result["valid"] and result["scheme"] == expected and result["speedup"] > 0
    assert result["agreement"]["cosine"] > 0.99
    proc = deploy("run", str(model), "--quant", "dynamic", api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 4 and "dynamic quantization" in proc.stderr and "Traceback" not in proc.stderr


def test_profiles_list_names_the_orin(isolated_home):
    proc = deploy("profiles", "list", "--json", api_url="http://127.0.0.1:9/api", home=isolated_home)
    orin = next(p for p in json.loads(proc.stdout) if p["name"] == "jetson-orin-nano")
    assert orin["gpu"]["compute_capability"] == "8.7" and orin["python_version"] == "3.10"


def test_compile_cross_compiles_for_the_pi(isolated_home, tmp_path):
    proc = deploy("compile", "digits-cnn", "--profile", "raspberry-pi-4", "--out", str(tmp_path / "pi"), "--json",
                  api_url="http://127.0.0.1:9/api", home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    header = Path(summary["library"]).read_bytes()[:20]
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert summary["target"]["mcpu"] == "cortex-a72"


def test_bad_profile_file_names_file_field_and_value(isolated_home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: raspberry-pi-4\nname: bad\ncpu:\n  cores: many\n")
    proc = deploy("profiles", "show", str(bad), api_url="http://127.0.0.1:9/api", home=isolated_home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # rich wraps stderr at 80 columns, inside a long tmp path too (pytest-104/...: 81 characters)
    unwrapped = proc.stderr.replace("\n", "")
    assert str(bad) in unwrapped and "cpu.cores" in unwrapped and "many" in unwrapped


def test_doctor_over_ssh(lab_x86, isolated_home):
    from tests.lab import x86_python

    profile = lab_x86.profile(extends="x86-server", python=x86_python())
    proc = deploy("doctor", "--profile", str(profile), "--json", api_url="http://127.0.0.1:9/api", home=isolated_home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["host key"]["ok"] and checks["architecture"]["detail"] == "device x86_64, profile x86_64"
    assert checks["tvm"]["ok"] and checks["onnxruntime"]["ok"]


def test_doctor_shows_an_unknown_host_key(lab_x86, isolated_home, tmp_path):
    from tests.lab import x86_python

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    profile = lab_x86.profile(extends="x86-server", python=x86_python())
    profile.write_text(profile.read_text().replace(str(lab_x86.known_hosts), str(empty)))
    proc = deploy("doctor", "--profile", str(profile), api_url="http://127.0.0.1:9/api", home=isolated_home)
    assert proc.returncode == 1 and "SHA256:" in proc.stdout and "ssh-keyscan" in proc.stdout


def test_bench_writes_the_side_by_side_table(prefect_server, isolated_home, tmp_path):  # noqa: F811
    # Few samples and iterations: a dozen candidates, each quantized, built, evaluated and timed (the table's
    # columns are checked, not its numbers; 50 of each made this 200 s of the suite beside another worker).
    proc = deploy("bench", "digits-cnn", "--out", str(tmp_path / "docs"), "--eval-samples", "20",
                  "--min-iterations", "10", "--min-seconds", "0", "--tune-minutes", "0.1",
                  api_url=prefect_server, home=isolated_home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "docs" / "bench.md").read_text()
    assert "## digits-cnn" in table and "% of peak" in table and "GFLOP/s" in table
    for candidate in ("onnxruntime fp32", "onnxruntime int8 QDQ U8S8 minmax per-channel", "tvm fp32"):
        assert f"| {candidate} |" in table
    # --tune-minutes is the selection's: the 0.1 minutes went to one TVM build (each share is at least a minute)
    import re

    assert len(set(re.findall(r"\| (tvm [^|]*?) tuned 0\.1 min \|", table))) == 1 and "| tvm int8" in table
    assert (tmp_path / "docs" / "bench-digits-cnn.svg").read_text().startswith("<svg")


def test_the_command_starts_without_the_heavy_libraries():
    """Every command parses its options before it imports TVM, Prefect or SciPy (SciPy's stats, imported by the
    run configuration's module, once cost every `deploy` command 2 s of start-up)."""
    code = ("import sys, edgedeploy.cli, pipeline.config\n"
            "print(sorted(m for m in ('scipy', 'tvm', 'prefect') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_a_prefect_server_that_does_not_start_is_one_clear_error(isolated_home, tmp_path):
    """No PREFECT_API_URL: the command starts Prefect's temporary server, here given 1 s, less than its start takes
    (a fresh database to create): one error saying what to do, no traceback. (Before: a raw RuntimeError, also
    with Prefect's default 20 s on a slow 2-core VM's first start.)"""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(EDGEDEPLOY_HOME=str(isolated_home), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    proc = subprocess.run([sys.executable, "-m", "edgedeploy", "run", "digits-cnn", "--quant", "fp32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Prefect's temporary server did not start: no stage ran" in proc.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr
