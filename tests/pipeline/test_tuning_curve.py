"""Latency against trials from MetaSchedule's JSON database: this model's kernels only, weighted by calls,
failed candidates ignored, best-so-far per kernel."""

from __future__ import annotations

import json

from pipeline.compiler.tuning.curve import tuning_curve


def _database(folder, workloads, records):
    (folder / "database_workload.json").write_text("".join(json.dumps([h, "mod"]) + "\n" for h in workloads))
    (folder / "database_tuning_record.json").write_text(
        "".join(json.dumps([index, [["trace"], secs, {"kind": "llvm"}, []]]) + "\n" for index, secs in records))
    return folder


def test_curve_is_weighted_best_so_far_of_this_models_kernels(tmp_path):
    db = _database(tmp_path, ["111", "222", "999"], [
        (0, [0.004, 0.006]),  # kernel 111: 5 ms
        (2, [0.001]),  # another model's kernel: not counted
        (1, [1e10]),  # a failed candidate of 222: no estimate yet
        (1, [0.002]),  # 222: 2 ms -> every kernel measured: 1 x 5 + 3 x 2 = 11 ms
        (0, [0.003]),  # 111 improves: 3 + 6 = 9 ms
        (1, [0.009]),  # 222 gets a worse candidate: the best stays
    ])
    curve = tuning_curve(db, {"111": 1.0, "222": 3.0})
    assert [(p.trials, round(p.estimated_ms, 6)) for p in curve] == [(3, 11.0), (4, 9.0), (5, 9.0)]


def test_curve_is_thinned_keeping_the_last_point(tmp_path):
    db = _database(tmp_path, ["1"], [(0, [0.001 * (200 - i)]) for i in range(150)])
    curve = tuning_curve(db, {"1": 1.0}, max_points=10)
    assert len(curve) == 10 and curve[-1].trials == 150 and curve[0].trials == 1


def test_no_database_no_curve(tmp_path):
    assert tuning_curve(tmp_path / "missing", {"1": 1.0}) == []
