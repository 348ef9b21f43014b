"""MetaSchedule for one build: how many trials in how long, the search, builds in forked processes, candidates
timed here or on the board (through the session the orchestrator hands in), and the library built from the tuning
database."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tvm
import tvm_ffi
from pydantic import BaseModel, ConfigDict, Field

from edgedeploy.errors import CompileError
from pipeline.compiler.passes.dot import AVX2
from pipeline.compiler.passes.dot_intrinsics import search_space
from pipeline.compiler.tuning.curve import CurvePoint, tuning_curve
from pipeline.compiler.tuning.defaults import default_schedules, dot_layout, vector_lanes_of
from pipeline.compiler.tuning.forked_builds import build_all
from pipeline.compiler.tuning.lowering import decompose, fuse, register_cpu_rules, unnamed_handlers_detached
from pipeline.compiler.tuning.ranking import slowest_first, timed_defaults
from pipeline.compiler.tuning.records import locked, lookup_in
from pipeline.compiler.tuning.seeded import DefaultFirst
from targets.hashing import sha256_bytes
from targets.profiles import DeviceProfile

if TYPE_CHECKING:
    from pipeline.compiler.tuning.board import BoardRunner


# Opens TVM's RPC server on a profile's board for one tuning run, over the caller's session with it
# (pipeline.session.tuning_board).
TuningBoard = Callable[[DeviceProfile], AbstractContextManager["BoardRunner"]]


class Tuning(BaseModel):
    """MetaSchedule tuning of this build: how many trials were added, in how long, to which database."""

    model_config = ConfigDict(frozen=True)
    trials_per_task: int
    tasks: int = Field(description="Tasks (kernels) tuned: the model's, or the slowest a time budget affords.")
    model_tasks: int = Field(default=0, description="The model's tasks; those not tuned kept default schedules.")
    ranked_by: str = Field(default="flops", description="How the tuned tasks were chosen where the budget could not "
                           "take them all: 'time' (the slowest, each timed first: tuning.ranking), else 'flops'.")
    seconds: float
    database: str
    records: int = Field(description="Tuning records in the database after this run (all runs, all models).")
    curve: list[CurvePoint] = Field(default_factory=list, description="Estimated latency of this model against "
                                    "its trials so far (all runs): MetaSchedule's per-kernel times x calls.")
    scheduled: int = Field(default=0, description="Kernels of the built library that got a tuned schedule.")
    default_scheduled: int = Field(default=0, description="Kernels no trial reached (yet), built with a default "
                                                          "schedule (tuning.defaults) rather than TVM's naive loops.")
    measured_on: str = Field(default="local", description="Where candidates were timed: 'local', or the board "
                                                          "(user@host:port) whose RPC server timed them over SSH.")
    minutes: float | None = Field(default=None, description="The run's time budget (--tune-minutes), if any.")
    stopped_by_time: bool = Field(default=False, description="The time budget ended the run before its trials.")
    trials_added: int = Field(default=0, description="Records this run added to the database.")
    trials_per_round: int = Field(default=0, description="Candidates a task got per round of the search.")
    threads: int | None = Field(default=None, description="Threads every candidate was timed with, as the TVM that "
                                "timed them reported it: the deployment's (the profile's cores).")


EVOLUTIONARY_MIN_TRIALS = 64


TRIALS_PER_ROUND = 64  # MetaSchedule's default: candidates measured per task per round of the evolutionary search


FIRST_ROUND_SHARE = 1 / 3  # of a time budget, at most, for the round every task gets before the cost model steers
MIN_TRIALS_PER_ROUND = 16  # fewer, and breeding a round's candidates costs more than measuring them


SECONDS_PER_TRIAL = 1.0  # build + time one candidate, measured on the x86 lab device (2 cores); boards are slower


def first_round_trials(minutes: float) -> float:
    """Trials the round every task gets first may take of a ``minutes`` budget (FIRST_ROUND_SHARE of it)."""
    return minutes * 60 * FIRST_ROUND_SHARE / SECONDS_PER_TRIAL


def trials_per_round(trials: int, tasks: int, minutes: float | None) -> int:
    """Candidates a task gets per round. MetaSchedule gives every task one round, in turn, before the cost model
    decides which kernels deserve more: at 64 a round YOLOX's 49 tasks would spend ~45 of 57 minutes on random
    candidates and leave little for the evolutionary search on its heavy convs. With a time budget the first
    round aims at a third of it (YOLOX, 23 a round: 22 of 57 minutes, measured; docs/lab-x86/tuning-yolox-1h.md),
    never below 16 a round, where choosing the candidates would cost more than measuring them."""
    if trials < EVOLUTIONARY_MIN_TRIALS:
        return min(trials, 16)  # replay-trace: random candidates, no cost model to feed
    if not minutes:
        return TRIALS_PER_ROUND
    return max(MIN_TRIALS_PER_ROUND, min(TRIALS_PER_ROUND, int(first_round_trials(minutes) / max(tasks, 1))))


def affordable_tasks(tasks: list, trials: int, minutes: float | None) -> list:
    """The first of ``tasks`` (heaviest_first's order, or tuning.ranking's slowest_first) whose first round,
    MIN_TRIALS_PER_ROUND candidates and the default schedule each, fits in FIRST_ROUND_SHARE of a time budget; all of
    them without one, or for a random search. A budget that gives every task a first round leaves the evolutionary
    search nothing: PP-LCNet int8's 38 tasks took 17 random candidates each in the whole of its 8.4 minutes (`--quant
    auto --tune-minutes 15`, AVX2 EPYC), and its library measured as the untuned one (1.19x against 1.18x). The tasks
    left out keep their default schedules (tuning.defaults), which the first round seldom beat."""
    if not minutes or trials < EVOLUTIONARY_MIN_TRIALS:
        return tasks
    return tasks[:max(1, int(first_round_trials(minutes) / (MIN_TRIALS_PER_ROUND + 1)))]


RANKING_SHARE = 1 / 8  # of a time budget, at most, for timing every kernel first (tuning.ranking)


def timing_fits(tasks: int, minutes: float | None) -> bool:
    """Does timing every one of ``tasks`` kernels first (about a trial each) fit in RANKING_SHARE of the budget? A
    budget too short for that keeps the FLOPs order: `deploy bench`'s 0.1 minutes would otherwise spend ~45 s timing
    YOLOX's 120 kernels."""
    return bool(minutes) and tasks * SECONDS_PER_TRIAL <= minutes * 60 * RANKING_SHARE


# MetaSchedule breeds 512 candidates (population_size) for the 64 it measures a round, and the breeding
# (sampling, mutating, scoring every one with the cost model) is what a short budget spends most of its time on:
# 70 % of 30 minutes for PP-LCNet fp32, 76 % for its int8 model, 65 % of 20 minutes for YOLOX (measured from the
# tuning logs: pick -> "to builder" = search, -> "to runner" = build, -> next pick = timing). Keep MetaSchedule's
# ratio, 8 bred per measured one, for the smaller rounds trials_per_round asks for.
POPULATION_PER_TRIAL = 512 // TRIALS_PER_ROUND


def search_strategy(trials: int, per_round: int):
    """MetaSchedule's search: the evolutionary one, sized to the round, or random candidates for a handful."""
    from tvm.s_tir import meta_schedule as ms

    if trials < EVOLUTIONARY_MIN_TRIALS:
        return "replay-trace"
    return ms.search_strategy.EvolutionarySearch(population_size=POPULATION_PER_TRIAL * per_round)


def tuning_dir(target: dict[str, Any], root: Path) -> Path:
    """One persistent database per target: a workload tuned once serves every later run and model."""
    return root / sha256_bytes(json.dumps(target, sort_keys=True).encode())[:16]



def _scheduled_kernels(database, decomposed: tvm.IRModule, target: tvm.target.Target) -> int:
    """How many of the kernels compile_relax will make from ``decomposed`` find a schedule in ``database``.

    compile_relax fuses the module it is given; a module fused before (as this file once did) is fused again
    into kernels no task ever tuned, and the tuned "library" ran 1.3-20x SLOWER than the untuned one."""
    from tvm import relax, tirx

    with target, database, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase()(fuse(decomposed, target))
    return sum(1 for func in applied.functions.values()
               if isinstance(func, tirx.PrimFunc) and func.attrs and func.attrs.get("tirx.is_scheduled", False))


BUILD_TIMEOUT_S = 60.0  # a candidate LLVM needs longer for is a failed trial (real ones take 0.1-2 s)


def forked_builder(export=None, timeout_s: float = BUILD_TIMEOUT_S):
    """MetaSchedule's LocalBuilder starts worker processes that each spend ~40 s importing TVM's tensor
    intrinsics; forks of this process (one per core) build in 0.1-0.5 s per candidate, and one that hangs the
    compiler is stopped after ``timeout_s`` (tuning.forked_builds). ``export`` turns a built candidate into a
    file (MetaSchedule's default: a .tar of objects). The forks have the intrinsics ``tune_and_compile``
    registered for the target (compiler.intrinsics), not TVM's whole set: importing that here cost board
    tuning 89 s."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    export = export or default_export

    def build_one(item) -> str:
        return export(default_build(item.mod, item.target, item.params))

    @derived_object
    class ForkedBuilder(PyBuilder):
        def build(self, build_inputs):
            # A candidate that doesn't build (or not in time) is a failed trial, not a failed run.
            return [BuilderResult(path, error)
                    for path, error in build_all(list(build_inputs), build_one, timeout_s=timeout_s,
                                                  workers=os.cpu_count() or 1)]

    return ForkedBuilder()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """MetaSchedule logs to the process's stdout (Python handlers bound at import, and C++), which belongs to
    --json: point file descriptor 1 at stderr while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    moved = [h for name in list(logging.Logger.manager.loggerDict) if name.startswith("tvm")
             for h in getattr(logging.getLogger(name), "handlers", [])
             if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    try:
        os.dup2(2, 1)
        for handler in moved:
            handler.setStream(sys.stderr)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        for handler in moved:
            handler.setStream(sys.stdout)


def tuning_refusal(profile: DeviceProfile, trials: int,
                   tuning_board: TuningBoard | None = None) -> CompileError | None:
    """Why ``profile`` can't be tuned for, or None, before any work. A local CPU is timed here; a board over SSH by
    TVM's RPC server started there (tuning.board), through ``tuning_board``, the caller's way to the board."""
    remote = profile.connection.transport != "local"
    if profile.tvm_gpu_target():
        expected = ("a CPU profile: GPU kernels are built with dlight's default schedules, and tuning them would "
                    "need CUDA on the board and a GPU runner, which edgedeploy doesn't have")
    elif remote and not profile.has_runtime("tvm"):
        expected = ("a board with TVM: tuning times each candidate with TVM's RPC server on the board, and this "
                    "profile says it has no TVM (runtimes.tvm: null)")
    elif remote and tuning_board is None:
        return CompileError(f"Tuning for profile {profile.name!r} times its candidates on the board, and no way to "
                            "the board was given", value=f"--tune-trials {trials}",
                            fix="tune through `deploy run` or `deploy compile`, which hand the compiler a board "
                                "session")
    else:
        return None
    return CompileError(f"Tuning for profile {profile.name!r} is not available", value=f"--tune-trials {trials}",
                        expected=expected, fix="use --tune-trials 0 for this profile")


def tuned_build(mod: tvm.IRModule, cpu: dict[str, Any], trials: int, database_dir: Path,
                 profile: DeviceProfile | None = None, minutes: float | None = None,
                 tuning_board: TuningBoard | None = None):
    """Tune and build; candidates are timed here, or on the board when ``profile`` is reached over SSH (through
    ``tuning_board``, the caller's way to it, which compile_model has checked is there). The database directory is
    this run's alone meanwhile (tuning.records.locked): another tuning run of the target on this host waits."""
    with locked(database_dir, exclusive=True):
        return _tuned_build(mod, cpu, trials, database_dir, profile, minutes, tuning_board)


def _tuned_build(mod: tvm.IRModule, cpu: dict[str, Any], trials: int, database_dir: Path,
                 profile: DeviceProfile | None, minutes: float | None, tuning_board: TuningBoard | None):
    with _stdout_to_stderr():
        if profile is None or profile.connection.transport == "local":
            return tune_and_compile(mod, cpu, trials, database_dir, minutes=minutes)
        from pipeline.compiler.tuning import board as remote_tuning

        with tuning_board(profile) as board, remote_tuning.candidate_scratch() as scratch:
            # Each candidate is linked here (the board's cross compiler) and loaded there as it is.
            export = functools.partial(remote_tuning.export_shared, cross_compiler=profile.cross_compiler,
                                       scratch=scratch)
            executable, tuning = tune_and_compile(
                mod, cpu, trials, database_dir, runner=board.runner, builder=forked_builder(export),
                measured_on=board.where, minutes=minutes, shared_machine=_is_loopback(profile.connection.host))
            stats, server_ended = board.runner.stats, not board.server.running
        if server_ended:  # before we stopped it: whatever it timed after that is missing
            raise CompileError(f"TVM's RPC server on the device {board.where} exited during tuning",
                               value=board.server.output(15) or "(no output)", measured=stats.measured,
                               failed=stats.failed, fix="see the server's last lines; run again to add trials")
        if stats.failed and not stats.measured:
            raise CompileError(
                f"No tuning candidate could be timed on the device {board.where}", value=stats.first_error,
                fix=f"check that the device's TVM is this machine's version ({tvm.__version__}) and can load "
                    "libraries linked here, or use --tune-trials 0",
                failed=stats.failed,
            )
        return executable, tuning


def _is_loopback(host: str | None) -> bool:
    """A board behind an sshd on this machine (the x86 lab device) shares its cores with the tuning run."""
    return host in ("127.0.0.1", "::1", "localhost")


def tune_and_compile(mod: tvm.IRModule, cpu: dict[str, Any], trials: int, database_dir: Path, *,
                      runner=None, builder=None, measured_on: str = "local", minutes: float | None = None,
                      shared_machine: bool = True):
    """Add up to ``trials`` MetaSchedule trials per task (for at most ``minutes``) and build from the database.
    Candidates are timed by ``runner``: MetaSchedule's LocalRunner (on THIS machine) when None; on a
    ``shared_machine`` nothing else of the run goes on while they are timed."""
    from tvm.s_tir import meta_schedule as ms

    from pipeline.compiler.tuning.control import Deadline, OneAtATime, UntilDeadline, local_runner, runner_threads

    target = tvm.target.Target(cpu)
    register_cpu_rules(target)  # the Winograd transforms' too, whoever rewrote the module
    decomposed = decompose(mod, target)
    mod = fuse(decomposed, target)
    model_tasks = heaviest_first(ms.relax_integration.extract_tasks(mod, target))
    database_dir.mkdir(parents=True, exist_ok=True)
    # Timed on the threads the deployed model runs with; TVM's default is half of them on x86 (tuning.control).
    threads = int(cpu["num-cores"])
    local = runner is None
    runner = runner or local_runner(threads)
    measuring = OneAtATime(runner) if shared_machine else runner
    builder = builder or forked_builder()
    deadline = Deadline(minutes * 60) if minutes else None
    before = _records(database_dir)
    started = time.perf_counter()
    dot = dot_layout(decomposed)
    tasks = affordable_tasks(model_tasks, trials, minutes)
    ranked_by_time = len(tasks) < len(model_tasks) and timing_fits(len(model_tasks), minutes)
    if ranked_by_time:  # a short budget: to the kernels that take the most time, each timed first (tuning.ranking)
        with unnamed_handlers_detached():
            kernel_seconds = timed_defaults(model_tasks, target, vector_lanes_of(target), dot, builder, measuring,
                                            ms.database.JSONDatabase(work_dir=str(database_dir)))
        model_tasks = slowest_first(model_tasks, kernel_seconds)
        tasks = affordable_tasks(model_tasks, trials, minutes)
    # The evolutionary search breeds a population per round: worth it for real budgets, minutes of overhead for a
    # handful of trials, where random sampling of the design space does as well. Each round costs seconds of
    # breeding and cost-model training whatever it measures: how many it measures is trials_per_round's call.
    per_round = trials_per_round(trials, len(tasks), minutes)
    strategy = search_strategy(trials, per_round)
    strategy = DefaultFirst(ms.search_strategy.SearchStrategy.create(strategy) if isinstance(strategy, str)
                            else strategy, vector_lanes_of(target), dot)
    if deadline:  # MetaSchedule's first round gives every task one batch, budget or not: end it at the deadline
        strategy = UntilDeadline(strategy, deadline)
    with unnamed_handlers_detached():  # the contexts' loggers are configured here too
        contexts, task_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, work_dir=str(database_dir), strategy=strategy,
            space=search_space(avx2=dot is AVX2) if dot else "post-order-apply")
        database = ms.tune.tune_tasks(
            tasks=contexts, task_weights=task_weights, work_dir=str(database_dir),
            max_trials_global=trials * max(len(tasks), 1), max_trials_per_task=trials,
            num_trials_per_iter=per_round, builder=builder, runner=measuring,
            measure_callbacks=ms.MeasureCallback.create("default"),
        )
    seconds = time.perf_counter() - started
    # Each kernel's best record; a kernel the budget never reached (YOLOX after 10 minutes: 79 of 120, TVM's naive
    # loops, 118 ms against 42 ms untuned) its default schedule. compile_relax fuses by itself: give it the module
    # before fusion, or the tuned kernels never match.
    applied, defaulted, _, _ = default_schedules(decomposed, target, vector_lanes_of(target), lookup_in(database))
    executable = ms.relax_integration.compile_relax(applied, decomposed, target, params=None)
    records = _records(database_dir)
    # The database names each kernel by this hash; weight = its calls per inference.
    weights = {str(tvm_ffi.structural_hash(task.dispatched[0])): float(task.weight) for task in model_tasks}
    return executable, Tuning(trials_per_task=trials, tasks=len(tasks), model_tasks=len(model_tasks),
                              ranked_by="time" if ranked_by_time else "flops",
                              seconds=seconds, database=str(database_dir),
                              records=records, measured_on=measured_on, curve=tuning_curve(database_dir, weights),
                              scheduled=_scheduled_kernels(database, decomposed, target), minutes=minutes,
                              default_scheduled=defaulted,
                              stopped_by_time=bool(deadline and deadline.reached),
                              trials_added=records - before, trials_per_round=per_round,
                              threads=runner_threads(runner) if local else runner.stats.threads)


def heaviest_first(tasks: list) -> list:
    """Tasks by their work per inference (FLOPs x calls), most first: MetaSchedule's first round takes them in
    this order, so a time budget that ends the round early leaves the cheapest kernels untuned, not the convs."""
    from tvm.s_tir.analysis import estimate_tir_flops

    return sorted(tasks, key=lambda task: -estimate_tir_flops(task.dispatched[0]) * float(task.weight))


def _records(database_dir: Path) -> int:
    """Tuning records in a database directory so far (one JSON line each)."""
    path = database_dir / "database_tuning_record.json"
    if not path.exists():
        return 0
    with path.open("rb") as lines:
        return sum(1 for line in lines if line.strip())
