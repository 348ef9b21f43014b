"""Tuning for a board over SSH: MetaSchedule measures every candidate on the board itself, over the transport of a
session with the board that the caller hands in (pipeline.session.tuning_board): no connection code here.

    this machine                                             the board (over one SSH connection)
    MetaSchedule
     ├─ builder: in this process; links each candidate's .so here (the profile's cross compiler, if any)
     └─ TunnelRunner ─ worker process ─ rpc.connect(127.0.0.1:F)
                                          F: PortForward ── direct-tcpip ──► 127.0.0.1:P
                                                                              TVM RPC server (its key: a file)
                                                                              (ServingTransport.start: dies with
                                                                               its process group when we are done)

The RPC client runs in a worker process (MetaSchedule's PopenPoolExecutor, as its own RPCRunner does), never in
this one: TVM frees remote objects in destructors that wait for the board's answer while holding the GIL, and the
answer comes through the forward's threads, which live here and need the GIL: both in one process deadlock.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, PyRunnerFuture, RunnerResult
from tvm.support.popen_pool import PopenPoolExecutor

from edgedeploy.errors import PreflightError, TransportError
from pipeline.compiler.tuning.control import (
    EVALUATOR,
    PLACEMENTS,
    THREADS_VARIABLE,
    fastest_placement,
    spaced_arguments,
)
from pipeline.preflight import probe
from targets.profiles import DeviceProfile
from targets.transport import NothingListening, PortForward, RemoteProcess, ServingTransport

# TVM's RPC server, started so that its key never appears on a command line (any user of the board reads those in
# ps): it reads the key from a file in its private scratch directory (mode 700), removes the file, and calls the
# server's main with it. Arguments: key file, host, first port, last port.
SERVER_LAUNCHER = """\
import argparse, logging, os, sys
path = sys.argv[1]
with open(path) as handle:
    key = handle.read().strip()
os.remove(path)
from tvm.exec import rpc_server
logging.basicConfig(level=logging.INFO)
rpc_server.main(argparse.Namespace(host=sys.argv[2], port=int(sys.argv[3]), port_end=int(sys.argv[4]), key=key,
                                   through_proxy=False, tracker=None, silent=False, load_library=None, fork=True,
                                   custom_addr=None))
"""
# The server takes the first free port from a random start in [9090, 9150) up to 9199 on the board's loopback.
# Random, because two servers starting at once on one board (two tuning runs) could both bind the same port (TVM
# sets SO_REUSEADDR, which Linux lets two sockets share until one listens) and then the second dies in listen().
SERVER_PORTS = (9090, 9150, 9199)
BOUND = r"bind to 127\.0\.0\.1:(\d+)"  # what tvm.rpc.server logs once bound (it listens a moment later)
LISTEN_GRACE_S = 30.0
# How long the server may live at most (the `timeout` around it): a safety net only; it is stopped as soon as
# tuning ends, and dies at once if this process or the SSH connection goes away.
SERVER_LIFETIME_S = 6 * 3600
SERVER_FIX = ("TVM's RPC server needs TVM's `rpc` extra on the device (pip install 'apache-tvm[rpc]': cloudpickle, "
              "psutil), and starts a worker with its own interpreter (sys.executable), which must run there by itself "
              "(not under an emulator without binfmt_misc)")


def export_shared(module, cross_compiler: str | None, scratch: str | None = None) -> str:
    """Builder export: a candidate as a shared library linked here (with the board's cross compiler, if any). The
    board's RPC server loads it as it is, where MetaSchedule's default .tar would need a C compiler on the board.
    MetaSchedule removes its directory once the candidate is timed (meta_schedule.remove_build_dir); those built
    but not yet timed when tuning stops are left to whoever owns ``scratch`` (``candidate_scratch``)."""
    path = os.path.join(tempfile.mkdtemp(prefix="edgedeploy-candidate-", dir=scratch), "candidate.so")
    module.export_library(path, **({"cc": cross_compiler} if cross_compiler else {}))
    return path


@contextlib.contextmanager
def candidate_scratch() -> Iterator[str]:
    """A directory for one tuning run's candidate libraries, removed with everything left in it when the run ends,
    however it ends: a run stopped by an error or Ctrl-C leaves a whole batch built and never timed."""
    with tempfile.TemporaryDirectory(prefix="edgedeploy-tuning-") as scratch:
        yield scratch


def _measure(port: int, key: str, session_timeout: float, evaluator: EvaluatorConfig, alloc_repeat: int,
             artifact_path: str, device_type: str, args_info: list) -> tuple[list[float], int]:
    """In the worker process: one RPC session per candidate (a crash or hang ends only that session); the
    board's server deletes the uploaded file with the session's directory. Returns the costs and the thread
    count the board's TVM timed them with."""
    from tvm import rpc
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_run_evaluator, default_upload_module

    session = rpc.connect("127.0.0.1", port, key=key, session_timeout=session_timeout)
    device = session.device(device_type, 0)
    module = default_upload_module(session, artifact_path, os.path.basename(artifact_path))
    fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    args, gaps = spaced_arguments(fill, device, args_info, alloc_repeat)
    costs = default_run_evaluator(session, module, device, evaluator, args)
    del gaps  # held until the sets were timed, freed within this session
    return costs, int(session.get_function("runtime.NumThreads")())


@dataclass
class MeasureStats:
    """What the runner saw: candidates timed on the board, those that failed (with the first reason), and the
    thread count the board's TVM timed them with."""

    measured: int = 0
    failed: int = 0
    first_error: str | None = None
    threads: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, error: str | None, threads: int | None = None) -> None:
        with self._lock:
            if error is None:
                self.measured += 1
                self.threads = threads
            else:
                self.failed += 1
                self.first_error = self.first_error or error


@derived_object
class TunnelRunnerFuture(PyRunnerFuture):
    """One candidate being timed by the worker; its result is counted in ``stats`` once."""

    def __init__(self, future, timeout_s: float, stats: MeasureStats, where: str) -> None:
        super().__init__()
        self.future = future
        self.timeout_s = timeout_s
        self.stats = stats
        self.where = where
        self._result: RunnerResult | None = None

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        if self._result is None:
            threads = None
            try:
                costs, threads = self.future.result()
                error = None
            except TimeoutError:
                costs, error = None, f"measuring on {self.where} ran past {self.timeout_s:.0f} s"
            except Exception as exc:  # a candidate that fails on the board is a failed trial, not a failed run
                costs, error = None, f"measuring on {self.where} failed: {str(exc).strip()[-2000:]}"
            self.stats.count(error, threads)
            self._result = fastest_placement(RunnerResult(costs, error))
        return self._result


@derived_object
class TunnelRunner(PyRunner):
    """MetaSchedule runner that times candidates with the board's RPC server at 127.0.0.1:``port`` here (a
    forwarded port), one candidate at a time (the server serves one session at a time). ``key`` is the server's:
    it refuses clients that don't know it."""

    def __init__(self, port: int, *, key: str, where: str, evaluator: EvaluatorConfig | None = None,
                 session_timeout: float = 60.0, alloc_repeat: int = PLACEMENTS) -> None:
        super().__init__()
        self.port = port
        self.key = key
        self.where = where
        self.evaluator = evaluator or EVALUATOR
        self.session_timeout = session_timeout
        self.alloc_repeat = alloc_repeat
        self.stats = MeasureStats()
        # A worker waits for the board's answer past the session limit, which the server enforces itself.
        self._timeout = session_timeout + 30
        self._pool = PopenPoolExecutor(max_workers=1, timeout=self._timeout)

    def run(self, runner_inputs):
        return [
            TunnelRunnerFuture(
                self._pool.submit(_measure, self.port, self.key, self.session_timeout, self.evaluator,
                                  self.alloc_repeat, str(item.artifact_path), str(item.device_type),
                                  [info.as_json() for info in item.args_info]),
                self._timeout, self.stats, self.where)
            for item in runner_inputs
        ]

    def shutdown(self) -> None:
        """Kill the worker process (it holds an RPC connection to the board)."""
        self._pool.shutdown(wait=False)


@dataclass
class BoardRunner:
    """A tuning session on a board: the runner to give MetaSchedule, and what serves it there."""

    runner: TunnelRunner
    server: RemoteProcess
    forward: PortForward
    device_port: int
    where: str


@contextlib.contextmanager
def rpc_runner(transport: ServingTransport, python: list[str], workdir: str, *, threads: int,
               startup_timeout: float = 180.0, lifetime: float = SERVER_LIFETIME_S,
               evaluator: EvaluatorConfig | None = None, session_timeout: float = 60.0) -> Iterator[BoardRunner]:
    """Start TVM's RPC server on the board with its ``python``, forward a local port to it, yield the runner;
    candidates run on ``threads`` threads there (the deployment's: tuning.control.THREADS_VARIABLE);
    on exit (error or not) stop the worker, the forward and the server with everything it started, and remove
    the server's scratch directory (its per-session directories live there, not in the board's /tmp).

    The server listens on the board's loopback only, and serves only clients that send its random key: the
    forwarded port on this machine's loopback is no open door to the board for other local users."""
    scratch = f"{workdir.rstrip('/')}/rpc-{secrets.token_hex(4)}"
    key = f"edgedeploy-{secrets.token_hex(8)}"
    key_file = f"{scratch}/key"
    try:
        _private_dir(transport, scratch)
        with tempfile.TemporaryDirectory(prefix="edgedeploy-key-") as local:
            local_key = Path(local) / "key"
            local_key.write_text(key)
            transport.write(local_key, key_file)
        server = transport.start(
            [*python, "-c", SERVER_LAUNCHER, key_file, "127.0.0.1",
             str(SERVER_PORTS[0] + secrets.randbelow(SERVER_PORTS[1] - SERVER_PORTS[0])), str(SERVER_PORTS[2])],
            timeout=lifetime, env={"TMPDIR": scratch, "PYTHONUNBUFFERED": "1", THREADS_VARIABLE: str(threads)},
        )
        with server:
            try:
                device_port = int(server.wait_for(BOUND, startup_timeout, what="listening (TVM's RPC server)")[1])
            except TransportError as exc:
                raise type(exc)(exc.what, value=exc.value, host=transport.name, fix=SERVER_FIX) from None
            with _forward_to(server, transport, device_port) as forward:
                runner = TunnelRunner(forward.port, key=key, where=transport.name, evaluator=evaluator,
                                      session_timeout=session_timeout)
                try:
                    yield BoardRunner(runner, server, forward, device_port, transport.name)
                finally:
                    runner.shutdown()
    finally:
        with contextlib.suppress(TransportError):
            transport.run(["rm", "-rf", "--", scratch], timeout=60)


def _private_dir(transport: ServingTransport, path: str) -> None:
    """``path`` on the device, readable by its owner only (the RPC key goes there)."""
    made = transport.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1" && chmod 700 -- "$1"', "edgedeploy-mkdir", path],
                         timeout=60)
    if made.returncode != 0:
        raise TransportError(f"Cannot create {path} on the device", host=transport.name,
                             value=made.stderr.strip()[:300])


@contextlib.contextmanager
def _forward_to(server: RemoteProcess, transport: ServingTransport, device_port: int) -> Iterator[PortForward]:
    """A forward to the server's port. TVM logs "bind to" just before it calls listen(): under an emulator, or on a
    loaded board, a connection in between is refused (CI saw it), so the server gets a moment; one that died
    instead (e.g. listen() failed) is reported with its own last words."""
    listening = False
    try:
        with transport.forward("127.0.0.1", device_port, ready_within=LISTEN_GRACE_S,
                               server=server) as forward:
            listening = True
            yield forward
    except NothingListening as exc:
        if listening or server.running:
            raise
        raise TransportError(f"TVM's RPC server exited on the device after binding port {device_port}",
                             host=transport.name, value=server.output(15) or "(no output)", fix=SERVER_FIX) from exc


@contextlib.contextmanager
def board_runner(transport: ServingTransport, workdir: str, profile: DeviceProfile,
                 **options) -> Iterator[BoardRunner]:
    """``rpc_runner`` on the board a profile describes, over the caller's session with it (``transport``), checked
    first: the board's machine, and TVM there."""
    facts = probe(transport, profile, workdir)
    if facts.machine != profile.cpu.arch:
        raise PreflightError(f"The device is {facts.machine}, but profile {profile.name!r} says "
                             f"{profile.cpu.arch}", host=transport.name,
                             fix="use the profile that matches this device")
    if not facts.tvm:
        raise PreflightError("Tuning on the device needs TVM there (its RPC server times the candidates), "
                             "and its Python can't import tvm", host=transport.name,
                             value=" ".join(profile.connection.python_argv()),
                             fix="pip install apache-tvm on the device (the version this machine has)")
    with rpc_runner(transport, profile.connection.python_argv(), workdir, threads=profile.cpu.cores,
                    **options) as board:
        yield board
