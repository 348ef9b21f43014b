"""Tuning that starts from the default schedule: each task's first batch measures it beside the search's candidates.

MetaSchedule's search starts from random samples of the design space. A build takes each kernel's best MEASURED
record, so a kernel that a short budget reached for a batch or two took the best of a few random candidates, even
where every one of them was slower than the default schedule the untuned build would have given it
(tuning.defaults): on the AVX2 EPYC, YOLOX int8 tuned 9 minutes ran 0.90x of onnxruntime fp32 against 0.91x untuned,
and the digits CNN's tuned builds measured slower than its untuned ones (docs/performance.md).

:class:`DefaultFirst` adds the kernel's default schedule to the task's first batch: it is timed like any
candidate, stored with its time, and from then on the best record is never a schedule measured slower than the
default; the evolutionary search, which breeds from the database's best records, breeds from it too. A kernel the
database already holds records for (tuned before, by any model or host) gets no seed.
"""

from __future__ import annotations

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

from pipeline.compiler.tuning.defaults import default_schedule, dot_lanes


@derived_object
class DefaultFirst(PySearchStrategy):
    """``strategy``, with the task's default schedule (``lanes``: the target's vector lanes; ``dot``: the module's
    dot-product layout, passes.dot, or None) measured in the task's first batch, as one of its trials."""

    def __init__(self, strategy, lanes: int, dot=None) -> None:
        super().__init__()
        self.strategy, self.lanes, self.dot = strategy, lanes, dot
        self.context, self.seed, self.seeded = None, [], 0

    def _initialize_with_tune_context(self, context) -> None:
        self.context = context
        self.strategy._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

        self.seed = []
        # MetaSchedule commits every task's workload before tuning: records, not the workload, say it was tuned.
        if database is None or not len(database.get_top_k(database.commit_workload(self.context.mod), 1)):
            schedule = default_schedule(self.context, list(design_spaces), self.lanes,
                                        dot_lanes(self.context.task_name or "", self.dot))
            if schedule is not None:
                self.seed = [MeasureCandidate(schedule, ArgInfo.from_entry_func(schedule.mod, remove_preproc=True))]
        # The default schedule is one of the task's trials: the search gets the others.
        self.strategy.pre_tuning(max_trials - len(self.seed), num_trials_per_iter, design_spaces, database,
                                 cost_model)

    def post_tuning(self) -> None:
        self.strategy.post_tuning()

    def generate_measure_candidates(self):
        batch = self.strategy.generate_measure_candidates()
        if not self.seed:
            return batch
        seed, self.seed = self.seed, []
        self.seeded = len(seed)
        return seed + list(batch or [])

    def notify_runner_results(self, measure_candidates, results) -> None:
        # The search learns of its own candidates only (the cost model learns of every one: MetaSchedule's callback).
        seeded, self.seeded = self.seeded, 0
        if len(measure_candidates) > seeded:
            self.strategy.notify_runner_results(list(measure_candidates)[seeded:], list(results)[seeded:])

    def clone(self):
        return DefaultFirst(self.strategy.clone(), self.lanes, self.dot)
