"""What a run did and what it cost, per rank: the data behind the balance tables and the UI."""

from __future__ import annotations

from dataclasses import dataclass, field

import math

from .planner import Plan


def idle_pct(busy_s: float, wall_s: float) -> float:
    """Share of a rank's loop not spent computing (waiting on exchanges or other ranks), in %."""
    return 100.0 * max(0.0, 1.0 - busy_s / wall_s) if wall_s > 0 else 0.0


def psnr(a, ref) -> float:
    """PSNR of ``a`` against ``ref`` in dB, peak = the reference's value range (inf if equal)."""
    mse = float(((a - ref) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(float(ref.max() - ref.min()) ** 2 / mse)


@dataclass
class RankSummary:
    rank: int
    device: str
    rows: int
    stride: int
    evals: int
    busy_s: float  # network compute (with any emulated pad), excluding waits on other ranks
    comm_s: float  # blocked in exchanges (the exposed part: overlapped transfers do not count)
    wall_s: float  # the rank's denoising loop (model loading excluded)
    sent_bytes: int = 0  # context this rank put on the wire (parallel/links.py counts it)

    @property
    def comm_pct(self) -> float:
        """Exposed communication: share of the loop spent blocked in exchanges, in %."""
        return 100.0 * self.comm_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def idle_pct(self) -> float:
        """Share of the run this rank was not computing (waiting, or done early)."""
        return idle_pct(self.busy_s, self.wall_s)


@dataclass
class RunReport:
    plan: dict
    wall_s: float  # the coordinator's wall time for the whole call (includes any model loading)
    ranks: list[RankSummary]
    steps: list[list[dict]] = field(default_factory=list)  # per rank, per step StepTiming dicts
    notes: list[str] = field(default_factory=list)
    slowdowns: list[float] = field(default_factory=list)
    pool_pids: list[int] = field(default_factory=list)
    checksums: dict = field(default_factory=dict)
    hybrid_window: dict | None = None  # Hybridiff window decision (sampling/hybrid_window.py), if one ran

    @classmethod
    def from_results(cls, plan: Plan, timings: list[list[dict]], wall_s: float, *, slowdowns=(), pool_pids=(),
                     checksums=None) -> "RunReport":
        ranks = []
        for band, steps in zip(plan.bands, timings):
            ranks.append(RankSummary(
                rank=band.rank, device=band.device, rows=band.rows, stride=band.stride,
                evals=sum(1 for s in steps if s["computed"]),
                busy_s=sum(s["busy_s"] for s in steps), comm_s=sum(s["comm_s"] for s in steps),
                wall_s=sum(s["wall_s"] for s in steps), sent_bytes=sum(sum(s.get("sent", {}).values()) for s in steps),
            ))
        notes = list(plan.notes)
        if any(s > 1 for s in slowdowns):
            notes.append("slowdowns are emulated (compute padded to budget): " +
                         ", ".join(f"{b.device} x{s:g}" for b, s in zip(plan.bands, slowdowns)))
        return cls(plan=plan.to_dict(), wall_s=wall_s, ranks=ranks, steps=timings, notes=notes,
                   slowdowns=list(slowdowns), pool_pids=list(pool_pids), checksums=dict(checksums or {}))

    @property
    def denoise_s(self) -> float:
        """Makespan of the denoising loops: the latency a warm pool delivers."""
        return max((r.wall_s for r in self.ranks), default=0.0)

    def to_dict(self) -> dict:
        return {
            "plan": self.plan, "wall_s": self.wall_s, "denoise_s": self.denoise_s, "notes": self.notes, "slowdowns": self.slowdowns,
            "ranks": [dict(r.__dict__, idle_pct=r.idle_pct, comm_pct=r.comm_pct) for r in self.ranks],
            "steps": self.steps,
        }

    def table(self) -> str:
        w = max([8] + [len(r.device) for r in self.ranks])  # devices of other machines: HOST/cuda:0
        lines = [f"{'rank':>4} {'device':<{w}} {'rows':>5} {'stride':>6} {'evals':>5} {'busy s':>8} "
                 f"{'comm s':>8} {'idle %':>7} {'sent MB':>8}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4} {r.device:<{w}} {r.rows:>5} {r.stride:>6} {r.evals:>5} {r.busy_s:>8.3f} "
                         f"{r.comm_s:>8.3f} {r.idle_pct:>7.1f} {r.sent_bytes / 1e6:>8.3f}")
        lines.append(f"denoising {self.denoise_s:.3f} s; whole call {self.wall_s:.3f} s (includes model loading on a cold pool)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def measured_capabilities(report: RunReport) -> dict[str, float]:
    """Rows/s each device achieved on its band, with real context, from a run's step timings.

    The first evaluation is left out (allocation, caches). These are the planner's speeds
    for the next run at this size: band cost is not proportional to rows (fixed per-call
    overhead, attention over the whole image), so a measurement at the operating point
    beats a micro-benchmark at another size.

    A run re-planned on the way has its steps at several row counts: each timing carries the
    rows it was computed on (``rows``; the rank's final rows when absent), and the first call
    after the rows change is left out too (new buffers).
    """
    caps = {}
    for rank, steps in zip(report.ranks, report.steps):
        rows, busy, last = 0.0, 0.0, None
        for s in steps:
            if not s["computed"]:
                continue
            n = s.get("rows", rank.rows)
            if n == last:
                rows, busy = rows + n, busy + s["busy_s"]
            last = n
        if busy > 0:
            caps[rank.device] = rows / busy
    return caps


def loss_note(device: str, reason: str, step: int | None, old: Plan, new: Plan, *, resumed: bool,
              from_step: int | None = None) -> str:
    """What a lost worker changed, for the report and the web panel: 'cpu:1 lost at step 7 (was killed by
    SIGKILL); its rows 64-127 moved to cpu:0; the run went on from that call on the survivors'.
    ``from_step``: the step a resumed run went on from, when not the call that failed."""
    at = f" at step {step}" if step is not None else ""
    lost = next((b for b in old.bands if b.device == device), None)
    if lost is None or old.splits_branches or new.splits_branches:
        moved = f"its work moved to {', '.join(b.device for b in new.bands)}"
    else:
        takers = [b.device for b in new.bands if b.row_start < lost.row_end and b.row_end > lost.row_start]
        moved = f"its rows {lost.row_start}-{lost.row_end - 1} moved to {', '.join(takers)}"
    how = "the run went on from that call on the survivors" if resumed else "the run restarted on the survivors"
    if resumed and from_step is not None:
        how = f"the survivors went on from step {from_step}, the last every rank had reached"
    return f"{device} lost{at} ({reason}); {moved}; {how}"
