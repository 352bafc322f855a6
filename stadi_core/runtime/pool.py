"""The coordinator's side of the workers: start, send jobs, watch, tear down.

Every wait here has a deadline. A worker that dies, hangs or fails makes the pool
kill all its processes and raise a ``WorkerError`` that names the rank and device;
the next call starts a fresh pool. Pools are kept warm across calls, keyed by the
devices and backend they were started with.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import threading
import time
import uuid
from multiprocessing.connection import wait as wait_connections
from typing import Callable, Sequence

import torch.multiprocessing as mp

from ..errors import WorkerError, WorkerTimeout
from .messages import (
    BandResult,
    Cancelled,
    Heartbeat,
    MeasureResult,
    Ready,
    Shutdown,
    StepReport,
    WorkerFailure,
    WorkerInit,
)
from .worker import worker_main

_job_ids = itertools.count(1)


class JobCancelledError(WorkerError):
    """The run was interrupted on request; the pool stays usable."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerPool:
    def __init__(
        self,
        devices: Sequence[str],
        backend: str = "gloo",
        host: str = "127.0.0.1",
        start_timeout_s: float = 180.0,
        collective_timeout_s: float = 120.0,
        threads_per_worker: int | None = None,
    ):
        self.devices = list(devices)
        self.backend = backend
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.collective_timeout_s = collective_timeout_s
        cpu_workers = sum(d.startswith("cpu") for d in self.devices) or 1
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // cpu_workers)
        self.procs: list = []
        self.conns: list = []
        self.info: list[Ready] = []
        self._store = None
        self._lock = threading.Lock()  # one job at a time per pool
        self._mp = mp.get_context("spawn")
        self.cancel_event = self._mp.Event()
        self.broken = False

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return bool(self.procs) and not self.broken and all(p.exitcode is None for p in self.procs)

    # -- start / stop ----------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        from datetime import timedelta

        import torch.distributed as dist

        port = 0
        if self.world_size > 1:
            self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=self.start_timeout_s))
            port = self._store.port
        prefix = f"stadi/{uuid.uuid4().hex[:8]}"
        for rank, device in enumerate(self.devices):
            parent_conn, child_conn = self._mp.Pipe(duplex=True)
            init = WorkerInit(rank=rank, world_size=self.world_size, device=device, backend=self.backend,
                              store_host=self.host, store_port=port, store_prefix=prefix,
                              parent_pid=os.getpid(), threads=self.threads if device.startswith("cpu") else 1,
                              timeout_s=self.collective_timeout_s)
            proc = self._mp.Process(target=worker_main, args=(init, child_conn, self.cancel_event),
                                    name=f"stadi-worker-{rank}", daemon=True)
            proc.start()
            child_conn.close()
            self.procs.append(proc)
            self.conns.append(parent_conn)
        try:
            ready = self._collect(lambda msg: isinstance(msg, Ready), self.start_timeout_s, "starting")
        except BaseException:
            self.close(force=True)
            raise
        self.info = [ready[r] for r in range(self.world_size)]
        return self

    def close(self, force: bool = False, timeout_s: float = 10.0) -> None:
        """Stop every worker: politely unless ``force``, then by SIGKILL after ``timeout_s``."""
        self.broken = True
        if not force:
            for conn in self.conns:
                try:
                    conn.send(Shutdown())
                except (OSError, EOFError, BrokenPipeError):
                    pass
            deadline = time.monotonic() + timeout_s
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(5.0)
        for conn in self.conns:
            conn.close()
        self.conns = []
        self._store = None

    # -- jobs ------------------------------------------------------------------------------
    def run(self, make_job: Callable[[int], object], *, stall_timeout_s: float = 60.0,
            on_step: Callable[[int, dict], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            per_rank: Callable[[object, int], object] | None = None) -> dict:
        """Send ``make_job(job_id)`` (adjusted by ``per_rank``) to every rank; return {rank: result}.

        ``stall_timeout_s`` bounds the silence of any worker (heartbeats every second),
        so a hung or frozen worker is detected; a dead one is detected at once.
        """
        with self._lock:
            if not self.alive():
                raise WorkerError("this worker pool is closed; get a fresh one with get_pool()")
            self.cancel_event.clear()
            job_id = next(_job_ids)
            for rank, conn in enumerate(self.conns):
                job = make_job(job_id)
                conn.send(per_rank(job, rank) if per_rank is not None else job)
            try:
                return self._collect(
                    lambda msg: isinstance(msg, (BandResult, MeasureResult)) and msg.job_id == job_id,
                    stall_timeout_s, "running a job", on_step=on_step, should_cancel=should_cancel,
                )
            except JobCancelledError:
                raise
            except BaseException:
                self.close(force=True)
                raise

    def _collect(self, is_final, stall_timeout_s: float, doing: str, on_step=None, should_cancel=None) -> dict:
        results: dict[int, object] = {}
        cancelled: dict[int, Cancelled] = {}
        last_heard = {r: time.monotonic() for r in range(self.world_size)}
        by_conn = {conn: r for r, conn in enumerate(self.conns)}
        while len(results) + len(cancelled) < self.world_size:
            open_conns = [c for c, r in by_conn.items() if r not in results and r not in cancelled]
            for conn in wait_connections(open_conns, timeout=0.25):
                rank = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._raise_dead(rank, doing)
                last_heard[rank] = time.monotonic()
                if isinstance(msg, WorkerFailure):
                    raise WorkerError(
                        f"worker rank {rank} ({self.devices[rank]}) failed while {doing}: {msg.message}\n"
                        f"--- worker traceback ---\n{msg.traceback}"
                    )
                if isinstance(msg, Cancelled):
                    cancelled[rank] = msg
                elif is_final(msg):
                    results[rank] = msg
                elif isinstance(msg, StepReport) and on_step is not None:
                    on_step(rank, msg.timing)
                elif not isinstance(msg, (Heartbeat, StepReport)):
                    pass  # a stale message from an earlier, cancelled job
            now = time.monotonic()
            for rank, p in enumerate(self.procs):
                if rank not in results and p.exitcode is not None:
                    self._raise_dead(rank, doing)
                if rank not in results and now - last_heard[rank] > stall_timeout_s:
                    raise WorkerTimeout(
                        f"worker rank {rank} ({self.devices[rank]}) sent nothing for {stall_timeout_s:.0f} s "
                        f"while {doing}; the pool was stopped. Raise the timeout if the device is just slow."
                    )
            if should_cancel is not None and not self.cancel_event.is_set() and should_cancel():
                self.cancel_event.set()
        if cancelled:
            step = min(c.step for c in cancelled.values())
            raise JobCancelledError(f"interrupted at step {step}")
        return results

    def _raise_dead(self, rank: int, doing: str):
        p = self.procs[rank]
        p.join(1.0)
        raise WorkerError(
            f"worker rank {rank} ({self.devices[rank]}, pid {p.pid}) {_describe_exit(p.exitcode)} while {doing}; "
            "all workers were stopped and the next run starts a fresh pool"
        )


# -- warm pools shared across calls ----------------------------------------------------------
_POOLS: dict[tuple, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(devices: Sequence[str], backend: str, **kw) -> WorkerPool:
    """A started pool for exactly these devices, reused while it stays healthy."""
    key = (tuple(devices), backend, tuple(sorted(kw.items())))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and pool.alive():
            return pool
        if pool is not None:
            pool.close(force=True)
        gpus = {d for d in devices if d.startswith("cuda")}
        for other_key in [k for k in _POOLS if gpus & set(k[0])]:
            _POOLS.pop(other_key).close()  # a GPU belongs to one pool at a time (its memory)
        pool = WorkerPool(devices, backend, **kw).start()
        _POOLS[key] = pool
        return pool


def shutdown_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


atexit.register(shutdown_pools)
