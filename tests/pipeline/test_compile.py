"""TVM compilation for the local profile: real import, real build, real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.compiler.build import compile_model
from pipeline.ingest import ingest, sample_inputs
from pipeline.quantize import QuantConfig, quantize
from targets.hashing import sha256_file
from targets.profiles import load_profile

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def _run_library(path, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("scheme", ["fp32", "fp16"])
def test_static_rewritten_model_compiles_and_matches_onnxruntime(dynamic_onnx, tmp_path, scheme):
    info = ingest(dynamic_onnx, tmp_path, input_shapes={"x": (1, 3, 4, 4)})
    q = quantize(Path(info.prepared_path), tmp_path, QuantConfig(scheme=scheme), None)
    profile = load_profile("local")
    artifact = compile_model(q, info, profile, tmp_path)

    header = open(artifact.library_path, "rb").read(20)
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE[profile.cpu.arch]

    manifest = json.loads(open(artifact.manifest_path).read())
    assert manifest["artifact"]["sha256"] == sha256_file(artifact.library_path) == artifact.sha256
    assert manifest["model"]["sha256"] == info.sha256
    assert manifest["compiled_model"]["sha256"] == q.sha256
    assert manifest["tools"]["apache-tvm"].startswith("0.27")

    x = sample_inputs(info.inputs, seed=3)["x"]
    expected = ort.InferenceSession(str(dynamic_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tol = 1e-4 if scheme == "fp32" else 5e-2
    np.testing.assert_allclose(_run_library(artifact.library_path, x), expected, rtol=tol, atol=tol)


def test_compile_cache_key_follows_the_compiler_code(tmp_path):
    """Regression: the revision in the cache key was a hand-kept string; int8 layout changes went out without it
    changing, and `make demo` served a library built by the previous code from the cache."""
    import pipeline.compiler
    from pipeline.compiler.build import COMPILE_REVISION, COMPILER_SOURCES, source_revision

    # Every file of the compiler package: the rewrites of the Relax module (Winograd's was once nearly left out of a
    # hand-kept list), the tuning code, the build itself.
    package = Path(pipeline.compiler.__file__).parent
    assert {p.name for p in (package / "passes").glob("*.py")} >= {"int8.py", "dot.py", "layout.py", "winograd.py",
                                                                  "fastmath.py"}
    assert set(package.rglob("*.py")) == set(COMPILER_SOURCES)
    assert COMPILE_REVISION == source_revision(COMPILER_SOURCES)
    copies = []
    for i, path in enumerate(COMPILER_SOURCES):  # numbered: the package has an __init__.py in each folder
        copies.append(tmp_path / f"{i}-{path.name}")
        copies[-1].write_bytes(path.read_bytes())
    assert source_revision(copies) == COMPILE_REVISION
    copies[1].write_text(copies[1].read_text() + "\n# any edit\n")
    assert source_revision(copies) != COMPILE_REVISION


def test_a_time_budget_keeps_the_first_tuning_round_to_a_third_of_it():
    """At MetaSchedule's 64 candidates a round, YOLOX's 49 tasks would spend ~45 of 57 minutes on the round every
    task gets before the cost model steers anything."""
    from pipeline.compiler.tuning.search import SECONDS_PER_TRIAL, trials_per_round

    assert trials_per_round(1000, 49, 57) == 23
    assert 49 * 23 * SECONDS_PER_TRIAL <= 57 * 60 / 3
    assert trials_per_round(1000, 29, 57) == 39
    assert trials_per_round(1000, 3, 57) == 64  # few tasks: MetaSchedule's default, no more
    assert trials_per_round(1000, 200, 10) == 16  # never so few that breeding costs more than measuring
    assert trials_per_round(200, 49, None) == 64  # a trial count alone: the default
    assert trials_per_round(32, 49, 57) == 16 and trials_per_round(8, 49, None) == 8  # random search, no rounds


def test_a_budget_too_short_for_every_task_tunes_the_heaviest():
    """PP-LCNet int8's 38 tasks at 16 candidates and the default each filled its whole 8.4-minute share with the
    first round: the evolutionary search never ran. Its first round now fits in a third of the budget."""
    from pipeline.compiler.tuning.search import (
        FIRST_ROUND_SHARE,
        MIN_TRIALS_PER_ROUND,
        SECONDS_PER_TRIAL,
        affordable_tasks,
        trials_per_round,
    )

    tasks = [f"task{i}" for i in range(38)]  # heaviest first, as heaviest_first() orders them
    afforded = affordable_tasks(tasks, 1000, 8.4)
    assert afforded == tasks[:9]
    per_round = trials_per_round(1000, len(afforded), 8.4)
    assert per_round > MIN_TRIALS_PER_ROUND
    assert len(afforded) * per_round * SECONDS_PER_TRIAL <= 8.4 * 60 * FIRST_ROUND_SHARE
    assert affordable_tasks(tasks[:29], 1000, 57) == tasks[:29]  # an hour: every task
    assert affordable_tasks(tasks, 1000, None) == tasks  # a trial count alone: every task, as asked
    assert affordable_tasks(tasks, 32, 8.4) == tasks  # random search: no rounds to make room for
    assert affordable_tasks(tasks, 1000, 0.1) == tasks[:1]  # the heaviest, whatever the budget


def test_kernels_are_timed_first_only_where_the_budget_affords_it():
    """Timing every kernel first costs about a trial each: an eighth of the budget at most, else the FLOPs order."""
    from pipeline.compiler.tuning.search import timing_fits

    assert timing_fits(38, 8.4)  # PP-LCNet int8 in --quant auto --tune-minutes 15's share
    assert not timing_fits(120, 0.1)  # YOLOX in `deploy bench --tune-minutes 0.1`
    assert timing_fits(120, 30) and not timing_fits(120, 8.4)
    assert not timing_fits(8, None)


def test_the_slowest_kernels_come_first_by_time_and_calls():
    """A short budget goes to the kernels that take the most time per inference (tuning.ranking), not the most
    FLOPs: a kernel not timed keeps its place after the timed ones."""
    from types import SimpleNamespace

    from pipeline.compiler.tuning.ranking import slowest_first

    tasks = [SimpleNamespace(name=name, weight=weight) for name, weight in
             (("pointwise", 1), ("depthwise", 1), ("twice", 2), ("untimed", 1), ("also untimed", 1))]
    seconds = [120e-6, 170e-6, 90e-6, None, None]
    assert [t.name for t in slowest_first(tasks, seconds)] == [
        "twice", "depthwise", "pointwise", "untimed", "also untimed"]


def test_the_search_breeds_eight_candidates_for_each_one_a_round_measures():
    """MetaSchedule's own ratio (512 for 64): a 16-candidate round no longer pays for breeding 512."""
    from pipeline.compiler.tuning.search import search_strategy

    assert search_strategy(1000, 64).population_size == 512
    assert search_strategy(1000, 16).population_size == 128
    assert search_strategy(32, 16) == "replay-trace"


def test_a_pass_that_fails_raises_its_own_error(dynamic_onnx, tmp_path, monkeypatch):
    """The rewrites run as one tvm.transform.Sequential, which hands a Python exception of a pass back as a
    RuntimeError with its message only; relax_module raises the pass's own exception (its type, its fields)."""
    from edgedeploy.errors import CompileError
    from pipeline.compiler import frontend

    def failing(mod):
        raise CompileError("the layout pass failed", value="a conv it could not lay out")

    monkeypatch.setattr(frontend, "channels_last", failing)
    info = ingest(dynamic_onnx, tmp_path, input_shapes={"x": (1, 3, 4, 4)})
    q = quantize(Path(info.prepared_path), tmp_path, QuantConfig(scheme="fp32"), None)
    with pytest.raises(CompileError, match="the layout pass failed") as raised:
        frontend.relax_module(q, info, load_profile("local"))
    assert raised.value.value == "a conv it could not lay out"
