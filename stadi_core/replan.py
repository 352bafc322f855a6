"""Moving bands during a run: from the band times measured so far to new rows, only when clearly better.

DESIGN §4: after warmup the planner may re-plan from measured speeds; the change takes effect at a
sync point and is followed by one synchronous step that rebuilds the context. This module is the
decision (ComfyUI's lockstep run, nodes/lockstep.py, and the standalone engine's segments,
resumable_run.py, apply it): each rank's rate is its rows over the
median busy time of its last ``window`` calls (a median, so a single slow call moves nothing), the
proposal is the planner's own row split for those rates, and it is taken only when it predicts the
step at least ``gain`` faster than the current rows under the same rates, at most once every
``every_steps`` steps. Noise of +-10 % per call therefore leaves the bands alone (it alone predicts up
to 11 %); a device that becomes 2x slower moves them (about 30 %).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from typing import Sequence

from .errors import PlanError
from .planner import Plan, replan

REPLAN_ENV = "STADI_REPLAN"  # "off" disables in-run re-planning


@dataclass(frozen=True)
class ReplanPolicy:
    # the predicted step time must fall by more than this share: with +-10 % noise per call, medians of
    # 3 calls alone predict up to 11 % on one-row alignment (20,000 draws), so 5 % would flap
    gain: float = 0.12
    # calls per rank whose median busy time gives its rate: 3 reacts two steps after a device slows down
    # (4 would mix fast and slow calls for a step longer and move the rows only halfway)
    window: int = 3
    every_steps: int = 2  # steps between two re-plans, at least

    @classmethod
    def from_env(cls) -> "ReplanPolicy | None":
        """The policy, or None when ``STADI_REPLAN=off``."""
        value = os.environ.get(REPLAN_ENV, "on").strip().lower()
        if value in ("off", "0", "false", "no"):
            return None
        if value not in ("on", "1", "true", "yes", ""):
            raise PlanError(f"{REPLAN_ENV}={value!r}: use 'on' or 'off'")
        return cls()


@dataclass(frozen=True)
class Proposal:
    plan: Plan  # the planner's plan for the measured rates (same devices, options and context)
    rates: list[float]  # rows per second each rank measured
    current_s: float  # predicted step time of the current rows at those rates
    predicted_s: float  # ... and of the proposed rows

    @property
    def gain(self) -> float:
        return 1.0 - self.predicted_s / self.current_s

    def describe(self, old: Plan, step: int) -> str:
        rates = ", ".join(f"{r:.3g}" for r in self.rates)
        return (f"re-planned at step {step}: rows {'/'.join(map(str, old.rows))} -> "
                f"{'/'.join(map(str, self.plan.rows))} (measured {rates} rows/s; predicted step "
                f"{self.current_s:.3g} s -> {self.predicted_s:.3g} s, -{100 * self.gain:.0f} %)")


def propose(plan: Plan, recent_busy: Sequence[Sequence[float]], policy: ReplanPolicy = ReplanPolicy(),
            tried: dict | None = None) -> Proposal | None:
    """A better plan for these measured band times, or None when the current rows should stay.

    ``recent_busy[i]``: busy seconds of rank i's calls since its rows last changed (oldest first).
    ``tried``: rows -> the step time measured with them earlier in this run. Band cost is not
    proportional to rows on every device (a fixed cost per call dominates small bands), so a
    proposal can predict a gain that its rows already failed to give: rows measured no faster than
    the present step are not proposed again (no flapping between two splits).
    Bands only (a branch arrangement's units are not rows of one image), every rank kept.
    """
    if plan.world_size < 2 or plan.splits_branches or any(len(b) < policy.window for b in recent_busy):
        return None
    medians = [statistics.median(b[-policy.window:]) for b in recent_busy]
    if any(m <= 0 for m in medians):
        return None
    # the planner's own split for these rates; the run notes the change itself (Proposal.describe)
    new = replace(replan(plan, medians), context=plan.context, notes=plan.notes)
    if new.devices != plan.devices or new.rows == plan.rows:  # a rank cannot be dropped mid-run
        return None
    rates = [r / m for r, m in zip(plan.rows, medians)]
    current = max(r / c for r, c in zip(plan.rows, rates))
    predicted = max(n / c for n, c in zip(new.rows, rates))
    proposal = Proposal(new, rates, current, predicted)
    if proposal.gain <= policy.gain:
        return None
    measured = (tried or {}).get(tuple(new.rows))
    if measured is not None and measured * (1 - policy.gain) >= current:
        return None
    return proposal


def step_time(recent_busy: Sequence[Sequence[float]], window: int) -> float:
    """The measured time of a call on the current rows: the slowest rank's median busy time."""
    return max(statistics.median(b[-window:]) for b in recent_busy)


class Replanner:
    """When a run moves its bands: the policy's gates (after warmup, not within ``every_steps`` of the last
    move), the proposal, and the rows already measured (``tried``, so bands do not flap). One per run:
    ComfyUI's lockstep run and the standalone engine's segments (resumable_run.py) both ask it."""

    def __init__(self, policy: ReplanPolicy | None):
        self.policy = policy  # None: STADI_REPLAN=off
        self.tried: dict[tuple, float] = {}  # rows -> the call time measured with them
        self.changed_at: int | None = None  # step of the last move

    def propose(self, plan: Plan, recent_busy: Sequence[Sequence[float]], step: int) -> Proposal | None:
        """A clearly better plan at ``step`` for these band times (see ``propose``), or None."""
        policy = self.policy
        if policy is None or step < plan.warmup or (
                self.changed_at is not None and step - self.changed_at < policy.every_steps):
            return None
        proposal = propose(plan, recent_busy, policy, self.tried)
        if proposal is not None:
            self.tried[tuple(plan.rows)] = step_time(recent_busy, policy.window)
        return proposal

    def moved(self, step: int) -> None:
        """The bands moved at ``step``."""
        self.changed_at = step
