"""In-run re-planning as a pure decision (stadi_core/replan.py): noise moves nothing, a real change does."""

from __future__ import annotations

import random

import pytest

from stadi_core.errors import PlanError
from stadi_core.planner import make_plan
from stadi_core.replan import ReplanPolicy, propose


def _plan(rows_weights, align=8, height=64, mode="displaced"):
    return make_plan(height, rows_weights, align=align, steps=16, warmup=2, mode=mode, strides="off",
                     ragged=align == 1)


def _times(rows, seconds_per_row, calls, noise, rng):
    return [[r * s * (1 + rng.uniform(-noise, noise)) for _ in range(calls)] for r, s in zip(rows, seconds_per_row)]


@pytest.mark.parametrize("weights,align", [([1, 1], 8), ([3, 3, 2], 8), ([5, 3], 1), ([3, 1], 8)])
def test_noise_of_ten_percent_per_call_never_moves_balanced_bands(weights, align):
    plan = _plan(weights, align)
    rows = list(plan.rows)
    rng = random.Random(0)
    per_row = [1.0 / r for r in rows]  # every rank takes the same time: the rows are balanced
    for _ in range(5000):
        assert propose(plan, _times(rows, per_row, 6, 0.10, rng)) is None


@pytest.mark.parametrize("align", [8, 1])
def test_a_rank_that_becomes_2x_slower_gives_up_rows(align):
    plan = _plan([1, 1], align)
    assert list(plan.rows) == [32, 32]
    p = propose(plan, _times([32, 32], [0.01, 0.02], 4, 0.10, random.Random(1)))  # rank 1: twice the time per row
    assert p is not None and p.plan.rows[0] > 32 > p.plan.rows[1] and sum(p.plan.rows) == 64
    assert p.plan.devices == plan.devices and p.plan.mode == plan.mode and p.plan.context == plan.context
    assert p.gain > 0.2  # 32/32 at 1:2 speeds -> about 43/21
    assert "re-planned at step 5: rows 32/32 ->" in p.describe(plan, 5)


def test_too_few_calls_or_one_rank_propose_nothing():
    assert propose(_plan([1, 1]), [[1.0] * 2, [2.0] * 2]) is None  # the window is 3 calls
    assert propose(_plan([1]), [[1.0] * 4]) is None


def test_a_proposal_that_would_drop_a_band_is_refused():
    # rank 1 is 100x slower: its share rounds to zero units, but a rank cannot leave mid-run
    assert propose(_plan([1, 1]), [[0.32] * 4, [32.0] * 4]) is None


def test_the_policy_reads_the_env(monkeypatch):
    monkeypatch.setenv("STADI_REPLAN", "off")
    assert ReplanPolicy.from_env() is None
    monkeypatch.setenv("STADI_REPLAN", "on")
    assert ReplanPolicy.from_env() == ReplanPolicy()
    monkeypatch.setenv("STADI_REPLAN", "sometimes")
    with pytest.raises(PlanError, match="STADI_REPLAN"):
        ReplanPolicy.from_env()


def test_rows_that_were_measured_no_faster_are_not_proposed_again():
    """A fixed cost per call makes small bands slower per row than the linear model predicts: the run
    remembers what it measured and does not flap back to rows that gave no gain."""
    plan = _plan([3, 1])  # 48/16
    busy = [[0.20] * 4, [0.40] * 4]  # rank 1's 16 rows take twice as long as rank 0's 48
    p = propose(plan, busy)
    assert p is not None and list(p.plan.rows) == [56, 8]  # the linear model predicts 0.40 -> 0.23 s
    assert propose(plan, busy, tried={(56, 8): 0.50}) is None  # but 56/8 measured 0.50 s: no better than 0.40
    assert propose(plan, busy, tried={(56, 8): 0.30}) is not None  # measured clearly faster: allowed


def test_speeds_of_a_re_planned_run_use_the_rows_each_call_was_computed_on():
    """A run that moved from 32/32 to 40/24 rows: the speeds come from each call's own rows, so the
    next run's plan is not skewed by dividing the final rows by times measured on the first ones."""
    from stadi_core.report import RunReport, measured_capabilities

    plan = _plan([5, 3])
    assert plan.rows == (40, 24)
    per_row = (0.01, 0.02)  # cpu:1 takes twice as long per row
    timings = []
    for rank, s in enumerate(per_row):
        calls = [(32, True)] * 4 + [(plan.rows[rank], True)] * 4  # first call of each row count allocates
        timings.append([dict(step=i, computed=c, phase="fresh", busy_s=n * s * (3 if i in (0, 4) else 1), comm_s=0.0,
                             wall_s=1.0, rows=n) for i, (n, c) in enumerate(calls)])
    report = RunReport.from_results(plan, timings, 1.0)
    caps = measured_capabilities(report)
    assert list(caps.values()) == pytest.approx([100.0, 50.0])
    for steps in timings:  # without the per-call rows: the final rows over every call's time
        for t in steps:
            del t["rows"]
    assert list(measured_capabilities(RunReport.from_results(plan, timings, 1.0)).values()) != pytest.approx([100.0, 50.0])

