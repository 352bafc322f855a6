"""A per-call session on a warm pool (the ComfyUI path): the server's sampler loop sends band calls,
one thread per rank may call concurrently, and the session ends with every rank confirming it left."""

from __future__ import annotations

import itertools
import logging
import time
from multiprocessing.connection import wait as wait_connections
from typing import Callable

from ..errors import WorkerError, WorkerTimeout
from .messages import BandOutput, Cancelled, SessionClosed, SessionEnd, WorkerFailure
from .pool import JobCancelledError, WorkerPool, _failure_text

_log = logging.getLogger("stadi")


class Session:
    """Band calls to individual ranks; one thread per rank may call concurrently."""

    def __init__(self, pool: WorkerPool, job_id: int, ready: dict):
        self.pool = pool
        self.job_id = job_id
        self.ready = ready
        self.cancel_requested = False
        self.failed: BaseException | None = None
        self.notes: dict[int, list[str]] = {}  # per rank: what its band outputs said (a compile that failed)
        self._call_ids = itertools.count(1)
        self._closed = False

    def call(self, rank: int, make_call: Callable[[int, int], object], stall_timeout_s: float = 120.0) -> BandOutput:
        """Send one BandCall to ``rank`` and wait for its output, watching every worker's health."""
        return self.call_all({rank: make_call}, stall_timeout_s)[rank]

    def call_all(self, make_calls: dict, stall_timeout_s: float = 120.0) -> dict:
        """One BandCall to each rank in ``make_calls`` at once (lockstep); {rank: BandOutput}.

        Every connection is watched together, so a rank that fails while the others wait in a
        collective for it is reported at once instead of after the collective's timeout. Rank
        threads (per-rank loops) call it for their own rank; the first failure of any of them
        stops the others' waits too.
        """
        if self.failed is not None:
            raise WorkerError(f"the session already failed: {self.failed}")
        pool = self.pool
        expected = {}
        try:
            for rank, make_call in make_calls.items():
                call_id = next(self._call_ids)
                pool.send(rank, make_call(self.job_id, call_id))
                expected[rank] = call_id
            outputs: dict[int, BandOutput] = {}
            last_heard = {rank: time.monotonic() for rank in expected}
            by_conn = {pool.conns[rank]: rank for rank in expected}
            while len(outputs) < len(expected):
                waiting = [c for c, r in by_conn.items() if r not in outputs]
                for conn in wait_connections(waiting, timeout=0.25):
                    rank = by_conn[conn]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        pool._raise_dead(rank, "evaluating a band")
                    last_heard[rank] = time.monotonic()
                    if isinstance(msg, BandOutput) and msg.call_id == expected[rank] and msg.job_id == self.job_id:
                        outputs[rank] = msg
                        if msg.note and msg.note not in self.notes.setdefault(rank, []):
                            self.notes[rank].append(msg.note)
                    elif isinstance(msg, WorkerFailure):
                        raise WorkerError(f"worker rank {rank} ({pool.devices[rank]}) failed: " + _failure_text(msg))
                    elif isinstance(msg, Cancelled):
                        raise JobCancelledError(f"interrupted at step {msg.step}")
                if self.failed is not None:
                    raise WorkerError(f"stopped because another rank failed: {self.failed}")
                pool._check_health(list(expected), outputs, last_heard, stall_timeout_s, "evaluating a band")
            return outputs
        except JobCancelledError:
            self.cancel_requested = True
            raise
        except BaseException as exc:
            if self.failed is None:
                self.failed = exc
            raise

    def cancel(self) -> None:
        """Ask every rank to stop at its next agreed step."""
        self.cancel_requested = True
        self.pool.cancel()

    def close(self, ack_timeout_s: float = 30.0) -> None:
        """End the session. The pool stays warm when every rank confirms it left the session
        (also after a cancel: the ranks stop together at an agreed step); a failure, or a rank
        that does not confirm in time, restarts the pool to drop half-done state."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.failed is None and not self._end_all(ack_timeout_s):
                self.failed = WorkerTimeout("a worker did not leave the session")
                _log.warning("STADI: a worker did not confirm the end of its session within %.0f s; the worker pool "
                             "restarts", ack_timeout_s)
            if self.failed is not None:
                self.pool.close(force=True)
        finally:
            self.pool._lock.release()

    def _end_all(self, timeout_s: float) -> bool:
        """Send SessionEnd to every rank and drain each connection up to its SessionClosed."""
        pool = self.pool
        try:
            for rank in range(len(pool.conns)):
                pool.send(rank, SessionEnd(self.job_id))
        except (OSError, BrokenPipeError):
            return False
        open_conns = {conn: rank for rank, conn in enumerate(pool.conns)}
        deadline = time.monotonic() + timeout_s
        while open_conns and time.monotonic() < deadline:
            for conn in wait_connections(list(open_conns), timeout=0.25):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return False
                if isinstance(msg, SessionClosed) and msg.job_id == self.job_id:
                    open_conns.pop(conn)
                elif isinstance(msg, WorkerFailure):
                    return False
            if any(p.poll() is not None for p in pool.procs):
                return False
        return not open_conns
