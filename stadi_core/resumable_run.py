"""A standalone run on a cluster that changes under it: one loop in segments, each continued where the last stopped.

The workers run the sampler loop (sampling/band_loop.py), one band each. Before every sync step each
rank sends its loop state (a Checkpoint, sampling/loop_state.py); the coordinator keeps the latest step
every rank reached. Two things end a segment and start the next one from such a state:

- a **lost worker**: its device leaves the cluster, the survivors are planned anew and, in a fresh pool,
  continue from the last step every rank checkpointed (exact mode: the latent of an uninterrupted run);
- an **in-run re-plan** (replan.py): the measured band times predict a clearly faster split, the ranks
  pause together at their next sync step and continue on the new rows, on the same warm pool.

A continued segment's first step is synchronous (its context buffers start empty), as after warmup.
Hybrid windows keep state the checkpoints do not carry: such a run restarts from noise after a loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from .cluster import ClusterSpec
from .errors import PlanError, WorkerLost
from .planner import Plan
from .replan import Replanner, ReplanPolicy
from .report import loss_note
from .runtime.messages import GenerateJob, Paused
from .sampling.loop_state import LoopState, stitch

log = logging.getLogger("stadi")


@dataclass
class RunOutcome:
    """What the last segment returned, and what the whole run went through."""

    plan: Plan  # the plan the run finished on
    results: dict  # rank -> BandResult of the last segment
    timings: list  # per rank of ``plan``: its step timings over every segment its device ran in
    pool: object  # the pool of the last segment
    wall_s: float
    notes: list = field(default_factory=list)  # losses and re-plans, in order


class _Segment:
    """One job on one plan: its checkpoints, step timings and (when asked) the re-plan it proposes."""

    def __init__(self, plan: Plan, replanner: Replanner | None, on_step):
        self.plan, self.replanner = plan, replanner
        self.on_step_outer = on_step
        self.timings: list[list[dict]] = [[] for _ in plan.bands]
        self.recent: list[list[float]] = [[] for _ in plan.bands]  # busy s of computed calls (the first excluded)
        self.checkpoints: dict[int, dict[int, LoopState]] = {}  # step -> rank -> state
        self.complete: LoopState | None = None  # the latest step every rank checkpointed, stitched
        self.last_step: int | None = None  # the last step any rank finished (1-based count)
        self.pool = None
        self.proposal = None

    def on_checkpoint(self, rank: int, state: LoopState) -> None:
        got = self.checkpoints.setdefault(state.step, {})
        got[rank] = state
        if len(got) < self.plan.world_size:
            return
        # branch arrangements: every rank steps the whole latent, rank 0's state is the run's
        whole = got[0] if self.plan.splits_branches else stitch(list(got.values()))
        self.complete = whole
        self.checkpoints = {s: c for s, c in self.checkpoints.items() if s > state.step}

    def on_step(self, rank: int, timing: dict) -> None:
        self.timings[rank].append(timing)
        self.last_step = max(self.last_step or 0, int(timing["step"]) + 1)
        if self.on_step_outer is not None:
            self.on_step_outer(rank, timing)
        if timing["computed"]:
            if any(t["computed"] for t in self.timings[rank][:-1]):  # the segment's first call allocates
                self.recent[rank].append(float(timing["busy_s"]))
            self._maybe_replan(int(timing["step"]))

    def _maybe_replan(self, step: int) -> None:
        """Ask the ranks to pause when the band times measured so far predict a clearly faster split."""
        if self.replanner is None or self.proposal is not None:
            return
        self.proposal = self.replanner.propose(self.plan, self.recent, step)
        if self.proposal is not None:
            self.pool.pause()

    def timings_before(self, step: int | None) -> list[list[dict]]:
        """Each rank's timings of the steps this segment keeps (the next one redoes the later ones)."""
        return [[t for t in ts if step is None or int(t["step"]) < step] for ts in self.timings]


class RunInputs(Protocol):
    """What every segment of one run shares (api.py's StandaloneInputs): plans for the devices left,
    pools of their workers, and each rank's job."""

    def plan(self, cluster: ClusterSpec) -> Plan: ...

    def pool(self, cluster: ClusterSpec, plan: Plan): ...

    def job(self, job_id: int, rank: int, plan: Plan) -> GenerateJob: ...


class ResumableRun:
    """Runs one generation in segments (see the module docstring) and says what happened on the way."""

    def __init__(self, cluster: ClusterSpec, plan: Plan, work: "RunInputs", *,
                 stall_timeout_s: float, on_step=None, should_cancel=None, resumable: bool = True,
                 policy: ReplanPolicy | None = None):
        self.cluster, self.first_plan, self.work = cluster, plan, work
        self.stall_timeout_s, self.on_step, self.should_cancel = stall_timeout_s, on_step, should_cancel
        self.resumable = resumable  # checkpoints carry the whole loop (not with a hybrid window)
        self.policy = policy if resumable else None

    def run(self) -> RunOutcome:
        plan = self.first_plan
        state: LoopState | None = None  # the whole latent's loop state the next segment continues from
        kept: dict[str, list[dict]] = {}  # device -> step timings of the segments it ran in
        notes: list[str] = []
        replanner = Replanner(self.policy) if self.policy is not None else None
        t0 = time.perf_counter()
        while True:
            seg_plan = plan if state is None else replace(plan, warmup=max(plan.warmup, state.step + 1))
            segment = _Segment(seg_plan, replanner if plan.world_size > 1 else None, self.on_step)
            pool = segment.pool = self.work.pool(self.cluster, seg_plan)
            try:
                results = pool.run(lambda job_id: job_id, stall_timeout_s=self.stall_timeout_s,
                                   on_step=segment.on_step, should_cancel=self.should_cancel,
                                   on_checkpoint=segment.on_checkpoint if self.resumable else None,
                                   per_rank=lambda job_id, rank, job_plan=seg_plan, from_state=state:
                                   self._job(job_id, rank, job_plan, from_state))
            except WorkerLost as lost:
                try:
                    self.cluster = self.cluster.without(lost.device)
                except PlanError:
                    raise lost from None  # no device survives
                if not self.resumable:
                    state = None  # from noise
                elif segment.complete is not None:
                    state = segment.complete  # else from where this segment began
                self._keep(kept, segment, state.step if state is not None else 0)
                survivors = self.work.plan(self.cluster)
                note = loss_note(lost.device, lost.reason, segment.last_step, plan, survivors,
                                 resumed=state is not None, from_step=state.step if state is not None else None)
                log.warning("STADI: %s", note)
                notes.append(note)
                plan = survivors
                continue
            paused = [r for r in results.values() if isinstance(r, Paused)]
            if paused:  # every rank alike: the agreed stop is collective
                step = paused[0].step
                state = segment.complete
                if state is None or state.step != step:
                    raise RuntimeError(f"the ranks paused at step {step} without a checkpoint of it")
                self._keep(kept, segment, step)
                note = segment.proposal.describe(plan, step)
                log.info("STADI %s", note)
                notes.append(note)
                plan = segment.proposal.plan
                replanner.moved(step)
                continue
            self._keep(kept, segment, None)
            timings = [kept.get(b.device, []) for b in plan.bands]
            return RunOutcome(plan, results, timings, pool, time.perf_counter() - t0, notes)

    def _job(self, job_id: int, rank: int, plan: Plan, state: LoopState | None) -> GenerateJob:
        job = self.work.job(job_id, rank, plan)
        job.checkpoints = self.resumable
        if state is not None:
            band = plan.bands[rank]
            job.resume = state if plan.splits_branches else state.crop(band.row_start, band.rows)
        return job

    @staticmethod
    def _keep(kept: dict, segment: _Segment, upto: int | None) -> None:
        for band, ts in zip(segment.plan.bands, segment.timings_before(upto)):
            kept.setdefault(band.device, []).extend(dict(t, rows=band.rows) for t in ts)  # rows: measured_capabilities
