"""Which kernels a short tuning budget goes to: the slowest, each timed first under its default schedule.

A budget too short for every task's first round tunes only the first few tasks (search.affordable_tasks), and FLOPs
x calls is a poor guess at where the time goes once some kernels compute int8 through a dot-product instruction and
others stay float or move more bytes than they compute. Here each task's kernel is built with its default schedule
(tuning.defaults), or taken at its best record where the database has one, and timed as a candidate is (the run's
builder and runner: here, or on the board); the tasks are ranked by that time x calls. The timings are the tasks'
first records, which the tuning would have measured first anyway (seeded.DefaultFirst skips a task that has one).
Only where that timing fits in an eighth of the budget (search.timing_fits).
PP-LCNet int8 on the AVX2 AMD EPYC (2026-12-07): its 38 kernels timed in 14.5 s; the slowest is the float stem conv
(170 us for 13 MFLOP), which the FLOPs ranking left out of an 8.4-minute budget's 9 tasks, against 86-106 us for the
int8 1x1 convs of 26-28 MFLOP. Timed alone, a kernel runs with its inputs in cache: the memory-bound ones (the
depthwise convs, 70-80 us here) read 2x slower in the whole model (the device runner's kernel timings).
"""

from __future__ import annotations

import statistics
from typing import Any

import tvm


def _seconds(measured) -> float:  # a tuning record's or a runner result's run_secs
    return statistics.fmean(float(s) for s in measured.run_secs)


def timed_defaults(tasks: list, target: tvm.target.Target, lanes: int, dot, builder, runner,
                   database) -> list[float | None]:
    """Seconds per call of each task's kernel: its best record in ``database``, else its default schedule built by
    ``builder`` and timed by ``runner`` (committed to ``database`` as the task's record); None where neither works."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import remove_build_dir

    from pipeline.compiler.tuning.defaults import task_default_schedule

    seconds: list[float | None] = [None] * len(tasks)
    pending: list[tuple[int, Any, Any]] = []  # (task index, workload, schedule)
    for index, task in enumerate(tasks):
        workload = database.commit_workload(task.dispatched[0])
        if best := database.get_top_k(workload, 1):
            seconds[index] = _seconds(best[0])
            continue
        if (schedule := task_default_schedule(task, target, lanes, dot)) is not None:  # else ranked last
            pending.append((index, workload, schedule))
    if not pending:
        return seconds
    built = builder.build([ms.builder.BuilderInput(schedule.mod, target) for _, _, schedule in pending])
    timed = [(item, result) for item, result in zip(pending, built, strict=True) if result.error_msg is None]
    arguments = [ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)
                 for (_, _, schedule), _ in timed]
    # "cpu": tuning runs for CPU targets only (compile_model refuses a GPU profile's), here or on the board.
    futures = runner.run([ms.runner.RunnerInput(result.artifact_path, "cpu", args)
                          for (_, result), args in zip(timed, arguments, strict=True)])
    for ((index, workload, schedule), build), args, future in zip(timed, arguments, futures, strict=True):
        result = future.result()
        remove_build_dir(build.artifact_path)  # as MetaSchedule does after each candidate
        if result.error_msg is None and result.run_secs:
            database.commit_tuning_record(ms.database.TuningRecord(schedule.trace, workload, result.run_secs,
                                                                   target, args))
            seconds[index] = _seconds(result)
    return seconds


def slowest_first(tasks: list, seconds: list[float | None]) -> list:
    """``tasks`` by their time per inference (``seconds`` x calls), most first; those not timed last, in the order
    they came (search.heaviest_first's)."""
    order = sorted(range(len(tasks)),
                   key=lambda i: (seconds[i] is None, -(seconds[i] or 0.0) * float(tasks[i].weight)))
    return [tasks[i] for i in order]
