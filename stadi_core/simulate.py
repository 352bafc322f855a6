"""Predict the latency of a STADI plan on a cluster that is not here (DESIGN.md §5, §6, §7).

The simulator replays a :class:`~stadi_core.planner.Plan` step by step with a cost model:

* compute — one measured curve per device: seconds of ONE band evaluation (the network
  call on that band, CFG batch included) as a function of the band's latent rows, at one
  image width and model. Linear interpolation between points, linear extrapolation beyond
  the first/last two points, never below zero; a one-point curve is taken as proportional
  to rows (through the origin).
* exchange — the bytes each rank contributes to the all-gathers of one network call at a
  sync step (``bytes_fixed + bytes_per_row * rows``, or a (rows, bytes) table), padded to
  the largest band as the engine's all-gather does, and a link model per pair of ranks
  (bandwidth in GB/s = 1e9 bytes/s, latency per message in seconds; one default for every
  pair, optionally a P x P matrix for cross-machine links). Rank i must receive every other
  rank's payload: ``X_i = sum_{j != i} (messages * latency_ij + payload / bandwidth_ij)``;
  the collective is done when the last rank has its data, ``X = max_i X_i``. ``messages``
  is the number of all-gathers per network call (one per patch-parallel layer).
* execution (DESIGN §4) — ranks run independently between sync steps. At a sync step
  every rank computes and every rank first waits for the slowest to arrive (the engine's
  cancel/agree all-reduce). Synchronous steps (every step in ``exact`` mode, and the
  warmup steps in ``displaced`` mode) block on each layer's exchange: the step costs
  ``max_i compute_i + X`` for everybody. In ``displaced`` mode a sync step's exchange is
  asynchronous; ``displaced_exchange`` says when it must be complete:
  ``"deferred"`` (the default) — it overlaps everything until the next sync step, which
  cannot start before the transfer is done, so a rank waits only for the excess over its
  own work. With ``overlap`` on (``ContextOptions``, the engine's default) each layer's
  exchange is started as soon as the layer has computed it, during the forward, and waited
  for only when the next sync call reaches that same layer: the transfer runs alongside the
  sync step's own compute and every stale step after it (modelled conservatively: the next
  sync step waits for all of it before its first layer). With ``overlap`` off the engine
  starts the exchanges after the forward (``BandContext.end_call``) and waits for all of
  them when the next sync call begins: the transfer then starts when the slowest rank has
  finished its forward and hides only behind the stale steps in between (with sync every
  step it is fully exposed). ``"overlapped"`` — it overlaps the sync step's own compute and
  every rank waits for it at the end of that network call (the slowest rank's compute, plus
  any transfer not hidden); ``"after_forward"`` — it runs after the forward, at the end of
  the same call, not overlapped (the step then costs what a synchronous step costs); the
  CUDA-IPC transport (same-GPU workers) is synchronous, i.e. ``"after_forward"``.
  Between sync steps a rank computes on stale context with no communication, or, on a
  step its stride skips, only pays ``step_overhead_s`` (which every rank also pays on
  every step). The makespan is when the last rank finishes.
* context options — displaced sync steps after warmup send what the plan's ``context`` (or
  the ``context`` argument) says: partial K/V to the neighbours only, FP8 or delta-coded
  payloads. Their bytes come from a layer inventory (``exchange=ExchangeCost.for_context``,
  context_bytes.py); warmup steps and exact mode stay raw and full. With plain byte figures
  only ``overlap`` is modelled. The codecs' compute is not modelled.
* emulated slowdowns (optional) — the engine emulates a slow device by padding its compute
  with a sleep AFTER the network call (``slowdown`` x the real compute). The collectives of
  such a rank only wait for the real part; pass ``emulated_slowdowns`` to model a run
  measured that way (curves fitted from such runs include the pad, as ``busy_s`` does).

Curves JSON (``load_curves``; ``stadi_core/bench/example_curves.json`` is an example)::

    {
      "description": "free text: model, image size, how it was measured",
      "illustrative": false,            # true = invented numbers, not a measurement
      "model": "sdxl", "width": 256,   # latent columns the curves were measured at (info)
      "devices": {                      # band order = this order unless --devices says
        "cuda:0": {"label": "H100", "points": [[32, 0.065], [64, 0.115], [128, 0.215]]},
        "cuda:1": [[32, 0.093], [64, 0.164]]      # the bare list form is accepted too
      },
      "exchange": {                     # optional; CLI flags override
        "bytes_per_row": 13000000,      # bytes a rank sends per latent row per sync step
        "bytes_fixed": 20000000,        # per rank per sync step, independent of rows (halos, GN stats)
        "table": [[32, 4.3e8], [64, 8.5e8]],   # OR bytes per rank as a function of rows
        "messages": 180                 # all-gathers per network call (pays latency each)
      },
      "links": {                        # optional; one default or P x P matrices (band order)
        "bandwidth_gbps": 25, "latency_us": 20
      }
    }

``points`` are ``[rows, seconds_per_eval]`` pairs; the top level may also be the bare
``{"device": points, ...}`` mapping that :func:`fit_curve_from_report` returns.

Python::

    curves = fit_curve_from_report(report.to_dict())           # from a measured run
    plan = plan_from_curves(curves, 64, steps=20, warmup=2)     # or any Plan
    sim = simulate(plan, curves, link=LinkModel(25, 20e-6), bytes_per_row=1e6)
    sim = simulate(plan, curves, **fit_costs_from_report(report))  # or measured exchange/overhead
    print(sim.table()); print(compare(sim, other_report.to_dict()))

CLI: ``python -m stadi_core simulate --curves curves.json --height 256 --steps 20 --equal``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import PlanError
from .parallel.options import ContextOptions
from .cost_model import (ExchangeCost, LinkModel, gather_seconds, group_exchange_seconds, output_seconds,
                         plan_exchange_seconds, sync_call_seconds, unit_compute_s)
from .planner import Plan, make_plan
from .report import idle_pct

__all__ = [
    "Curve", "LinkModel", "SimStep", "SimRank", "SimResult", "CurveSet",
    "load_curves", "simulate", "plan_from_curves", "curve_speeds", "exchange_seconds",
    "fit_curve_from_report", "fit_costs_from_report", "compare", "compare_strategies", "strategies_table", "DISPLACED_EXCHANGES",
]

DISPLACED_EXCHANGES = ("deferred", "overlapped", "after_forward")
_TINY = 1e-12  # seconds: a curve that extrapolates to 0 still gives a finite planning speed


# --------------------------------------------------------------------------------------
# cost model pieces
class Curve:
    """Seconds of one band evaluation as a function of band rows (piecewise linear)."""

    def __init__(self, points: Iterable[Sequence[float]]):
        merged: dict[float, list[float]] = {}
        for p in points:
            try:
                r, s = float(p[0]), float(p[1])
            except (TypeError, ValueError, IndexError) as e:
                raise PlanError(f"curve point {p!r} is not a [rows, seconds] pair") from e
            if not (math.isfinite(r) and math.isfinite(s)) or r <= 0 or s < 0:
                raise PlanError(f"curve point {p!r}: rows must be > 0 and seconds >= 0")
            merged.setdefault(r, []).append(s)
        if not merged:
            raise PlanError("a curve needs at least one [rows, seconds] point")
        self.points: tuple[tuple[float, float], ...] = tuple(
            (r, sum(v) / len(v)) for r, v in sorted(merged.items()))

    def __call__(self, rows: float) -> float:
        pts = self.points
        if len(pts) == 1:
            r0, s0 = pts[0]
            return max(0.0, s0 * rows / r0)
        if rows <= pts[0][0]:
            (r0, s0), (r1, s1) = pts[0], pts[1]
        elif rows >= pts[-1][0]:
            (r0, s0), (r1, s1) = pts[-2], pts[-1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= rows)
            (r0, s0), (r1, s1) = pts[i - 1], pts[i]
        return max(0.0, s0 + (s1 - s0) * (rows - r0) / (r1 - r0))

    def speed(self, rows: float) -> float:
        """Rows per second at this band size (the planner's capability)."""
        return rows / max(self(rows), _TINY)

    def to_list(self) -> list[list[float]]:
        return [[r, s] for r, s in self.points]

    def __repr__(self) -> str:
        return f"Curve({self.to_list()})"


def _as_curve(c: Curve | Iterable[Sequence[float]]) -> Curve:
    return c if isinstance(c, Curve) else Curve(c)


def exchange_seconds(rows: Sequence[int], link: LinkModel, *, bytes_per_row: float = 0.0, bytes_fixed: float = 0.0,
                     bytes_table: Curve | Iterable[Sequence[float]] | None = None, messages: int = 1,
                     padded: bool = True) -> float:
    """Seconds of one sync step's all-gathers (all layers of one call), as the collective sees it."""
    p = len(rows)
    if p < 2:
        return 0.0
    link._check(p)
    if bytes_table is not None:
        table = _as_curve(bytes_table)
        payload = [table(r) for r in rows]
    else:
        payload = [bytes_fixed + bytes_per_row * r for r in rows]
    return gather_seconds(payload, link, messages=messages, padded=padded)




# --------------------------------------------------------------------------------------
# results
@dataclass
class SimStep:
    """One rank's base step, laid out like the engine's StepTiming (plus start/idle)."""

    step: int
    computed: bool
    phase: str  # fresh | refresh | stale | skip
    start_s: float
    busy_s: float
    comm_s: float  # exposed transfer time (not hidden behind compute)
    idle_s: float  # waiting for other ranks, plus the per-step overhead
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SimRank:
    rank: int
    device: str
    rows: int
    stride: int
    evals: int
    busy_s: float
    comm_s: float
    idle_s: float
    wall_s: float  # when this rank's loop ends

    @property
    def idle_pct(self) -> float:
        """Share of the rank's loop not computing (as RankSummary.idle_pct: comm counts as idle)."""
        return idle_pct(self.busy_s, self.wall_s)


@dataclass
class SimResult:
    plan: Plan
    latency_s: float  # makespan: when the last rank finishes
    ranks: list[SimRank]
    steps: list[list[SimStep]]  # per rank, per base step
    exchange_s: float  # modelled seconds of one synchronous sync step's exchange (warmup, exact)
    notes: list[str] = field(default_factory=list)
    displaced_exchange_s: float = 0.0  # ... of one displaced sync step's (the plan's context)

    @property
    def denoise_s(self) -> float:  # the name RunReport uses for the same quantity
        return self.latency_s

    def to_dict(self) -> dict:
        """RunReport.to_dict()'s layout (fit_curve_from_report reads it back)."""
        return {
            "plan": self.plan.to_dict(), "predicted": True, "wall_s": self.latency_s, "denoise_s": self.latency_s,
            "exchange_s": self.exchange_s, "notes": list(self.notes), "slowdowns": [],
            "ranks": [dict(asdict(r), idle_pct=r.idle_pct) for r in self.ranks],
            "steps": [[s.to_dict() for s in rank] for rank in self.steps],
        }

    def table(self) -> str:
        lines = [f"{'rank':>4} {'device':<8} {'rows':>5} {'stride':>6} {'evals':>5} {'busy s':>8} "
                 f"{'comm s':>8} {'wait s':>8} {'idle %':>7}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4} {r.device:<8} {r.rows:>5} {r.stride:>6} {r.evals:>5} {r.busy_s:>8.3f} "
                         f"{r.comm_s:>8.3f} {r.idle_s:>8.3f} {r.idle_pct:>7.1f}")
        lines.append(f"predicted denoising {self.latency_s:.3f} s (makespan); exchange {self.exchange_s * 1e3:.2f} ms "
                     f"per sync step")
        lines.append("idle % = share of the rank's loop not computing (exposed comm + waits), as in the run report")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def timeline(self) -> str:
        """Per-step start/end of every rank (seconds from the start of denoising)."""
        head = f"{'step':>4} " + " ".join(f"{'r%d %s' % (r.rank, r.device):>22}" for r in self.ranks)
        lines = [head]
        for t in range(self.plan.steps):
            cells = []
            for rank in self.steps:
                s = rank[t]
                cells.append(f"{s.phase[:7]:>7} {s.start_s:>6.3f}-{s.start_s + s.wall_s:<7.3f}")
            lines.append(f"{t:>4} " + " ".join(f"{c:>22}" for c in cells))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the simulation
def _curve_for(curves: Mapping[str, Any], device: str) -> Curve:
    if device in curves:
        return _as_curve(curves[device])
    base = device.split("#")[0]  # "cuda:0#2": the third rank that uses the cuda:0 curve
    if base in curves:
        return _as_curve(curves[base])
    raise PlanError(f"no compute curve for device {device!r}: curves are given for {', '.join(curves) or 'none'}")


def simulate(plan: Plan, curves: Mapping[str, Any], *, link: LinkModel | None = None, bytes_per_row: float = 0.0,
             bytes_fixed: float = 0.0, bytes_table: Curve | Iterable[Sequence[float]] | None = None,
             messages: int = 1, step_overhead_s: float = 0.0, displaced_exchange: str = "deferred",
             emulated_slowdowns: Sequence[float] | None = None, exchange_s: float | None = None,
             output_bytes_per_row: float = 0.0, exchange: ExchangeCost | None = None,
             context: ContextOptions | str | None = None) -> SimResult:
    """Replay ``plan`` with per-device compute ``curves`` ({device: Curve or [(rows, s)]}).

    ``exchange_s`` overrides the byte/link model with measured seconds per sync step (every
    one). ``exchange`` replaces the byte figures (an inventory-backed one prices ``context``);
    ``context`` defaults to the exchange's, then to the plan's.
    """
    if displaced_exchange not in DISPLACED_EXCHANGES:
        raise PlanError(f"unknown displaced_exchange {displaced_exchange!r}: "
                        f"use one of {', '.join(DISPLACED_EXCHANGES)}")
    deferred_mode = displaced_exchange == "deferred"
    if step_overhead_s < 0 or messages < 0:
        raise PlanError("step_overhead_s and messages must be >= 0")
    link = link or LinkModel()
    p = plan.world_size
    if exchange is not None and (bytes_per_row or bytes_fixed or output_bytes_per_row or bytes_table is not None):
        raise PlanError("give either exchange= or the byte figures (bytes_per_row, bytes_fixed, ...), not both")
    cost = exchange or ExchangeCost(bytes_per_row, bytes_fixed, messages, output_bytes_per_row)
    opts = (ContextOptions.parse(context) if isinstance(context, str)
            else ContextOptions.from_dict(context) if context is not None else cost.options_for(plan))
    if plan.splits_branches:
        comp = [unit_compute_s(plan, b.rank, lambda r, rows: _curve_for(curves, plan.bands[r].device)(rows))
                for b in plan.bands]
    else:
        comp = [_curve_for(curves, b.device)(b.rows) for b in plan.bands]
    slow = [1.0] * p if emulated_slowdowns is None else [max(1.0, float(s)) for s in emulated_slowdowns]
    if len(slow) != p:
        raise PlanError(f"{len(slow)} emulated slowdowns for {p} ranks: give one per rank")
    real = [c / s for c, s in zip(comp, slow)]  # the part other ranks' collectives wait for
    pad = [c - r for c, r in zip(comp, real)]
    real_s = lambda r, rows: _curve_for(curves, plan.bands[r].device)(rows) / slow[r]  # noqa: E731
    out_s = 0.0
    if exchange_s is not None:
        x = x_disp = 0.0 if p < 2 else float(exchange_s)
        sync_span = disp_span = max(real) + x
    elif plan.splits_branches or cost.inventory is not None:
        if bytes_table is not None:
            raise PlanError("a bytes table cannot be used for a branch arrangement: give bytes_per_row/bytes_fixed")
        link._check(p)
        out_s = output_seconds(plan, link, cost)  # every rank needs the whole output before its step
        x, x_disp = max(plan_exchange_seconds(plan, link, cost)), max(plan_exchange_seconds(plan, link, cost, opts))
        # a synchronous call runs each branch group in lockstep (cost_model.sync_call_seconds)
        sync_span = sync_call_seconds(plan, real_s, group_exchange_seconds(plan, link, cost)) + out_s
        disp_span = sync_call_seconds(plan, real_s, group_exchange_seconds(plan, link, cost, opts)) + out_s
    else:
        x = x_disp = exchange_seconds(plan.rows, link, bytes_per_row=bytes_per_row, bytes_fixed=bytes_fixed,
                                      bytes_table=bytes_table, messages=messages)
        sync_span = disp_span = max(real) + x
    o = float(step_overhead_s)
    exact = plan.mode == "exact"
    after_own_forward = deferred_mode and not opts.overlap  # the engine's end_call launch

    ready = [0.0] * p
    # displaced deferred: the last async exchange is complete at pending_done; of the wait for it,
    # the part after the slowest rank's data was posted (pending_posted) is transfer time (comm)
    pending_done: float | None = None
    pending_posted = 0.0
    timeline: list[list[SimStep]] = [[] for _ in range(p)]
    for t in range(plan.steps):
        if plan.is_sync_step(t):
            fresh = exact or t < plan.warmup
            arrive = list(ready)
            start = max(arrive)
            deferred = 0.0
            if pending_done is not None:
                deferred = max(0.0, pending_done - max(start, pending_posted))
                start = max(start, pending_done)  # the previous sync's gathers must be in
            pending_done = None
            if fresh or displaced_exchange == "after_forward":
                # every layer's exchange blocks in lockstep (or all of them run after the forward)
                done = start + (sync_span if fresh else disp_span)
                for i in range(p):
                    end = done + pad[i] + o
                    _add(timeline[i], t, True, "fresh" if fresh else "refresh", arrive[i], end, comp[i],
                         (x if fresh else x_disp) + deferred)
                    ready[i] = end
            else:
                posted = start + max(real)  # the slowest rank has sent its last layer's data
                # ... and every rank has received everything (overlap off: sent only after the forward)
                done = posted + x_disp if after_own_forward else start + max(max(real), x_disp)
                for i in range(p):
                    if displaced_exchange == "overlapped":
                        end = max(start + real[i], done) + pad[i] + o
                        _add(timeline[i], t, True, "refresh", arrive[i], end, comp[i], max(0.0, x_disp - real[i]))
                    elif plan.splits_branches:  # the output all-reduce ends every call together
                        end = start + max(comp) + out_s + o
                        _add(timeline[i], t, True, "refresh", arrive[i], end, comp[i], deferred + out_s)
                    else:
                        end = start + comp[i] + o
                        _add(timeline[i], t, True, "refresh", arrive[i], end, comp[i], deferred)
                    ready[i] = end
                if deferred_mode:
                    pending_done, pending_posted = done, posted
        else:
            for i in range(p):
                if plan.is_compute_step(i, t):
                    end = ready[i] + comp[i] + o
                    _add(timeline[i], t, True, "stale", ready[i], end, comp[i], 0.0)
                else:
                    end = ready[i] + o
                    _add(timeline[i], t, False, "skip", ready[i], end, 0.0, 0.0)
                ready[i] = end
    if pending_done is not None and pending_done > min(ready):
        # the run ends when the last sync step's exchange is in (the engine waits for it)
        deferred = max(0.0, pending_done - max(max(ready), pending_posted))
        for i in range(p):
            if ready[i] < pending_done:
                last = timeline[i][-1]
                extra = pending_done - ready[i]
                moved = min(deferred, extra)
                last.comm_s += moved
                last.idle_s += extra - moved
                last.wall_s += extra
                ready[i] = pending_done

    ranks = []
    for b, steps in zip(plan.bands, timeline):
        ranks.append(SimRank(rank=b.rank, device=b.device, rows=b.rows, stride=b.stride,
                             evals=sum(s.computed for s in steps), busy_s=sum(s.busy_s for s in steps),
                             comm_s=sum(s.comm_s for s in steps), idle_s=sum(s.idle_s for s in steps),
                             wall_s=max(ready[b.rank], 0.0)))
    notes = list(plan.notes)
    if emulated_slowdowns is not None and any(s > 1 for s in slow):
        notes.append("emulated slowdowns modelled (pad after the call): " +
                     ", ".join(f"{b.device} x{s:g}" for b, s in zip(plan.bands, slow)))
    if plan.mode == "displaced" and plan.sync_period > 1 and not deferred_mode:
        notes.append(f"{displaced_exchange} exchange: faster ranks wait for the slowest at the end of every sync "
                     "step, so strides gain less than with a deferred exchange")
    if plan.mode == "displaced" and p > 1 and exchange_s is None and (cost.inventory or not opts.is_default):
        priced = cost.inventory is not None or (not opts.partial and not opts.compressed)
        notes.append(f"displaced context {opts.label()}: {x_disp * 1e3:.2f} ms per sync step after warmup"
                     + ("" if priced else " (priced as full raw: plain byte figures have no layer inventory)"))
    return SimResult(plan=plan, latency_s=max(ready), ranks=ranks, steps=timeline, exchange_s=x, notes=notes,
                     displaced_exchange_s=x if exact else x_disp)


def _add(steps: list[SimStep], t: int, computed: bool, phase: str, start: float, end: float, busy: float,
         comm: float) -> None:
    wall = end - start
    comm = min(comm, max(0.0, wall - busy))
    steps.append(SimStep(t, computed, phase, start, busy, comm, max(0.0, wall - busy - comm), wall))


# --------------------------------------------------------------------------------------
# curves in and out
@dataclass
class CurveSet:
    """What a curves file holds: per-device curves plus optional exchange and link figures."""

    curves: dict[str, Curve]
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    illustrative: bool = False
    exchange: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def load_curves(source: str | Path | Mapping[str, Any]) -> CurveSet:
    """Read a curves file (format: module docstring) or an equivalent dict."""
    if isinstance(source, (str, Path)):
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read curves file {source}: {e}") from e
    else:
        data = dict(source)
    devices = data.get("devices") if isinstance(data.get("devices"), Mapping) else None
    if devices is None:  # bare {device: points}
        devices = {k: v for k, v in data.items() if isinstance(v, (list, tuple))}
    if not devices:
        raise PlanError("curves file has no devices: give {\"devices\": {\"NAME\": [[rows, seconds], ...]}}")
    curves, labels = {}, {}
    for name, entry in devices.items():
        if isinstance(entry, Mapping):
            if "label" in entry:
                labels[name] = str(entry["label"])
            entry = entry.get("points", [])
        try:
            curves[name] = Curve(entry)
        except PlanError as e:
            raise PlanError(f"device {name}: {e}") from e
    meta = {k: v for k, v in data.items() if k not in ("devices", "exchange", "links", "description", "illustrative")
            and not isinstance(v, (list, tuple))}
    return CurveSet(curves=curves, labels=labels, description=str(data.get("description", "")),
                    illustrative=bool(data.get("illustrative", False)), exchange=dict(data.get("exchange", {}) or {}),
                    links=dict(data.get("links", {}) or {}), meta=meta)


def fit_curve_from_report(report: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Any,
                          *, drop_first: bool = True) -> dict[str, list[tuple[float, float]]]:
    """{device: [(rows, seconds_per_eval)]} from measured runs (RunReport.to_dict() or a list of them).

    Seconds per eval = mean ``busy_s`` of the rank's computed steps, the first evaluation
    dropped (allocation, caches). Each run gives one point per device (its band size);
    several runs give several points (the same rows are averaged by Curve).
    """
    reports = report if isinstance(report, (list, tuple)) else [report]
    out: dict[str, list[tuple[float, float]]] = {}
    for rep in reports:
        rep = rep.to_dict() if hasattr(rep, "to_dict") else rep
        try:
            ranks, steps = rep["ranks"], rep["steps"]
        except (KeyError, TypeError) as e:
            raise PlanError(f"not a run report (needs 'ranks' and 'steps'): {e}") from e
        for rank, rank_steps in zip(ranks, steps):
            busy = [float(s["busy_s"]) for s in rank_steps if s["computed"]]
            if drop_first and len(busy) > 1:
                busy = busy[1:]
            if busy:
                out.setdefault(rank["device"], []).append((float(rank["rows"]), sum(busy) / len(busy)))
    if not out:
        raise PlanError("the report has no computed steps to fit a curve from")
    return {d: sorted(pts) for d, pts in out.items()}


def fit_costs_from_report(report: Mapping[str, Any] | Any) -> dict[str, float]:
    """Exchange seconds per synchronous step and host overhead per step, from a measured run.

    ``exchange_s``: median over the synchronous steps (warmup, or every step in exact mode;
    the first step left out) of the smallest ``comm_s`` of any rank: the rank the others
    wait for spends only the exchange itself blocked. ``step_overhead_s``: median over steps
    of the smallest ``wall_s - busy_s - comm_s`` (solver, messaging; the last rank to arrive
    does not wait). Feed both to :func:`simulate` (``exchange_s=``, ``step_overhead_s=``).
    """
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    steps = rep["steps"]
    plan = rep.get("plan", {})
    exact, warmup = plan.get("mode") == "exact", int(plan.get("warmup", 0))
    n = min((len(s) for s in steps), default=0)
    fresh, over = [], []
    for t in range(n):
        at = [steps[r][t] for r in range(len(steps))]
        if all(s["computed"] for s in at) and (exact or t < warmup):
            fresh.append((t, min(float(s["comm_s"]) for s in at)))
        if t > 0:
            over.append(min(max(0.0, float(s["wall_s"]) - float(s["busy_s"]) - float(s["comm_s"])) for s in at))
    comm = [c for t, c in fresh if t > 0] or [c for _, c in fresh]
    return {"exchange_s": _median(comm) if len(steps) > 1 else 0.0, "step_overhead_s": _median(over)}


def _median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def compare(sim: SimResult, report: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Prediction vs a measured run: relative error of the makespan (and of the whole call).

    ``measured_s`` is the run's denoising makespan (``denoise_s``: what the simulator models);
    ``measured_wall_s`` the coordinator's whole call, which adds dispatch and any model load.
    """
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    measured = float(rep.get("denoise_s") or max(r["wall_s"] for r in rep["ranks"]))
    wall = float(rep.get("wall_s", measured))
    pred = sim.latency_s
    ranks = []
    for s, m in zip(sim.ranks, rep["ranks"]):
        ranks.append({"rank": s.rank, "device": s.device, "predicted_busy_s": s.busy_s, "measured_busy_s": m["busy_s"],
                      "predicted_wall_s": s.wall_s, "measured_wall_s": m["wall_s"]})
    return {"predicted_s": pred, "measured_s": measured, "rel_error": (pred - measured) / measured,
            "measured_wall_s": wall, "rel_error_wall": (pred - wall) / wall, "ranks": ranks}


# --------------------------------------------------------------------------------------
# planning from curves, and the equal / elastic / elastic+strides comparison
def curve_speeds(curves: Mapping[str, Any], devices: Sequence[str], rows: Sequence[float]) -> list[float]:
    """Planning speeds (rows/s) of each device at the given band sizes."""
    return [_curve_for(curves, d).speed(r) for d, r in zip(devices, rows)]


def plan_from_curves(curves: Mapping[str, Any], height: int, *, devices: Sequence[str] | None = None,
                     speeds: Sequence[float] | None = None, align: int = 8, steps: int, warmup: int = 2,
                     mode: str = "displaced", strides: str | Sequence[int] = "auto", sampler: str = "euler",
                     max_stride: int = 4, iterations: int = 4) -> Plan:
    """make_plan with speeds read off the curves at the band sizes they lead to.

    Band cost is not proportional to rows, so the speed at an equal share is only a first
    guess: re-plan with the speeds at the planned rows (as the engine re-plans from measured
    band times) and keep the plan with the smallest compute makespan per base step.
    """
    devices = list(devices) if devices is not None else list(curves)
    kw = dict(devices=devices, align=align, steps=steps, warmup=warmup, mode=mode, strides=strides,
              sampler=sampler, max_stride=max_stride)
    if speeds is not None:
        return make_plan(height, speeds, **kw)
    cur = curve_speeds(curves, devices, [height / len(devices)] * len(devices))
    best, best_t, seen = None, math.inf, set()
    for _ in range(max(1, iterations)):
        plan = make_plan(height, cur, **kw)
        if plan.rows + plan.strides in seen:
            break
        seen.add(plan.rows + plan.strides)
        t = max(_curve_for(curves, b.device)(b.rows) / b.stride for b in plan.bands)
        if t < best_t - 1e-15:
            best, best_t = plan, t
        if len(plan.bands) != len(devices):
            break  # a device was dropped; its speed has no band size to be read at
        cur = curve_speeds(curves, devices, plan.rows)
    return best


def compare_strategies(curves: Mapping[str, Any], height: int, *, devices: Sequence[str] | None = None,
                       speeds: Sequence[float] | None = None, align: int = 8, steps: int, warmup: int = 2,
                       mode: str = "displaced", strides: str | Sequence[int] = "auto", sampler: str = "euler",
                       max_stride: int = 4, **sim_kw: Any) -> list[tuple[str, Plan, SimResult]]:
    """Single fastest device, equal bands, elastic bands, elastic + strides: predicted on one cluster."""
    devices = list(devices) if devices is not None else list(curves)
    kw = dict(align=align, steps=steps, warmup=warmup, mode=mode, sampler=sampler, max_stride=max_stride)
    out = []
    single_t = [_curve_for(curves, d)(height) for d in devices]
    fastest = devices[single_t.index(min(single_t))]
    one = make_plan(height, [1.0], devices=[fastest], **kw)
    out.append((f"single {fastest}", one, simulate(one, curves, **sim_kw)))
    equal = make_plan(height, [1.0] * len(devices), devices=devices, strides="off", **kw)
    out.append(("equal bands", equal, simulate(equal, curves, **sim_kw)))
    elastic = plan_from_curves(curves, height, devices=devices, speeds=speeds, strides="off", **kw)
    out.append(("elastic bands", elastic, simulate(elastic, curves, **sim_kw)))
    if mode != "exact" and strides != "off":
        strided = plan_from_curves(curves, height, devices=devices, speeds=speeds, strides=strides, **kw)
        out.append(("elastic + strides", strided, simulate(strided, curves, **sim_kw)))
    return out


def strategies_table(rows: list[tuple[str, Plan, SimResult]]) -> str:
    equal = next((r.latency_s for n, _, r in rows if n == "equal bands"), rows[0][2].latency_s)
    single = rows[0][2].latency_s
    lines = [f"{'configuration':<22} {'rows':>15} {'strides':>9} {'latency s':>10} {'vs equal':>9} "
             f"{'speedup':>8} {'max idle%':>9} {'comm s':>8}"]
    for name, plan, res in rows:
        lines.append(f"{name:<22} {'/'.join(map(str, plan.rows)):>15} {','.join(map(str, plan.strides)):>9} "
                     f"{res.latency_s:>10.3f} {res.latency_s / equal:>9.2f} {single / res.latency_s:>8.2f} "
                     f"{max(r.idle_pct for r in res.ranks):>9.1f} {max(r.comm_s for r in res.ranks):>8.3f}")
    lines.append("vs equal = latency / equal bands; speedup = single fastest device / latency (predicted, not measured)")
    return "\n".join(lines)
