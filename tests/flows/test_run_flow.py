"""`deploy run` end to end: real Prefect server, real onnxruntime quantization, real TVM, the real
device runner in its own process, on the three reference workloads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flows.run import deploy_run
from pipeline.benchmark import BenchmarkSettings
from pipeline.compiler.passes.dot import LAYOUTS, fits
from pipeline.config import RunConfig
from pipeline.quantize import QuantConfig
from pipeline.workloads import WORKLOADS
from targets.profiles import load_profile

pytestmark = pytest.mark.slow

# One round each: these tests check what the flow computes; the turns are tests/pipeline/test_benchmark.py's.
QUICK = BenchmarkSettings(warmup=1, min_iterations=5, min_seconds=0.2, rounds=1)


def _config(workload: str, scheme: str, **extra) -> RunConfig:
    return RunConfig(model_path=str(WORKLOADS[workload].model_path()), profile="local",
                     quant=QuantConfig(scheme=scheme), bench=extra.pop("bench", QUICK), **extra)


def _flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def fetch():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100,
            )
            return run, tasks

    return asyncio.run(fetch())


def test_digits_fp32_through_the_prefect_server(prefect_server):
    state = deploy_run(_config("digits-cnn", "fp32"), return_state=True)
    record = state.data
    assert record.metadata.serializer.type == "json"  # persisted results are JSON, never pickle
    result = state.result()
    assert result.valid and result.scheme == "fp32" and result.runtime.startswith("tvm")
    assert result.model.workload == "digits-cnn"
    # The trained CNN scores ~99 % on the held-out split, through both runtimes.
    assert result.accuracy.metric == "top1" and result.accuracy.samples == 450
    assert result.accuracy.baseline > 0.97 and abs(result.accuracy.delta) < 1e-9
    assert result.agreement.top1 == 1.0 and result.agreement.max_abs < 1e-3
    assert result.latency_ms.n >= 450 and result.baseline.latency_ms.n >= 450
    assert result.speedup == pytest.approx(result.baseline.latency_ms.p50 / result.latency_ms.p50)
    assert Path(result.result_path).is_file()
    assert result.tuning_check is None and "compile untuned" not in result.stage_seconds  # nothing tuned

    run, tasks = _flow_run(result.flow_run_id)
    assert run.state.is_completed()
    assert {"ingest", "data", "quantize", "compile", "deploy", "benchmark"} <= {t.name.rsplit("-", 1)[0] for t in tasks}
    assert all(t.state.is_completed() for t in tasks)


def test_digits_int8_costs_little_accuracy_and_reruns_reuse_artifacts(prefect_server):
    result = deploy_run(_config("digits-cnn", "int8", calib_samples=200))
    assert result.valid and result.scheme.startswith("int8 QDQ U8S8 minmax per-channel")
    assert result.benchmark["calibration_samples"] == 200
    assert result.accuracy.value > 0.95 and result.agreement.top1 > 0.97
    assert result.agreement.cosine > 0.99
    # The convs over 16 and 32 channels and the classifier's matmul run in int8 in TVM; the first conv, over one grey
    # channel, has nothing for the 8-bit dot products to sum and stays float (pipeline.compiler.passes.int8).
    assert result.artifact.integer_ops == 3
    assert result.reused == []
    # Identical inputs: the quantized model and the library come from the cache (a new run id doesn't matter).
    again = deploy_run(_config("digits-cnn", "int8", calib_samples=200))
    assert again.reused == ["quantize", "compile"] and again.artifact.sha256 == result.artifact.sha256
    assert again.run_id != result.run_id
    # Other calibration data: both recomputed.
    other = deploy_run(_config("digits-cnn", "int8", calib_samples=150))
    assert other.reused == []
    # Stored results stay JSON, never pickle.
    import json
    assert json.loads(Path(other.result_path).read_text())["reused"] == []


def test_orientation_int8_static_rewrite(prefect_server):
    result = deploy_run(_config("pp-lcnet-orientation", "int8", calib_samples=32, eval_samples=16))
    assert result.model.static_rewrite  # PP-LCNet computes its Reshape target with Shape at run time
    assert result.valid and result.accuracy.samples == 16
    assert result.accuracy.baseline >= 0.9 and result.accuracy.value >= 0.9
    # Its 18 1x1 convs and its classifier in integers; the 3-channel stem and the depthwise convs stay float.
    assert result.artifact.integer_ops == 19
    # Every 1x1 conv of the channel-last network (13 on feature maps, 4 in the two squeeze-excitation blocks, the
    # last conv) laid out for vpdpbusd where the CPU has it (`local` is this machine), else for vpmaddubsw (whose
    # 16-bit pair sums the 7-bit weights the checks chose there keep exact).
    features = load_profile("local").cpu.features
    instruction = "vpdpbusd" if "avx512_vnni" in features else \
        "vpmaddubsw (512-bit)" if "avx512bw" in features else "vpmaddubsw (256-bit)"
    # The classifier (1280 -> 4 classes) too where its 4 outputs pad to a tile at most doubling the work: AVX2's 8
    # lanes, not AVX-512's 16.
    layout = next(layout for layout in LAYOUTS if layout.instruction == instruction)
    laid_out = 18 + fits(1280, 4, layout)
    assert result.artifact.dot_ops == {instruction: laid_out}
    assert result.artifact.vnni_ops == (laid_out if instruction == "vpdpbusd" else 0)
    assert ("reduce-range" in result.scheme) is (instruction != "vpdpbusd")


def test_detector_int8_map(prefect_server):
    result = deploy_run(_config("yolox-glyph-detector", "int8", calib_samples=16, eval_samples=3,
                                bench=BenchmarkSettings(warmup=1, min_iterations=3, min_seconds=0, rounds=1)))
    assert result.accuracy.metric == "mAP@0.5" and result.agreement.top1 is None
    assert result.accuracy.baseline > 0.8 and result.accuracy.value > 0.8
    assert result.artifact.integer_ops >= 50  # per-channel QDQ after the opset-13 upgrade, in integers
    assert result.valid


def test_tuning_times_its_candidates_on_the_benchmarks_threads(prefect_server):
    """Regression: a lab that benchmarks on one thread (`bench.threads`) had its build tuned on the profile's cores,
    so the database's kernel times were not those of the kernels it deployed."""
    result = deploy_run(_config("digits-cnn", "fp32", tune_trials=1, eval_samples=20, tuning_check=False,
                                bench=QUICK.model_copy(update={"threads": 1})))
    assert result.valid and result.tuning_check is None  # tuning_check=False: the tuned library, unmeasured
    assert result.artifact.target["num-cores"] == 1 and result.artifact.tuning["threads"] == 1


def test_a_tuned_library_ships_only_if_it_beats_the_build_before_its_tuning(prefect_server):
    """Regression: a plain `deploy run --tune-minutes` shipped its tuned library unmeasured against the untuned one,
    which on the digits CNN was 1.7x faster (pipeline.tuning_check). Both are built, measured in turns on the device,
    and the faster one ships; the tuning is reported either way."""
    result = deploy_run(_config("digits-cnn", "fp32", tune_trials=1, eval_samples=20))
    check = result.tuning_check
    assert check is not None and len(check.tuned_ms) == len(check.before_ms) == 2
    assert all(ms > 0 for ms in check.tuned_ms + check.before_ms)
    assert (result.artifact.tuning is not None) is (check.shipped == "tuned")
    assert result.tuning["trials_per_task"] == 1 and check.tuning == result.tuning
    assert {"compile untuned", "compile", "tuned or not", "deploy", "benchmark"} <= set(result.stage_seconds)
    names = [task.name for task in _flow_run(result.flow_run_id)[1]]
    assert [name for name in names if name.startswith("tuned or not")] == [
        "tuned or not: before (1)", "tuned or not: tuned (2)", "tuned or not: tuned (3)", "tuned or not: before (4)"]


def test_run_that_misses_its_minimums_is_invalid(prefect_server):
    result = deploy_run(_config("digits-cnn", "fp32", eval_samples=10,
                                bench=BenchmarkSettings(warmup=0, min_iterations=10**9, min_seconds=0,
                                                        max_seconds=1)))
    assert not result.valid
    assert any("timed iterations < minimum" in reason for reason in result.invalid_reasons)


def test_partial_int8_through_the_flow(prefect_server, sensitive_onnx):
    """--partial: a `partial` task ranks the layers, the quantized model keeps the sensitive ones in float and
    the result names them."""
    folder = sensitive_onnx.parent
    config = RunConfig(model_path=str(sensitive_onnx), profile="local", quant=QuantConfig(scheme="int8"),
                       partial=True, calib_data=str(folder / "calib.npz"), eval_data=str(folder / "eval.npz"),
                       accuracy_budget=0.02, bench=QUICK)
    result = deploy_run(config)
    _, tasks = _flow_run(result.flow_run_id)
    assert "partial" in [t.name.rsplit("-", 1)[0] for t in tasks]
    assert result.partial is not None and set(result.partial.keep_float) == {"conv_a", "conv_b"}
    assert "(2 layers float)" in result.scheme
    assert result.agreement.top1 >= 0.98  # as the host-side plan promised, now measured on the device
