"""Watching workers while the coordinator waits for them: dead, silent or stuck.

Each way a wait can go wrong has its own evidence, and its own deadline:
- dead: the process exited or its connection closed (seen at once);
- silent: nothing at all, not even heartbeats, for ``silence_s`` (a frozen process, a hung host);
- stuck: heartbeats keep coming from the worker's side thread, but the main thread's progress counter
  has not moved for the call's deadline (a hung CUDA sync, a collective that never completes).
  Heartbeats alone would call such a worker healthy forever.

A rank that is stuck while it waits for the other ranks in a collective is the victim, not the cause:
the rank that is stuck doing its own work is named first.
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import wait as wait_connections
from typing import Sequence

from ..errors import PlanError, WorkerError, WorkerLost, WorkerStuck
from .messages import Heartbeat

CALL_DEADLINE_ENV = "STADI_CALL_DEADLINE_S"
DEFAULT_CALL_FLOOR_S = 60.0  # generous: the first call of a shape may allocate, tune kernels, warm caches
COMPILE_FLOOR_S = 600.0  # a compiled session's first calls of each shape compile or capture graphs
DEADLINE_FACTOR = 5.0  # x the slowest call measured so far in this run
CANCEL_GRACE_S = 1.2  # after a cancel, how long the ranks get to stop together before they are killed (2 s in all)
POLL_S = 0.1  # how often a wait looks at cancel requests and deadlines
HEARD_RECENTLY_S = 3.0  # heartbeats every second: older than this, the worker is silent, not stuck
WAITING = "waiting for the other ranks"  # the worker's ``doing`` inside the step agreement's collective

_log = logging.getLogger("stadi")


class PoolStopped(WorkerError):
    """The pool was stopped (by another thread) while this wait was reading from it."""


def call_floor_s() -> float:
    """The least time a band call may go without progress: ``STADI_CALL_DEADLINE_S`` or 60 s.

    Read at every call, so a test (or a user chasing a hang) can lower it without a restart.
    """
    raw = os.environ.get(CALL_DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_CALL_FLOOR_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise PlanError(f"{CALL_DEADLINE_ENV}={raw!r}: give the seconds a band call may go without progress, "
                        f"e.g. {DEFAULT_CALL_FLOOR_S:.0f}")
    return value


def call_deadline_s(slowest_call_s: float, compiled: bool = False) -> float:
    """max(floor, 5 x the slowest call so far): a slow device is never mistaken for a stuck one."""
    floor = call_floor_s()
    if compiled:
        floor = max(floor, COMPILE_FLOOR_S)
    return max(floor, DEADLINE_FACTOR * slowest_call_s)


class Watch:
    """One wait's view of some ranks: when each was last heard from and last made progress.

    ``armed``: whether the stuck check applies from the start (band calls) or only after a rank's
    first real message (whole jobs, whose first step includes loading the model).
    """

    def __init__(self, pool, ranks: Sequence[int], doing: str, silence_s: float, armed: bool = True):
        now = time.monotonic()
        self.pool = pool
        self.doing = doing
        self.silence_s = silence_s
        self.heard = {r: now for r in ranks}
        self.moved = {r: now for r in ranks}
        self.progress: dict[int, int | None] = {r: None for r in ranks}
        self.activity = {r: doing for r in ranks}
        self.armed = {r: armed for r in ranks}
        self.longest_gap_s = 0.0  # longest time between two progress moves of any rank
        self.conns = {pool.conns[r]: r for r in ranks}

    def receive(self, pending: Sequence[int], timeout_s: float = POLL_S) -> list:
        """[(rank, message)] from ``pending`` ranks within ``timeout_s``; heartbeats are taken here."""
        conns = [c for c, r in self.conns.items() if r in pending]
        try:
            ready = wait_connections(conns, timeout=timeout_s)
        except (OSError, ValueError) as exc:  # a connection closed under us
            raise self._lost(pending[0] if pending else 0, exc)
        out = []
        for conn in ready:
            rank = self.conns[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError) as exc:
                raise self._lost(rank, exc)
            now = time.monotonic()
            self.heard[rank] = now
            if isinstance(msg, Heartbeat):
                self._note_heartbeat(rank, msg, now)
                continue
            self._moved(rank, now)  # anything else is the main thread's work
            self.armed[rank] = True
            out.append((rank, msg))
        return out

    def _note_heartbeat(self, rank: int, hb: Heartbeat, now: float) -> None:
        if hb.doing:
            self.activity[rank] = hb.doing
        if hb.progress != self.progress[rank]:
            if self.progress[rank] is not None:  # the first one is the baseline, not a move
                self._moved(rank, now)
            self.progress[rank] = hb.progress

    def _moved(self, rank: int, now: float) -> None:
        self.longest_gap_s = max(self.longest_gap_s, now - self.moved[rank])
        self.moved[rank] = now

    def _lost(self, rank: int, exc: BaseException) -> WorkerError:
        if self.pool.broken:
            return PoolStopped(f"the worker pool was stopped while {self.doing}")
        try:
            self.pool._raise_dead(rank, self.doing)
        except WorkerError as err:
            return err
        return WorkerLost(f"lost the connection to worker rank {rank} while {self.doing}: {exc}", rank,
                          self.pool.devices[rank], "connection lost")

    def check(self, pending: Sequence[int], deadline_s: float | None = None) -> None:
        """Raise if a worker died, went silent, or (with ``deadline_s``) made no progress that long."""
        for rank, p in enumerate(self.pool.procs):
            if p.poll() is not None:
                if self.pool.broken:
                    raise PoolStopped(f"the worker pool was stopped while {self.doing}")
                self.pool._raise_dead(rank, self.doing)
        now = time.monotonic()
        for rank in pending:
            if now - self.heard[rank] > self.silence_s:
                raise WorkerStuck(
                    f"worker rank {rank} ({self.pool.devices[rank]}) sent nothing for {self.silence_s:.0f} s "
                    f"while {self.doing}; the pool was stopped. Raise the timeout if the device is just slow.",
                    rank, self.pool.devices[rank], f"silent for {self.silence_s:.0f} s")
        if deadline_s is not None:
            self._check_stuck(pending, deadline_s, now)

    def _check_stuck(self, pending: Sequence[int], deadline_s: float, now: float) -> None:
        """A rank still heard from whose progress has not moved for ``deadline_s`` is stuck. A rank stuck
        in the step agreement's collective waits for another one: it is named only at twice the deadline
        (in per-rank loops each thread watches its own rank, and the culprit's thread must speak first)."""
        idle = {r: now - self.moved[r] for r in pending
                if self.armed[r] and now - self.heard[r] < HEARD_RECENTLY_S and now - self.moved[r] > deadline_s}
        working = [r for r in idle if not self.activity[r].startswith(WAITING)]
        waiting = [r for r in idle if r not in working and idle[r] > 2 * deadline_s]
        culprits = working or waiting
        if not culprits:
            return
        rank = culprits[0]
        others = sorted(r for r in idle if r != rank)
        also = f" Ranks {others} made no progress either (waiting for it?)." if others else ""
        raise WorkerStuck(
            f"worker rank {rank} ({self.pool.devices[rank]}) made no progress for {idle[rank]:.0f} s while "
            f"{self.activity[rank]}; the pool was stopped.{also} A device that is only slow needs a longer "
            f"deadline: set {CALL_DEADLINE_ENV} (now {deadline_s:.0f} s).", rank, self.pool.devices[rank],
            f"no progress for {idle[rank]:.0f} s")


def log_dropped(rank: int, msg) -> None:
    """A reply nobody waits for (an earlier call's, a finished job's) is dropped, not an error."""
    _log.warning("STADI: dropped a %s from worker rank %d (job %s, call %s) that no call waits for",
                 type(msg).__name__, rank, getattr(msg, "job_id", None), getattr(msg, "call_id", None))
