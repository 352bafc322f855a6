"""A per-call session on a warm pool (the ComfyUI path): the server's sampler loop sends band calls,
one thread per rank may call concurrently, and the session ends with every rank confirming it left.

Every wait has a deadline. A band call whose worker makes no progress for the call deadline (max of
``STADI_CALL_DEADLINE_S``, 60 s by default, and 5x the slowest call of this session) stops the pool
with an error naming the rank, device and phase. A cancel (Interrupt) the ranks do not answer within
1.2 s stops the pool too, so an interrupt ends any prompt within 2 s, stuck worker or not; the next
run then starts a fresh pool.
"""

from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import wait as wait_connections
from typing import Callable

from ..errors import WorkerError, WorkerTimeout
from .liveness import CANCEL_GRACE_S, POLL_S, Watch, call_deadline_s, log_dropped
from .messages import BandOutput, Cancelled, SessionClosed, SessionEnd, WorkerFailure
from .pool import JobCancelledError, WorkerPool

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
        self.slowest_call_s = 0.0  # the longest band call so far: the stuck deadline grows with it
        self._compiled = any(getattr(m, "info", {}).get("compile", "off") != "off" for m in ready.values())
        self._cancel_at: float | None = None  # when the cancel was first asked for
        self._killed_by_cancel = False  # the ranks did not stop in time and the pool was stopped
        self._stop_lock = threading.Lock()
        self._closed = False

    def call(self, rank: int, make_call: Callable[[int, int], object], stall_timeout_s: float = 120.0,
             should_cancel: Callable[[], bool] | None = None) -> BandOutput:
        """Send one BandCall to ``rank`` and wait for its output, watching the worker's health."""
        return self.call_all({rank: make_call}, stall_timeout_s, should_cancel)[rank]

    def call_deadline_s(self) -> float:
        """How long a call's worker may go without progress before it counts as stuck."""
        return call_deadline_s(self.slowest_call_s, self._compiled)

    def call_all(self, make_calls: dict, stall_timeout_s: float = 120.0,
                 should_cancel: Callable[[], bool] | None = None) -> dict:
        """One BandCall to each rank in ``make_calls`` at once (lockstep); {rank: BandOutput}.

        ``make_calls[rank](job_id, call_id)`` builds the call. Every connection is watched together,
        so a rank that fails while the others wait in a collective for it is reported at once instead
        of after the collective's timeout. Rank threads (per-rank loops) call it for their own rank;
        the first failure of any of them stops the others' waits too.

        ``should_cancel`` (ComfyUI: ``processing_interrupted``) is polled during the wait: once true,
        the ranks are asked to stop at their next agreed step (calls from then on carry the cancel).
        A call that still completes is returned (the ranks stay in step; the caller's own interrupt
        check ends the loop), a rank that stops raises JobCancelledError, and ranks that have not
        answered within 1.2 s of the cancel are killed (JobCancelledError; the next run starts a
        fresh pool).
        """
        self._raise_if_over("the session already failed")
        pool = self.pool
        if not self.cancel_requested and should_cancel is not None and should_cancel():
            self.cancel()
        expected = {}
        try:
            for rank, make_call in make_calls.items():
                call = make_call(self.job_id, pool.next_call_id())
                if self.cancel_requested and hasattr(call, "cancel"):
                    call.cancel = True  # the ranks stop together at this call's step agreement
                pool.send(rank, call)
                expected[rank] = call.call_id
            t0 = time.monotonic()
            outputs = self._wait(expected, stall_timeout_s, should_cancel)
            self.slowest_call_s = max(self.slowest_call_s, time.monotonic() - t0)
            return outputs
        except JobCancelledError:
            self.cancel_requested = True
            raise
        except BaseException as exc:
            self._fail(exc)

    def _wait(self, expected: dict, stall_timeout_s: float, should_cancel) -> dict:
        watch = Watch(self.pool, list(expected), "evaluating a band", stall_timeout_s)
        deadline_s = self.call_deadline_s()
        started = time.monotonic()
        outputs: dict[int, BandOutput] = {}
        pending = list(expected)
        while pending:
            for rank, msg in watch.receive(pending, POLL_S):
                self._take(rank, msg, expected, outputs)
            pending = [r for r in expected if r not in outputs]
            self._raise_if_over("stopped because another rank failed")
            if pending:
                self._check_cancel(should_cancel, started)
                watch.check(pending, deadline_s)
        return outputs

    def _take(self, rank: int, msg, expected: dict, outputs: dict) -> None:
        """File one reply: the awaited output, a failure or cancel of this session, or a stale reply."""
        if isinstance(msg, BandOutput) and msg.job_id == self.job_id and msg.call_id == expected.get(rank):
            outputs[rank] = msg
            if msg.note and msg.note not in self.notes.setdefault(rank, []):
                self.notes[rank].append(msg.note)
        elif isinstance(msg, WorkerFailure) and msg.job_id in (None, self.job_id):
            raise self.pool.failure(rank, msg, "failed")
        elif isinstance(msg, Cancelled) and msg.job_id == self.job_id:
            raise JobCancelledError(f"interrupted at step {msg.step}")
        else:
            log_dropped(rank, msg)

    def _check_cancel(self, should_cancel, started: float) -> None:
        """Send the cancel once it is asked for; kill the ranks if this call has not ended 1.2 s after
        the cancel (or after it was sent, for a call that already carried the cancel)."""
        if not self.cancel_requested and should_cancel is not None and should_cancel():
            self.cancel()
        if self._cancel_at is not None and time.monotonic() - max(self._cancel_at, started) > CANCEL_GRACE_S:
            with self._stop_lock:
                if not self._killed_by_cancel:
                    _log.warning("STADI: the workers did not stop within %.1f s of the interrupt; stopping them "
                                 "(the next run starts a fresh pool)", CANCEL_GRACE_S)
                    self._killed_by_cancel = True
                    if self.failed is None:
                        self.failed = JobCancelledError(self._killed_text())
                    self.pool.close(force=True)
            raise JobCancelledError(self._killed_text())

    @staticmethod
    def _killed_text() -> str:
        return (f"interrupted; the workers did not stop within {CANCEL_GRACE_S} s, so they were stopped "
                "(the next run starts a fresh pool)")

    def _raise_if_over(self, what: str) -> None:
        if self._killed_by_cancel:
            raise JobCancelledError(self._killed_text())
        if self.failed is not None:
            raise WorkerError(f"{what}: {self.failed}")

    def _fail(self, exc: BaseException):
        """Record the session's first failure and stop the pool at once (ranks waiting for this one in a
        collective must not hang); a later thread's error caused by that stop names the first one."""
        if self._killed_by_cancel:
            raise JobCancelledError(self._killed_text()) from None
        with self._stop_lock:
            first = self.failed is None
            if first:
                self.failed = exc
        if first:
            self.pool.close(force=True)
            raise exc
        if exc is self.failed or isinstance(exc, WorkerError) and str(exc).startswith("stopped because"):
            raise exc
        raise WorkerError(f"stopped because another rank failed: {self.failed}") from exc

    def cancel(self) -> None:
        """Ask every rank to stop at its next agreed step; the 1.2 s grace starts now."""
        if self._cancel_at is None:
            self._cancel_at = time.monotonic()
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
        except (OSError, WorkerError):
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
