"""How a MetaSchedule run measures and when it stops: a time budget, and clean timings on a shared machine.

MetaSchedule overlaps its work: while the runner times one task's candidates, it already breeds and builds the
next task's, on every core. Right for a board across the network; on the machine that also does the search (the
`local` profile, or a lab device behind a loopback sshd) the timings then include the search's load, and the
cost model learns from noise. ``OneAtATime`` makes the runner finish timing before anything else runs.

Candidates are timed with the thread count the deployed model runs with (``THREADS_VARIABLE``): left alone, TVM
sizes its thread pool at half the logical CPUs on x86 (it assumes hyper-threading), so on the 2-core lab device
every candidate was timed on ONE thread while the deployed model ran on two. The tuner then ranked schedules by
how they run on one core, and its database times were 1.3-2.2x the deployed kernels' (YOLOX: 136 ms estimated
for a 71-95 ms model): the search optimised a different program from the one shipped.
"""

from __future__ import annotations

import functools
import os
import random
import time

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, PyRunner, PyRunnerFuture, RunnerResult
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

PLACEMENTS = 5  # fresh argument sets per candidate; the fastest counts
# Each placement timed for >= 20 ms: five cost what MetaSchedule's one of >= 100 ms did.
EVALUATOR = EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
GAP_FLOATS = 1024  # at most, between two arguments: up to 4 KiB, every offset within a page
THREADS_VARIABLE = "TVM_NUM_THREADS"  # read by TVM's thread pool when a process first runs a parallel kernel


def use_threads(threads: int) -> None:
    """In a runner's worker process, before it times anything: TVM's kernels run on ``threads`` threads."""
    os.environ[THREADS_VARIABLE] = str(threads)


def tvm_threads() -> int:
    """The thread count TVM's parallel kernels run with in this process."""
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def spaced_arguments(fill, device, args_info: list, placements: int) -> tuple[list[list], list]:
    """``placements`` argument sets for one candidate, filled by ``fill`` (MetaSchedule's random fill), with a
    random gap allocated before every argument; and the gaps, which the caller holds until the sets are timed.
    Works on a board's device over RPC too."""
    import tvm

    sets, gaps = [], []
    for _ in range(placements):
        arguments = []
        for _, dtype, shape in args_info:  # MetaSchedule's TensorInfo as JSON: ("TENSOR", dtype, shape)
            gaps.append(tvm.runtime.empty((random.randint(1, GAP_FLOATS),), "float32", device))
            argument = tvm.runtime.empty(shape, dtype, device)
            fill(argument)
            arguments.append(argument)
        sets.append(arguments)
    return sets, gaps


_local_gaps: list = []  # the gaps of the candidate the LocalRunner's worker is timing (replaced by the next)


def _local_arguments(device, args_info: list, placements: int) -> list[list]:
    """MetaSchedule's f_alloc_argument in the LocalRunner's worker, which must return the sets alone."""
    import tvm_ffi

    sets, _local_gaps[:] = spaced_arguments(tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure"),
                                            device, args_info, placements)
    return sets


def local_runner(threads: int) -> LocalRunner:
    """MetaSchedule's runner on this machine, timing candidates on ``threads`` threads (the deployment's), on
    ``PLACEMENTS`` spaced argument sets each (wrap it in ``OneAtATime``, which keeps the fastest)."""
    return LocalRunner(evaluator_config=EVALUATOR, alloc_repeat=PLACEMENTS, f_alloc_argument=_local_arguments,
                       initializer=functools.partial(use_threads, threads))


def fastest_placement(result: RunnerResult) -> RunnerResult:
    """One cost per candidate: the fastest of its placements (their mean would mix two speeds of one kernel)."""
    if result.error_msg or not result.run_secs:
        return result
    return RunnerResult([min(float(cost) for cost in result.run_secs)], None)


def runner_threads(runner: LocalRunner) -> int:
    """The thread count ``runner``'s worker times candidates with, asked of the worker itself."""
    return runner.pool.submit(tvm_threads).result()


@derived_object
class _Measured(PyRunnerFuture):
    """A candidate already timed."""

    def __init__(self, result: RunnerResult) -> None:
        super().__init__()
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return self._result


@derived_object
class OneAtATime(PyRunner):
    """``runner``, but ``run`` returns only once every candidate of the batch is timed: nothing else of the
    tuning run (search, builds) runs beside the measurements. Each candidate's cost is its fastest placement."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def run(self, runner_inputs):
        return [_Measured(fastest_placement(future.result())) for future in self.runner.run(runner_inputs)]


def _now() -> float:
    return time.monotonic()


class Deadline:
    """A tuning run's time budget, ``seconds`` from now."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = _now()
        self.reached = False

    def expired(self) -> bool:
        """Whether the budget is spent (remembered: the caller asks ``reached`` afterwards)."""
        if _now() - self.started >= self.seconds:
            self.reached = True
        return self.reached


@derived_object
class UntilDeadline(PySearchStrategy):
    """``strategy`` for one task until ``deadline`` expires, then no more candidates: MetaSchedule ends a task
    whose strategy has none, and the run ends when every task has ended, every batch measured and stored.

    Past the deadline a task first gets an empty batch, and only when it asks again, nothing: MetaSchedule's
    first round hands every task out once before it joins any batch, and then joins every task's, and its
    JoinRunningTask checks that the task has a batch (in TVM's source; an empty one passes). An earlier budget stopped
    the run instead, by raising from a measure callback: MetaSchedule joins batches only after that first round,
    so the budget was overrun by as long as the round took (YOLOX int8, 81 tasks: ~50 minutes for a 30-minute
    budget), and the exception, raised at the first batch joined, lost every other task's batch of the round.
    Tasks the round never reached keep their untuned schedules (the report counts the tuned kernels)."""

    def __init__(self, strategy, deadline: Deadline) -> None:
        super().__init__()
        self.strategy, self.deadline, self.emptied = strategy, deadline, False

    def _initialize_with_tune_context(self, context) -> None:
        self.strategy._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.strategy.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.strategy.post_tuning()

    def generate_measure_candidates(self):
        if not self.deadline.expired():
            return self.strategy.generate_measure_candidates()
        if self.emptied:
            return None
        self.emptied = True
        return []

    def notify_runner_results(self, measure_candidates, results) -> None:
        if len(measure_candidates):
            self.strategy.notify_runner_results(measure_candidates, results)

    def clone(self):
        return UntilDeadline(self.strategy.clone(), self.deadline)
