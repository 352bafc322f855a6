"""The coordinator's side of the workers: launch, send jobs, watch, tear down.

Workers are separate Python processes (``python -m stadi_core.runtime.worker``) that
connect back over an authenticated local socket. Every wait here has a deadline. A
worker that dies, hangs or fails makes the pool kill all its processes and raise a
``WorkerError`` naming the rank and device; the next call starts a fresh pool. Pools
stay warm across calls, keyed by their devices and backend.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import subprocess
import threading
import time
import uuid
from multiprocessing.connection import Listener
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Sequence

from ..errors import PlanError, WorkerError, WorkerLost, WorkerTimeout
from .launch import accept_workers, describe_exit, launch_workers
from .liveness import CANCEL_GRACE_S, DEADLINE_FACTOR, POLL_S, Watch, log_dropped
from .messages import (
    BandResult,
    Cancelled,
    CancelRequest,
    Checkpoint,
    MeasureResult,
    Paused,
    PauseRequest,
    Ready,
    SessionReady,
    Shutdown,
    StepReport,
    WorkerFailure,
    WorkerInit,
)

_job_ids = itertools.count(1)
LOCK_TIMEOUT_S = 300.0  # how long a run waits for the pool another run holds
SEND_LOCK_TIMEOUT_S = 60.0  # how long a send waits for another thread's send on the same connection
_log = logging.getLogger("stadi")


class JobCancelledError(WorkerError):
    """The run was interrupted on request; the pool stays usable."""


class WorkerPool:
    def __init__(
        self,
        devices: Sequence[str],
        backend: str = "gloo",
        host: str = "127.0.0.1",
        start_timeout_s: float = 180.0,
        collective_timeout_s: float = 120.0,
        threads_per_worker: int | None = None,
        extra_sys_path: Sequence[str] = (),
        worker_env: Sequence[dict] | None = None,
        lobby=None,
    ):
        self.devices = list(devices)
        self.backend = backend
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.collective_timeout_s = collective_timeout_s
        cpu_workers = sum(d.startswith("cpu") for d in self.devices) or 1
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // cpu_workers)
        self.extra_sys_path = list(extra_sys_path)
        self.worker_env = [dict(e) for e in worker_env] if worker_env else [{} for _ in self.devices]
        self.procs: list[subprocess.Popen] = []
        self.conns: list = []
        self.info: list[Ready] = []
        self._store = None
        self._lock = threading.Lock()  # one job at a time per pool
        self._send_locks: list[threading.Lock] = []  # per connection: rank threads and a cancel share it
        self._close_lock = threading.Lock()  # a failing rank thread and the prompt thread may both close
        self._call_ids = itertools.count(1)  # band call ids, unique for the pool's life
        self.bytes_sent: list[int] = [0] * len(self.devices)  # pickled bytes sent to each rank, all messages
        self.broken = False
        self.loaded_model_key: str | None = None  # what the workers hold (for the ComfyUI weight cache)
        self.lobby = lobby  # runtime/lobby.py: where devices named HOST/DEVICE joined from other machines
        self._remote: dict = {}  # rank -> lobby.RemoteWorker

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return bool(self.procs) and not self.broken and all(p.poll() is None for p in self.procs)

    # -- start / stop ----------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        from datetime import timedelta

        import torch.distributed as dist

        same_gpu_exchange()  # a bad setting is refused before any process starts
        port = 0
        if self.world_size > 1:
            self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=self.start_timeout_s))
            port = self._store.port
        authkey = secrets.token_bytes(16)
        listener = Listener((self.host, 0), authkey=authkey)
        try:
            local = self._start_processes(listener, authkey)
            self._init_workers(listener, port, f"stadi/{uuid.uuid4().hex[:8]}", local)
            ready = self._collect(lambda msg: isinstance(msg, Ready), self.start_timeout_s, "starting")
        except BaseException:
            self.close(force=True)
            raise
        finally:
            listener.close()
        self.info = [ready[r] for r in range(self.world_size)]
        return self

    def _start_processes(self, listener: Listener, authkey: bytes) -> list[int]:
        """Launch this machine's workers and claim the ones that joined from other machines (named
        ``HOST/DEVICE``) from the lobby; returns the local ranks. ``procs`` gets one entry per rank."""
        from .lobby import RemoteProcess, is_remote

        local = [r for r, d in enumerate(self.devices) if not is_remote(d)]
        procs: dict = {}
        env = self.worker_env
        if len(local) < self.world_size:
            if self.lobby is None:
                raise PlanError(f"{', '.join(d for d in self.devices if is_remote(d))} would join from other machines, "
                                "but this pool listens for none: give the listen address and token (--listen, --token)")
            from .handshake import interface_env

            claimed = self.lobby.claim([d for d in self.devices if is_remote(d)], self.start_timeout_s)
            self._remote = {r: claimed[d] for r, d in enumerate(self.devices) if is_remote(d)}
            procs.update({r: RemoteProcess(self.lobby, w) for r, w in self._remote.items()})
            via = next(iter(self._remote.values())).via  # our address the remote workers reach
            env = [dict(e, **interface_env(via)) for e in env]  # gloo: the interface the others reach
        try:
            procs.update(zip(local, launch_workers(self.devices, env, listener, authkey, ranks=local)))
        finally:
            self.procs.extend(procs[r] for r in range(self.world_size) if r in procs)
        return local

    def _init_workers(self, listener: Listener, store_port: int, prefix: str,
                      local: Sequence[int] | None = None) -> None:
        """Take one connection per local rank (remote ones came with the lobby), then tell each worker its
        rank, device and group."""
        local = list(range(self.world_size)) if local is None else list(local)
        conns = dict(zip(local, accept_workers(listener, self.procs, self.devices, self.start_timeout_s, ranks=local)))
        conns.update({r: w.conn for r, w in self._remote.items()})
        self.conns = [conns[r] for r in range(self.world_size)]
        self._send_locks = [threading.Lock() for _ in self.conns]
        self.bytes_sent = [0] * len(self.conns)
        gpus = {d.split(":")[1].split(".")[0] for d in self.devices if d.startswith("cuda")}
        same_gpu = len(gpus) == 1 and all(d.startswith("cuda") for d in self.devices) and self.world_size > 1
        transport = "cuda-ipc" if same_gpu and self.backend == "gloo" and same_gpu_exchange() == "cuda-ipc" else "dist"
        for rank, device in enumerate(self.devices):
            remote = self._remote.get(rank)  # its own device name and threads; the store at our listen address
            threads = remote.join.threads if remote else self.threads if device.startswith("cpu") else 1
            self.send(rank, WorkerInit(rank=rank, world_size=self.world_size, device=remote.join.device if remote else
                                       device, backend=self.backend, store_host=remote.via if remote else self.host,
                                       store_port=store_port, store_prefix=prefix, threads=threads,
                                       timeout_s=self.collective_timeout_s, extra_sys_path=self.extra_sys_path,
                                       transport=transport))

    def close(self, force: bool = False, timeout_s: float = 10.0) -> None:
        """Stop every worker: politely unless ``force``, then by SIGKILL after ``timeout_s``.

        Safe from any thread and more than once: a failing rank thread, the prompt thread and an
        interrupt may all close the pool. Connections stay in ``conns`` (closed) so a thread still
        reading one gets an error, never an IndexError."""
        with self._close_lock:
            self.broken = True
            if not force:
                for rank in range(len(self.conns)):
                    try:
                        self._write(rank, Shutdown(), lock_timeout_s=1.0)
                    except (OSError, EOFError, WorkerError):
                        pass
                deadline = time.monotonic() + timeout_s
                for p in self.procs:
                    try:
                        p.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            for p in self.procs:
                try:
                    p.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
            for conn in self.conns:
                conn.close()
            self._store = None

    def _acquire(self, timeout_s: float, doing: str) -> None:
        """Take the pool (one job at a time) within ``timeout_s``, or say who holds it."""
        if not self._lock.acquire(timeout=timeout_s):
            raise WorkerTimeout(f"the worker pool stayed busy for {timeout_s:.0f} s (another run holds it); could "
                                f"not {doing}. Wait for that run to end or interrupt it.")
        if not self.alive():
            self._lock.release()
            raise WorkerError("this worker pool is closed; get a fresh one with get_pool()")

    # -- whole jobs (standalone path) ----------------------------------------------------------
    def run(self, make_job: Callable[[int], object], *, stall_timeout_s: float = 60.0,
            on_step: Callable[[int, dict], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            per_rank: Callable[[object, int], object] | None = None,
            on_checkpoint: Callable[[int, object], None] | None = None) -> dict:
        """Send ``make_job(job_id)`` (adjusted by ``per_rank``) to every rank; return {rank: result}.

        A result is a BandResult (or MeasureResult), or, for every rank alike, ``Paused`` when
        ``pause()`` was called during the job (the ranks stopped together at a sync step; the
        Checkpoints given to ``on_checkpoint`` hold where they were).

        ``stall_timeout_s`` bounds the silence of any worker (heartbeats every second), so a frozen
        worker is detected, and, once a rank has reported its first step, the time its main thread
        may go without progress (at least 5x its slowest step so far), so a stuck one is too; a dead
        one is detected at once. A cancel the ranks do not answer in time kills the pool.
        """
        self._acquire(LOCK_TIMEOUT_S, "run a job")
        try:
            job_id = next(_job_ids)
            for rank in range(self.world_size):
                job = make_job(job_id)
                self.send(rank, per_rank(job, rank) if per_rank is not None else job)
            return self._collect(
                lambda msg: isinstance(msg, (BandResult, MeasureResult, Paused)) and msg.job_id == job_id,
                stall_timeout_s, "running a job", on_step=on_step, should_cancel=should_cancel, progress=True,
                on_checkpoint=on_checkpoint,
            )
        except JobCancelledError:
            raise
        except BaseException:
            self.close(force=True)
            raise
        finally:
            self._lock.release()

    def decode(self, make_job: Callable[[int, int], object], ranks: Sequence[int] | None = None, *,
               timeout_s: float = 600.0, stall_timeout_s: float = 120.0, lock_timeout_s: float = 60.0) -> dict:
        """Send ``make_job(job_id, rank)`` (a DecodeJob) to each of ``ranks`` (default all) at once and
        return {rank: DecodeResult}.

        Deadlines: the pool must be free within ``lock_timeout_s`` (a run holds it), every rank must
        answer within ``timeout_s`` in all, and a silent worker (no heartbeat) is given up on after
        ``stall_timeout_s``. A rank that reports a failure (e.g. out of memory) leaves the pool
        usable: the others are drained first, then a WorkerError names it; a dead, hung or late
        worker stops the pool (the next run starts a fresh one), as everywhere else.
        """
        from .messages import DecodeResult

        ranks = list(range(self.world_size)) if ranks is None else [int(r) for r in ranks]
        self._acquire(lock_timeout_s, "decode on it")
        try:
            job_id = next(_job_ids)
            deadline = time.monotonic() + timeout_s
            try:
                for rank in ranks:
                    self.send(rank, make_job(job_id, rank))
                results: dict[int, DecodeResult] = {}
                failures: dict[int, WorkerFailure] = {}
                watch = Watch(self, ranks, "decoding a band", stall_timeout_s)
                pending = list(ranks)
                while pending:
                    for rank, msg in watch.receive(pending, 0.25):
                        if isinstance(msg, DecodeResult) and msg.job_id == job_id:
                            results[rank] = msg
                        elif isinstance(msg, WorkerFailure) and msg.job_id == job_id:
                            failures[rank] = msg
                        else:
                            log_dropped(rank, msg)
                    pending = [r for r in ranks if r not in results and r not in failures]
                    watch.check(pending)
                    if pending and time.monotonic() > deadline:
                        raise WorkerTimeout(f"worker ranks {pending} did not finish decoding within {timeout_s:.0f} s; "
                                            "the pool was stopped")
            except BaseException:
                self.close(force=True)
                raise
            if failures:
                rank, msg = min(failures.items())
                raise WorkerError(f"worker rank {rank} ({self.devices[rank]}) failed while decoding a band: "
                                  + _failure_text(msg))
            return results
        finally:
            self._lock.release()

    def send(self, rank: int, msg, lock_timeout_s: float = SEND_LOCK_TIMEOUT_S) -> int:
        """One whole message to ``rank``; the number of bytes sent.

        Every message to a worker goes through here: a message over 16 KB goes out in several
        writes, and a cancel from the prompt thread must not land between the writes of a band call
        from a rank thread. The pickling happens outside the lock."""
        if self.broken:
            raise WorkerError("this worker pool was stopped; the next run starts a fresh one")
        if rank in self._remote:  # another machine cannot map our shared memory files: copy them first
            from .relay import localize

            msg = localize(msg, self._remote[rank].files, lambda m: self._write(rank, m, lock_timeout_s),
                           self.conns[rank])
        return self._write(rank, msg, lock_timeout_s)

    def _write(self, rank: int, msg, lock_timeout_s: float) -> int:
        data = ForkingPickler.dumps(msg)  # what conn.send would write; the worker's conn.recv() reads it
        lock = self._send_locks[rank]
        if not lock.acquire(timeout=lock_timeout_s):
            raise WorkerTimeout(f"the connection to worker rank {rank} ({self.devices[rank]}) stayed busy for "
                                f"{lock_timeout_s:.0f} s: another send to it did not finish")
        try:
            self.conns[rank].send_bytes(data)
            self.bytes_sent[rank] += len(data)
        finally:
            lock.release()
        return len(data)

    def next_call_id(self) -> int:
        """A band call id no other call of this pool had: a late reply can never pass for a new one."""
        return next(self._call_ids)

    def pause(self) -> None:
        """Ask every rank of the running job to stop together at its next sync step, state kept."""
        for rank in range(len(self.conns)):
            self.send(rank, PauseRequest(), lock_timeout_s=1.0)

    def cancel(self) -> None:
        """Ask every rank to stop at its next agreed step. Never blocks long: an interrupt must get through."""
        for rank in range(len(self.conns)):
            try:
                self.send(rank, CancelRequest(), lock_timeout_s=1.0)
            except (OSError, WorkerError):
                pass

    def _collect(self, is_final, stall_timeout_s: float, doing: str, on_step=None, should_cancel=None,
                 ranks: Sequence[int] | None = None, progress: bool = False, on_checkpoint=None) -> dict:
        """{rank: final message} of a whole job; ``progress``: also stop a rank whose main thread is stuck."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        results: dict[int, object] = {}
        cancelled: dict[int, Cancelled] = {}
        watch = Watch(self, ranks, doing, stall_timeout_s, armed=False)
        cancel_at = None
        pending = list(ranks)
        while pending:
            for rank, msg in watch.receive(pending, POLL_S):
                if isinstance(msg, WorkerFailure):
                    raise self.failure(rank, msg, f"failed while {doing}")
                if isinstance(msg, Cancelled):
                    cancelled[rank] = msg
                elif is_final(msg):
                    results[rank] = msg
                elif isinstance(msg, StepReport):
                    if on_step is not None:
                        on_step(rank, msg.timing)
                elif isinstance(msg, Checkpoint):
                    if on_checkpoint is not None:
                        on_checkpoint(rank, msg.state)
                else:
                    log_dropped(rank, msg)
            pending = [r for r in ranks if r not in results and r not in cancelled]
            watch.check(pending, max(stall_timeout_s, DEADLINE_FACTOR * watch.longest_gap_s) if progress else None)
            if should_cancel is not None and cancel_at is None and should_cancel():
                self.cancel()
                cancel_at = time.monotonic()
            grace = max(CANCEL_GRACE_S, 3 * watch.longest_gap_s)  # the ranks stop at their next sync step
            if pending and cancel_at is not None and time.monotonic() - cancel_at > grace:
                self.close(force=True)
                raise JobCancelledError(f"interrupted; the workers did not stop within {grace:.1f} s, so they were "
                                        "stopped (the next run starts a fresh pool)")
        if cancelled:
            step = min(c.step for c in cancelled.values())
            raise JobCancelledError(f"interrupted at step {step}")
        return results

    def failure(self, rank: int, msg: WorkerFailure, what: str, settle_s: float = 1.0) -> WorkerError:
        """The error for a failure ``rank`` reported, unless another worker died: a survivor's collective
        breaks ("connection reset by peer") a moment after its peer is killed, and the death is the cause
        (a WorkerLost, which a run can recover from by dropping that device)."""
        deadline = time.monotonic() + settle_s
        while True:
            dead = [r for r, p in enumerate(self.procs) if r != rank and p.poll() is not None]
            if dead:
                try:
                    self._raise_dead(dead[0], "its peers were in a collective with it")
                except WorkerLost as lost:
                    return lost
            if time.monotonic() > deadline or not msg.traceback:  # a deliberate error is not a broken peer
                return WorkerError(f"worker rank {rank} ({self.devices[rank]}) {what}: " + _failure_text(msg))
            time.sleep(0.05)

    def _raise_dead(self, rank: int, doing: str):
        p = self.procs[rank]
        try:
            p.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        raise WorkerLost(
            f"worker rank {rank} ({self.devices[rank]}, pid {p.pid}) {describe_exit(p.poll())} while {doing}; "
            "all workers were stopped and the next run starts a fresh pool", rank, self.devices[rank],
            describe_exit(p.poll()))

    # -- per-call sessions (ComfyUI path) ------------------------------------------------------
    def open_session(self, make_start: Callable[[int], object], *, per_rank=None,
                     load_timeout_s: float = 600.0, lock_timeout_s: float = LOCK_TIMEOUT_S):
        """Load the model on every rank and return a handle for per-rank band calls. The session holds
        the pool until ``Session.close``; loading keeps its own long deadline (``load_timeout_s``)."""
        self._acquire(lock_timeout_s, "open a session")
        try:
            job_id = next(_job_ids)
            for rank in range(self.world_size):
                start = make_start(job_id)
                self.send(rank, per_rank(start, rank) if per_rank is not None else start)
            ready = self._collect(lambda m: isinstance(m, SessionReady) and m.job_id == job_id, load_timeout_s,
                                  "loading the model")
        except BaseException:
            self.close(force=True)
            self._lock.release()
            raise
        from .session import Session

        return Session(self, job_id, ready)


def same_gpu_exchange() -> str:
    """How workers sharing one GPU exchange: ``cuda-ipc`` (default) or ``gloo`` (through the host).

    Set by ``STADI_SAME_GPU_EXCHANGE``; gloo is the slow, simple path to compare against
    when CUDA IPC is suspected of misbehaving on a machine.
    """
    value = os.environ.get("STADI_SAME_GPU_EXCHANGE", "cuda-ipc")
    if value not in ("cuda-ipc", "gloo"):
        raise PlanError(f"STADI_SAME_GPU_EXCHANGE={value!r}: use 'cuda-ipc' or 'gloo'")
    return value


def _failure_text(msg: WorkerFailure) -> str:
    """A worker's failure for the user: a deliberate error alone, anything else with its traceback."""
    if not msg.traceback:
        return msg.message
    return f"{msg.message}\n--- worker traceback ---\n{msg.traceback}"
