"""Issue #16 items 3 and 4 over real worker processes: every wait has a deadline (a worker whose main
thread is stuck while its heartbeats keep flowing is caught by its progress), an interrupt ends a
stuck call within 2 s, the next pool works; one writer per connection (a cancel sent while a large
band call is being written never corrupts a frame); call ids unique for the pool's life; a reply
nobody waits for is dropped with a log line.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
from helpers import gone

from stadi_core.errors import WorkerError, WorkerTimeout
from stadi_core.models.spec import ModelSpec, build_model, make_conditioning
from stadi_core.planner import make_plan
from stadi_core.runtime.lifeline import STALL_FILE_ENV
from stadi_core.runtime.liveness import CALL_DEADLINE_ENV
from stadi_core.runtime.messages import (
    BandCall,
    BandOutput,
    Cancelled,
    SessionStart,
    WorkerFailure,
)
from stadi_core.runtime.pool import JobCancelledError, WorkerPool
from stadi_core.runtime.registry import get_pool
from stadi_core.runtime.session import Session

SPEC = ModelSpec()  # the tiny diffusers SD1.5-like UNet
TWO = ["cpu:0", "cpu:1"]
PLAN = make_plan(16, [1.0, 1.0], devices=TWO, steps=4, mode="exact")


@pytest.fixture(scope="module")
def cond():
    model = build_model(SPEC, torch.device("cpu"))
    return {k: v.numpy() for k, v in make_conditioning(SPEC, model, 1, seed=0)["cond"].items()}


ONE = ["cpu:0"]
PLAN_ONE = make_plan(8, [1.0], devices=ONE, steps=2, mode="exact")


def _stall_pool(stall_file, devices=TWO) -> WorkerPool:
    """CPU workers that hang in their next band call while ``stall_file`` exists."""
    return WorkerPool(devices, "gloo", threads_per_worker=1,
                      worker_env=[{STALL_FILE_ENV: str(stall_file)}] * len(devices)).start()


def _session(pool, plan=PLAN) -> Session:
    return pool.open_session(lambda job_id: SessionStart(job_id, SPEC.to_dict(), plan.to_dict()))


def _lockstep_call(session, cond, step, plan=PLAN, **kw):
    x = np.random.default_rng(step).standard_normal((1, 4, plan.height, 16)).astype(np.float32)

    def call(b):
        xb = np.ascontiguousarray(x[:, :, b.row_start:b.row_end])
        return lambda job_id, call_id: BandCall(job_id, call_id, step, "fresh", xb, np.array([500.0], np.float32),
                                                cond, signature=step)
    return session.call_all({b.rank: call(b) for b in plan.bands}, **kw)


def _assert_stopped(pool):
    assert not pool.alive()
    for pid in pool.pids():
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid), f"worker {pid} outlived its stopped pool"


def test_a_stuck_worker_stops_the_session_within_its_deadline_naming_the_rank(tmp_path, cond, monkeypatch):
    monkeypatch.setenv(CALL_DEADLINE_ENV, "3")
    stall = tmp_path / "stall"
    pool = _stall_pool(stall)
    try:
        session = _session(pool)
        try:
            assert _lockstep_call(session, cond, 0).keys() == {0, 1}  # healthy first
            deadline = session.call_deadline_s()
            stall.write_text("1")
            t0 = time.monotonic()
            with pytest.raises(WorkerTimeout) as err:
                _lockstep_call(session, cond, 1)
            took = time.monotonic() - t0
        finally:
            session.close()
        stalled_at = float((tmp_path / "stall.stalled").read_text().split()[1])
        print(f"stuck worker error after {took:.1f} s (deadline {deadline:.1f} s; "
              f"{time.time() - stalled_at:.1f} s after rank 1 hung)")
        message = str(err.value)
        assert "worker rank 1 (cpu:1) made no progress for" in message, message
        assert "while evaluating a band (step 1)" in message and CALL_DEADLINE_ENV in message, message
        assert "Ranks [0]" in message  # rank 0 waits for it in the step agreement: named as a victim
        assert deadline <= took < deadline + 3.0, (took, deadline)
        _assert_stopped(pool)
    finally:
        pool.close(force=True)


def test_interrupt_ends_a_stuck_call_within_2s_and_a_fresh_pool_works(tmp_path, cond, monkeypatch):
    monkeypatch.delenv(CALL_DEADLINE_ENV, raising=False)  # 60 s: only the interrupt can end this call
    stall = tmp_path / "stall"
    stall.write_text("")  # every rank: the one worker of this pool
    pool = _stall_pool(stall, ONE)
    try:
        session = _session(pool, PLAN_ONE)
        interrupt_at = []

        def should_cancel():
            if not interrupt_at and (tmp_path / "stall.stalled").exists():
                interrupt_at.append(time.monotonic() + 0.5)  # well inside the stuck call
            return bool(interrupt_at) and time.monotonic() >= interrupt_at[0]

        try:
            with pytest.raises(JobCancelledError, match="did not stop within 1.2 s"):
                _lockstep_call(session, cond, 0, PLAN_ONE, should_cancel=should_cancel)
            took = time.monotonic() - interrupt_at[0]
            with pytest.raises(JobCancelledError):  # the session is over, not half-alive
                _lockstep_call(session, cond, 1, PLAN_ONE)
        finally:
            session.close()
        print(f"interrupt ended the stuck call in {took:.2f} s")
        assert took < 2.0, took
        _assert_stopped(pool)
    finally:
        pool.close(force=True)
    fresh = get_pool(ONE, "gloo")
    session = _session(fresh, PLAN_ONE)
    try:
        outs = _lockstep_call(session, cond, 0, PLAN_ONE)
        assert all(np.isfinite(o.out).all() for o in outs.values())
    finally:
        session.close()
    assert fresh.alive()


def test_cancels_sent_while_large_band_calls_are_written_corrupt_no_frame(cond):
    """32 band calls of ~4 MB each (a long conditioning: one frame of several writes) while another
    thread sends cancels on the same connection as fast as it can: every output arrives and equals
    the reference for its input, and the pool stays usable."""
    pool, plan = get_pool(ONE, "gloo"), PLAN_ONE
    big = {"context": np.random.default_rng(1).standard_normal((1, 32768, 32)).astype(np.float32)}  # 4 MB
    xs = [np.random.default_rng(s).standard_normal((1, 4, 8, 8)).astype(np.float32) for s in range(2)]

    def call(i):
        return lambda job_id, call_id: BandCall(job_id, call_id, 0, "fresh", xs[i % 2], np.array([500.0], np.float32),
                                                big, measure_only=True)  # measure-only: a cancel is noted, not acted on

    session = _session(pool, plan)
    try:
        refs = [session.call(0, call(i)).out for i in range(2)]
        sent_before = pool.bytes_sent[0]
        stop, cancels = threading.Event(), [0]

        def cancel_storm():
            while not stop.is_set():
                pool.cancel()
                cancels[0] += 1
                time.sleep(0.001)

        storm = threading.Thread(target=cancel_storm, daemon=True)
        storm.start()
        try:
            for i in range(32):
                out = session.call(0, call(i), stall_timeout_s=60)
                assert np.array_equal(out.out, refs[i % 2]), f"call {i}: output differs from its reference"
        finally:
            stop.set()
            storm.join(5)
        print(f"32 calls of {big['context'].nbytes / 1e6:.1f} MB with {cancels[0]} cancels in between")
        assert cancels[0] >= 32
        assert pool.bytes_sent[0] - sent_before >= 32 * big["context"].nbytes
    finally:
        session.close()
    assert pool.alive() and get_pool(ONE, "gloo") is pool  # warm, not restarted
    session = _session(pool, plan)
    try:
        assert np.array_equal(session.call(0, call(0)).out, refs[0])
    finally:
        session.close()


def test_call_ids_are_unique_across_sessions_of_one_pool(cond):
    pool, plan = get_pool(ONE, "gloo"), PLAN_ONE
    x = np.zeros((1, 4, 8, 8), np.float32)
    ids = []
    for _ in range(2):
        session = _session(pool, plan)
        try:
            for step in range(2):
                out = session.call(0, lambda job_id, call_id, step=step: BandCall(
                    job_id, call_id, step, "fresh", x, np.array([500.0], np.float32), cond))
                ids.append(out.call_id)
        finally:
            session.close()
    assert len(set(ids)) == len(ids) == 4 and ids == sorted(ids), ids


def test_the_pool_lock_is_taken_with_a_deadline_that_says_who_holds_it():
    pool, plan = get_pool(ONE, "gloo"), PLAN_ONE
    session = _session(pool, plan)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeout, match=r"the worker pool stayed busy for 1 s \(another run holds it\)"):
            pool.open_session(lambda job_id: SessionStart(job_id, SPEC.to_dict(), plan.to_dict()), lock_timeout_s=1)
        assert time.monotonic() - t0 < 3
    finally:
        session.close()
    assert pool.alive()


class _FakePool:
    """The pool's side of ``Session._take``: its devices and its failure attribution (no process died)."""

    devices = ("cpu:0",)
    procs = ()
    failure = WorkerPool.failure


def test_a_reply_nobody_waits_for_is_dropped_with_a_log_line(caplog):
    session = Session(_FakePool(), job_id=7, ready={})
    outputs: dict = {}
    expected = {0: 12}
    stale = [BandOutput(7, 11, 0, np.zeros(1), 0.0, 0.0),  # an earlier call of this session
             BandOutput(6, 12, 0, np.zeros(1), 0.0, 0.0),  # another session's call
             Cancelled(6, 0, 3),  # a cancel that ended an earlier session
             WorkerFailure(6, 0, "boom", "")]  # a failure of a finished job
    with caplog.at_level(logging.WARNING, logger="stadi"):
        for msg in stale:
            session._take(0, msg, expected, outputs)
    assert outputs == {}
    assert sum("no call waits for" in r.getMessage() for r in caplog.records) == len(stale)
    session._take(0, BandOutput(7, 12, 0, np.ones(1), 0.0, 0.0), expected, outputs)
    assert list(outputs) == [0]
    with pytest.raises(WorkerError, match="rank 0 \\(cpu:0\\) failed: boom"):
        session._take(0, WorkerFailure(7, 0, "boom", ""), expected, outputs)
