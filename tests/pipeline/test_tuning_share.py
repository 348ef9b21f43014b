"""The lab's tuning database: one host's MetaSchedule records reach another host's builds through the results
database, an untuned build takes them, and a target's records travel as a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgedeploy.errors import OptionError
from pipeline.results.store import ResultStore
from pipeline.tuning_share import FORMAT, export_records, import_records, pull, push, read_export, target_key

tvm = pytest.importorskip("tvm")

from pipeline.compiler.tuning import records  # noqa: E402

pytestmark = pytest.mark.slow
TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


@pytest.fixture(scope="module")
def tuned_database(tmp_path_factory) -> Path:
    """A real MetaSchedule database: digits-cnn fp32's kernels for an AVX2 target, 2 trials each, timed here."""
    from pipeline.compiler.frontend import relax_module
    from pipeline.compiler.tuning.search import tune_and_compile
    from pipeline.ingest import ingest
    from pipeline.quantize import QuantConfig, QuantizedModel
    from pipeline.workloads import WORKLOADS
    from targets.hashing import sha256_file
    from targets.profiles import load_profile

    tmp = tmp_path_factory.mktemp("tuned")
    info = ingest(WORKLOADS["digits-cnn"].model_path(), tmp / "ingest")
    fp32 = QuantizedModel(path=info.prepared_path, sha256=sha256_file(Path(info.prepared_path)),
                          config=QuantConfig(scheme="fp32"))
    mod, _ = relax_module(fp32, info, load_profile("x86-server"))
    tune_and_compile(mod, TARGET, 2, tmp / "database")
    return tmp / "database"


def test_records_go_from_one_database_to_another_once(tuned_database, tmp_path):
    entries = records.read(tuned_database)
    assert entries and all(e["mean_s"] > 0 for e in entries)
    assert len({e["key"] for e in entries}) == len(entries)
    assert records.write(tmp_path / "other", entries) == len(entries)
    assert {e["key"] for e in records.read(tmp_path / "other")} == {e["key"] for e in entries}
    assert records.write(tmp_path / "other", entries) == 0  # nothing twice
    assert records.digest(tmp_path / "other") is not None and records.digest(tmp_path / "empty") is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_push_and_pull_through_the_results_database(tuned_database, tmp_path, request, backend):
    """The lab's database: this host's SQLite, or the lab's PostgreSQL (a real server)."""
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 'lab.db'}"
    store = ResultStore(url)
    stored = push(tuned_database, TARGET, "local", store=store)
    assert stored == len(records.read(tuned_database, per_kernel=records.SHARED_PER_KERNEL)) > 0
    assert push(tuned_database, TARGET, "local", store=store) == 0
    assert store.tuning_targets() == [(target_key(TARGET), TARGET, stored)]
    assert pull(tmp_path / "host-b", TARGET, store=store) == stored
    assert pull(tmp_path / "host-c", {**TARGET, "mcpu": "znver3"}, store=store) == 0  # another target: none


def test_an_untuned_build_takes_the_tuned_records_it_finds(tuned_database, tmp_path):
    """Each kernel with a record builds with the best one; the rest with default schedules; same outputs."""
    from tvm import relax

    from pipeline.compiler.build import _cpu_build
    from pipeline.compiler.frontend import relax_module
    from pipeline.ingest import ingest
    from pipeline.quantize import QuantConfig, QuantizedModel
    from pipeline.workloads import WORKLOADS
    from targets.hashing import sha256_file
    from targets.profiles import load_profile

    info = ingest(WORKLOADS["digits-cnn"].model_path(), tmp_path / "ingest")
    fp32 = QuantizedModel(path=info.prepared_path, sha256=sha256_file(Path(info.prepared_path)),
                          config=QuantConfig(scheme="fp32"))
    mod, _ = relax_module(fp32, info, load_profile("x86-server"))
    with_records, counts = _cpu_build(mod, TARGET, 8, tuned_database)
    defaults, plain_counts = _cpu_build(mod, TARGET, 8)
    assert counts["tuned_records"] > 0 and counts["tuned_records"] + counts["default_scheduled"] == counts["kernels"]
    assert plain_counts["tuned_records"] == 0
    x = WORKLOADS["digits-cnn"].evaluation(4).inputs["image"]

    def run(executable):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])

    np.testing.assert_allclose(run(with_records), run(defaults), rtol=1e-5, atol=1e-5)


def test_a_tuning_run_holds_the_database_and_readers_step_aside(tuned_database, tmp_path):
    """While a tuning run holds a target's directory, a pull adds nothing and an untuned build reads no records
    (MetaSchedule's JSON database numbers workloads by its own view of the file: two writers corrupt it)."""
    entries = records.read(tuned_database)
    with records.locked(tmp_path / "busy", exclusive=True):
        assert records.write(tmp_path / "busy", entries) == 0
    assert records.write(tmp_path / "busy", entries) == len(entries)
    with records.locked(tmp_path / "busy", exclusive=True):
        assert records.best_for(tmp_path / "busy") is None
    assert records.best_for(tmp_path / "busy") is not None


def test_a_record_that_does_not_apply_leaves_the_kernel_its_default_schedule(tuned_database):
    """A record from another TVM, or a damaged one, must not fail the build: here every kernel is offered a record
    of another kernel, whose trace names blocks it doesn't have."""
    from tvm import relax

    from pipeline.compiler.tuning.defaults import default_schedules

    target = tvm.target.Target(TARGET)
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(np.ones((64, 64), "float32")))))
        builder.emit_func_output(out)
    from tvm.s_tir import meta_schedule as ms

    foreign = ms.database.JSONDatabase(work_dir=str(tuned_database)).get_all_tuning_records()[0]  # digits' kernel
    database, scheduled, kernels, from_records = default_schedules(builder.get(), target, 8, lambda kernel: foreign)
    assert from_records == 0 and scheduled == kernels > 0


def test_export_and_import_a_target_as_a_file(tuned_database, tmp_path):
    lab_a = ResultStore(f"sqlite:///{tmp_path / 'a.db'}")
    lab_b = ResultStore(f"sqlite:///{tmp_path / 'b.db'}")
    n = push(tuned_database, TARGET, "local", store=lab_a)
    exported = tmp_path / "haswell.jsonl"
    assert export_records(TARGET, exported, store=lab_a) == n
    assert json.loads(exported.read_text().splitlines()[0]) == {"format": FORMAT, "version": 1, "target": TARGET}
    assert import_records(exported, store=lab_b) == (TARGET, n, n)
    assert import_records(exported, store=lab_b) == (TARGET, n, 0)
    with pytest.raises(OptionError, match="no records"):
        export_records({**TARGET, "mcpu": "znver3"}, tmp_path / "none.jsonl", store=lab_a)


@pytest.mark.parametrize(("change", "where"), [
    (lambda lines: ["not json", *lines[1:]], "line 1: not JSON"),
    (lambda lines: lines[1:], "line 1: no header"),
    (lambda lines: [lines[0], lines[1].replace('"mean_s"', '"seconds"'), *lines[2:]], "line 2"),
    # a record edited after export: its key no longer names its kernel and schedule
    (lambda lines: [lines[0], json.dumps({**json.loads(lines[1]), "key": "0" * 64}), *lines[2:]], "line 2"),
])
def test_a_damaged_file_is_refused_with_its_line_and_nothing_stored(tuned_database, tmp_path, change, where):
    lab = ResultStore(f"sqlite:///{tmp_path / 'lab.db'}")
    push(tuned_database, TARGET, "local", store=lab)
    good = tmp_path / "good.jsonl"
    export_records(TARGET, good, store=lab)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(change(good.read_text().splitlines())) + "\n")
    empty = ResultStore(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(OptionError, match=where) as refused:
        import_records(bad, store=empty)
    assert "deploy tuning export" in refused.value.fix
    assert empty.tuning_targets() == []
    assert read_export(good)[0] == TARGET


def _deploy(*args: str, home: Path, db: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEDEPLOY_HOME": str(home), "EDGEDEPLOY_DB_URL": db}
    return subprocess.run([sys.executable, "-m", "edgedeploy", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_what_one_host_tunes_another_host_builds_with(tmp_path):
    """Two hosts (two EDGEDEPLOY_HOMEs) and one lab database: `deploy tune` on host A stores its records there;
    `deploy compile` on host B, untuned, builds kernels from them; the records leave as a file and come back."""
    db = f"sqlite:///{tmp_path / 'lab.db'}"
    avx2 = tmp_path / "avx2-here.yaml"  # the AVX2 server's target, timed on this machine
    avx2.write_text(f"extends: x86-server\nname: avx2-here\ncpu: {{cores: 2}}\nconnection:\n  transport: local\n"
                    f"  workdir: {tmp_path / 'device'}\n  python: [{sys.executable}]\n")
    tuned = _deploy("tune", "digits-cnn", "--profile", str(avx2), "--quant", "fp32", "--minutes", "0.2", "--json",
                    home=tmp_path / "host-a", db=db)
    assert tuned.returncode == 0, tuned.stderr
    summary = json.loads(tuned.stdout)
    assert summary["trials_added"] > 0 and summary["lab_records"] > 0 and summary["target"]["mcpu"] == "haswell"
    built = _deploy("compile", "digits-cnn", "--profile", str(avx2), "--out", str(tmp_path / "lib"), "--json",
                    home=tmp_path / "host-b", db=db)
    assert built.returncode == 0, built.stderr
    manifest = json.loads(Path(json.loads(built.stdout)["manifest"]).read_text())
    assert manifest["schedules"]["tuned_records"] > 0
    assert (tmp_path / "host-b" / "tuning").is_dir()  # pulled into B's own database
    listed = _deploy("tuning", "list", "--json", home=tmp_path / "host-b", db=db)
    assert json.loads(listed.stdout)[0]["records"] == summary["lab_records"]
    exported = _deploy("tuning", "export", str(tmp_path / "x.jsonl"), "--profile", str(avx2), "--json",
                       home=tmp_path / "host-b", db=db)
    assert json.loads(exported.stdout)["records"] == summary["lab_records"]
    imported = _deploy("tuning", "import", str(tmp_path / "x.jsonl"), "--json", home=tmp_path / "host-c",
                       db=f"sqlite:///{tmp_path / 'other-lab.db'}")
    assert json.loads(imported.stdout)["added"] == summary["lab_records"]
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    refused = _deploy("tuning", "import", str(garbage), home=tmp_path / "host-c", db=db)
    assert refused.returncode == 2 and "line 1: not JSON" in refused.stderr and "Traceback" not in refused.stderr
