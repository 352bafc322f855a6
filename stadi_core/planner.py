"""Who computes which rows at which steps (DESIGN.md §4).

Two knobs balance a heterogeneous cluster:
- rows (space): each rank's band of latent rows is proportional to speed * stride;
- strides (time): after warmup a slow rank evaluates the network only every k-th base step
  and reuses its last output in between, so it can keep a bigger band.
All ranks compute together at sync steps (every L = lcm(strides) steps after warmup), so
collectives only happen there. The plan is a pure value: the runtime reads it, never edits it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Mapping, Sequence

from .errors import PlanError, UnsupportedError
from .parallel.options import ContextOptions
from .work_units import BRANCHES, BranchGroup, branch_major_groups, branch_major_shares, check_groups, work_rows

__all__ = [
    "ONE_EVAL_SAMPLERS", "MODES", "Band", "Plan",
    "split_rows", "step_time", "choose_strides", "make_plan", "make_branch_plan", "replan",
]

# Samplers that evaluate the network once per step: skipping a step on a band is then the
# same as one larger step there. Others (heun, dpm_2, dpmpp_sde, ...) must use stride 1.
ONE_EVAL_SAMPLERS = frozenset({
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "ddim", "lms",
    "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "uni_pc",
    "uni_pc_bh2", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "er_sde", "gradient_estimation",
})
# dpm_fast evaluates the network 1-3 times per step (its orders), dpm_adaptive as often as its error
# control asks: neither can take strides, and dpm_adaptive's step size is an image-wide norm.
MODES = ("exact", "displaced")

# choose_strides score weights: staleness grows with L, quality cost with the share of rows
# that skip steps.
_L_PENALTY = 0.05
_STRIDE_PENALTY = 0.25


@dataclass(frozen=True)
class Band:
    """One device of the plan. Under ``bands`` its rows of both CFG branches; in a branch
    arrangement (``Plan.groups``) row_start is 0 and rows is its work in both-branch rows."""

    rank: int  # 0..P-1, top to bottom
    device: str
    row_start: int  # latent rows
    rows: int
    stride: int  # evaluates the network every `stride` base steps after warmup
    speed: float  # planning speed used (rows/second or relative)

    @property
    def row_end(self) -> int:
        return self.row_start + self.rows


@dataclass(frozen=True)
class Plan:
    height: int
    align: int
    steps: int
    warmup: int
    mode: str  # "exact" | "displaced"
    bands: tuple[Band, ...]
    sync_period: int  # L = lcm(strides); 1 in exact mode
    notes: tuple[str, ...] = ()
    # options kept so replan() can redo the same planning from measured speeds
    stride_option: str = "auto"  # "auto" | "off" | "explicit"
    sampler: str = "euler"
    max_stride: int = 4
    ragged: bool = False  # the last band may end off the alignment (the network takes any height)
    strategy: str = "bands"  # "bands" | "cfg_split" | "cfg_split+bands" (work_units.py)
    groups: tuple[BranchGroup, ...] = ()  # branch arrangements: who computes which rows of which branch
    context: ContextOptions = ContextOptions()  # how displaced calls exchange (parallel/options.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(self.bands))
        object.__setattr__(self, "context", ContextOptions.from_dict(self.context))
        if self.mode == "exact" and not self.context.is_default:
            raise PlanError(f"context '{self.context.label()}' only applies to displaced mode: exact mode always "
                            "exchanges every band's full context uncompressed; set mode to displaced or context to full")
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "groups", tuple(g if isinstance(g, BranchGroup) else BranchGroup.from_dict(g)
                                                 for g in self.groups))
        if [b.rank for b in self.bands] != list(range(len(self.bands))) or not self.bands:
            raise PlanError("malformed plan: band ranks must be 0..P-1 in order")
        if self.groups:
            check_groups(self.groups, self.height, len(self.bands))
            if any(b.stride != 1 for b in self.bands):
                raise PlanError("malformed plan: branch arrangements run every rank at stride 1")
            return
        if self.strategy != "bands":
            raise PlanError(f"malformed plan: strategy {self.strategy!r} needs its work units (groups)")
        pos = 0
        for b in self.bands:
            if b.row_start != pos or b.rows < 1 or b.stride < 1:
                raise PlanError("malformed plan: bands must tile the latent top to bottom")
            pos += b.rows
        if pos != self.height:
            raise PlanError(f"malformed plan: bands cover {pos} rows, latent has {self.height}")

    @property
    def world_size(self) -> int:
        return len(self.bands)

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(b.rows for b in self.bands)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(b.stride for b in self.bands)

    @property
    def row_starts(self) -> tuple[int, ...]:
        return tuple(b.row_start for b in self.bands)

    @property
    def speeds(self) -> tuple[float, ...]:
        return tuple(b.speed for b in self.bands)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(b.device for b in self.bands)

    @property
    def unit_groups(self) -> tuple[BranchGroup, ...]:
        """The work units: the branch groups, or under ``bands`` one group of both branches."""
        if self.groups:
            return self.groups
        return (BranchGroup(BRANCHES, tuple(range(self.world_size)), self.rows),)

    @property
    def splits_branches(self) -> bool:
        return bool(self.groups)

    def is_sync_step(self, t: int) -> bool:
        """All ranks compute and exchange context at this base step."""
        return t < self.warmup or (t - self.warmup) % self.sync_period == 0

    def is_compute_step(self, rank: int, t: int) -> bool:
        """Rank evaluates the network at base step t (else it reuses its last output)."""
        return t < self.warmup or (t - self.warmup) % self.bands[rank].stride == 0

    def compute_steps(self, rank: int) -> list[int]:
        return [t for t in range(self.steps) if self.is_compute_step(rank, t)]

    def sync_steps(self) -> list[int]:
        return [t for t in range(self.steps) if self.is_sync_step(t)]

    def predicted_step_time(self) -> float:
        """Compute-only makespan per base step: max_i rows_i / (speed_i * stride_i)."""
        if self.groups:
            return max(work_rows(self.groups, b.rank) / b.speed for b in self.bands)
        return step_time(self.rows, self.speeds, self.strides)

    def describe(self) -> str:
        head = (f"plan: {self.height} latent rows (align {self.align}), {self.steps} steps, "
                f"warmup {self.warmup}, mode {self.mode}, sync every {self.sync_period} step(s)")
        if self.mode != "exact" and not self.context.is_default:
            head += f", context {self.context.label()}"
        w = max([8] + [len(b.device) for b in self.bands])  # devices of other machines: HOST/cuda:0
        lines = [head, f"{'rank':>4}  {'device':<{w}} {'rows':>5}  {'[start,end)':<12} {'stride':>6} "
                       f"{'speed':>9} {'evals':>5}"]
        for b in self.bands:
            span = "units below" if self.groups else f"[{b.row_start},{b.row_end})"
            lines.append(f"{b.rank:>4}  {b.device:<{w}} {b.rows:>5}  {span:<12} {b.stride:>6} "
                         f"{b.speed:>9.4g} {len(self.compute_steps(b.rank)):>5}")
        if self.groups:
            lines[0] += f", strategy {self.strategy}"
            for g in self.groups:
                cut = ", ".join(f"rank {r} rows [{g.row_start(r)},{g.row_start(r) + g.rows_of(r)})" for r in g.ranks)
                lines.append(f"  branch {'+'.join(g.branches)}: {cut}")
        lines.append(f"predicted compute per step: {self.predicted_step_time():.4g} (row-time units)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height, "align": self.align, "steps": self.steps, "warmup": self.warmup,
            "mode": self.mode, "sync_period": self.sync_period, "notes": list(self.notes),
            "stride_option": self.stride_option, "sampler": self.sampler, "max_stride": self.max_stride,
            "ragged": self.ragged, "strategy": self.strategy, "groups": [g.to_dict() for g in self.groups],
            "context": self.context.to_dict(),
            "bands": [{"rank": b.rank, "device": b.device, "row_start": b.row_start, "rows": b.rows,
                       "stride": b.stride, "speed": b.speed} for b in self.bands],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        try:
            d = dict(data)
            d["bands"] = tuple(Band(**dict(b)) for b in d["bands"])
            d["notes"] = tuple(d.get("notes", ()))
            d["groups"] = tuple(BranchGroup.from_dict(g) for g in d.get("groups", ()))
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan description: {e}") from e


# --------------------------------------------------------------------------------------
def split_rows(height: int, weights: Sequence[float], align: int, ragged: bool = False) -> list[int]:
    """Rows proportional to weights, each a multiple of align, summing to height.

    Largest-remainder rounding on units of `align` rows (exact rational arithmetic, so ties
    are deterministic: the earlier rank wins). A weight whose share rounds to 0 units gets 0.
    With ``ragged`` the height need not be a multiple of align: the rows past the last whole
    unit go to the last band that has any, so every band boundary stays on the alignment
    (a network that handles any size, as ComfyUI's UNet does, then computes the same rows).
    """
    if ragged and align >= 1 and height % align:
        whole = max(1, height // align) * align
        rows = split_rows(whole, weights, align)
        last = max(i for i, r in enumerate(rows) if r)
        rows[last] += height - whole
        return rows
    if align < 1 or height % align != 0:
        raise PlanError(f"height {height} is not a multiple of the alignment {align}")
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise PlanError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    units = height // align
    # Exact integer arithmetic (scale the rational weights to integers): no float ties.
    fr = [Fraction(w) for w in weights]
    den = math.lcm(*(f.denominator for f in fr))
    ws = [f.numerator * (den // f.denominator) for f in fr]
    total = sum(ws)
    base = [units * w // total for w in ws]
    rem = [units * w % total for w in ws]
    left = units - sum(base)
    for i in sorted(range(len(ws)), key=lambda i: (-rem[i], i))[:left]:
        base[i] += 1
    return [u * align for u in base]


def step_time(rows: Sequence[int], speeds: Sequence[float], strides: Sequence[int] | None = None) -> float:
    """Predicted compute-only time per base step: max_i rows_i / (speed_i * stride_i)."""
    strides = strides or [1] * len(rows)
    return max(r / (s * k) for r, s, k in zip(rows, speeds, strides))


def _lcm(ks: Sequence[int]) -> int:
    out = 1
    for k in ks:
        out = out * k // math.gcd(out, k)
    return out


def _max_stride_for(speed: float, fastest: float, max_stride: int) -> int:
    # Half-up rounding of the speed ratio: a device only gets fewer steps if it is that much slower.
    return max(1, min(max_stride, math.floor(fastest / speed + 0.5 + 1e-9)))


def choose_strides(speeds: Sequence[float], height: int, align: int, max_stride: int = 4) -> tuple[int, ...]:
    """Search small strides minimising predicted time plus staleness and quality penalties.

    score = T * (1 + 0.05*(L-1) + 0.25 * sum_i (rows_i/height) * (1 - 1/k_i)); ties go to the
    smaller L, then the lexicographically smaller strides. The fastest device keeps stride 1.
    """
    if max_stride < 1:
        raise PlanError(f"max_stride {max_stride} must be at least 1")
    fastest = max(speeds)
    top = speeds.index(fastest)
    ranges = [range(1, 2) if i == top else range(1, _max_stride_for(s, fastest, max_stride) + 1)
              for i, s in enumerate(speeds)]
    best: tuple | None = None
    for ks in itertools.product(*ranges):
        rows = split_rows(height, [s * k for s, k in zip(speeds, ks)], align)
        L = _lcm(ks)
        t = step_time(rows, speeds, ks)
        quality = sum((r / height) * (1 - 1 / k) for r, k in zip(rows, ks))
        score = t * (1 + _L_PENALTY * (L - 1) + _STRIDE_PENALTY * quality)
        key = (round(score, 9), L, ks)
        if best is None or key < best:
            best = key
    return best[2]


def _check_options(height: int, n: int, align: int, steps: int, warmup: int, mode: str,
                   max_stride: int, ragged: bool = False) -> None:
    if steps < 1:
        raise PlanError(f"steps {steps}: a run needs at least 1 step")
    if warmup < 0:
        raise PlanError(f"warmup {warmup} is negative: use 0 or more warmup steps")
    if warmup > steps:
        raise PlanError(f"warmup {warmup} is longer than the run of {steps} steps: "
                        f"lower warmup to at most {steps}")
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "displaced" and warmup < 1:
        raise PlanError("displaced mode needs at least 1 synchronous warmup step: set warmup to 1 or more "
                        "(or use exact mode)")
    if max_stride < 1:
        raise PlanError(f"max_stride {max_stride} must be at least 1 (1 turns strides off)")
    if align < 1:
        raise PlanError(f"alignment {align} must be at least 1 row")
    if height < 1 or (height % align != 0 and not ragged):
        raise PlanError(f"latent height {height} is not a multiple of {align} rows: "
                        f"use an image height that is a multiple of {align * 8} px")
    units = max(1, height // align) if ragged else height // align
    if n < 1:
        raise PlanError("no devices to plan for: add at least one device")
    if n > units:
        raise PlanError(f"{n} devices but a {height}-row latent has only {units} bands of {align} rows: "
                        f"use at most {units} devices or a taller image")


def make_plan(height: int, speeds: Sequence[float], *, devices: Sequence[str] | None = None,
              align: int = 8, steps: int, warmup: int = 2, mode: str = "displaced",
              strides: str | Sequence[int] = "auto", sampler: str = "euler", max_stride: int = 4,
              ragged: bool = False) -> Plan:
    """Plan bands and strides for devices of the given planning speeds (band order = list order).

    ``ragged``: the network takes any height (the last band then ends off the alignment).
    """
    speeds = [float(s) for s in speeds]
    names = list(devices) if devices is not None else [f"rank{i}" for i in range(len(speeds))]
    if len(names) != len(speeds):
        raise PlanError(f"{len(names)} device names for {len(speeds)} speeds: give one speed per device")
    _check_options(height, len(speeds), align, steps, warmup, mode, max_stride, ragged)
    bad = [f"{n}={s}" for n, s in zip(names, speeds) if not math.isfinite(s) or s <= 0]
    if bad:
        raise PlanError(f"speeds must be positive: {', '.join(bad)}")

    notes: list[str] = []
    explicit: list[int] | None = None
    if isinstance(strides, str):
        if strides not in ("auto", "off"):
            raise PlanError(f"unknown strides option {strides!r}: use 'auto', 'off' or one integer per device")
        option = strides
    else:
        option, explicit = "explicit", [int(k) for k in strides]
        if len(explicit) != len(speeds):
            raise PlanError(f"{len(explicit)} strides for {len(speeds)} devices: give one stride per device")
        if any(k < 1 for k in explicit):
            raise PlanError(f"strides {tuple(explicit)}: every stride must be at least 1")
        if mode == "exact" and any(k != 1 for k in explicit):
            raise PlanError(f"exact mode computes every step on every rank: strides {tuple(explicit)} "
                            "are not allowed there; use strides 'off' or displaced mode")
        if any(k > 1 for k in explicit) and sampler not in ONE_EVAL_SAMPLERS:
            raise UnsupportedError(
                f"sampler {sampler!r} evaluates the network more than once per step, so strides > 1 "
                f"cannot be used with it: turn strides off or pick a one-evaluation sampler "
                f"({', '.join(sorted(ONE_EVAL_SAMPLERS))})")
    if option == "auto" and mode == "displaced" and sampler not in ONE_EVAL_SAMPLERS:
        notes.append(f"strides off: sampler {sampler} evaluates the network more than once per step")

    def pick(spd: list[float], expl: list[int] | None) -> list[int]:
        if expl is not None:
            return expl
        if mode == "exact" or option == "off" or sampler not in ONE_EVAL_SAMPLERS:
            return [1] * len(spd)
        return list(choose_strides(spd, max(align, height - height % align), align, max_stride))

    # Drop ranks whose share rounds to zero rows, then re-plan the rest (their strides may change).
    while True:
        ks = pick(speeds, explicit)
        rows = split_rows(height, [s * k for s, k in zip(speeds, ks)], align, ragged)
        zero = [i for i, r in enumerate(rows) if r == 0]
        if not zero:
            break
        for i in zero:
            notes.append(f"{names[i]} dropped: its share of {height} rows rounds to less than "
                         f"one {align}-row band")
        keep = [i for i in range(len(rows)) if rows[i] > 0]
        names, speeds = [names[i] for i in keep], [speeds[i] for i in keep]
        explicit = [explicit[i] for i in keep] if explicit is not None else None

    bands, start = [], 0
    for rank, (n, r, k, s) in enumerate(zip(names, rows, ks, speeds)):
        bands.append(Band(rank=rank, device=n, row_start=start, rows=r, stride=k, speed=s))
        start += r
    return Plan(height=height, align=align, steps=steps, warmup=warmup, mode=mode, bands=tuple(bands),
                sync_period=_lcm(ks), notes=tuple(notes), stride_option=option, sampler=sampler,
                max_stride=max_stride, ragged=ragged)


def make_branch_plan(height: int, speeds: Sequence[float], *, strategy: str, devices: Sequence[str] | None = None,
                     align: int = 8, steps: int, warmup: int = 2, mode: str = "displaced", sampler: str = "euler",
                     ragged: bool = False) -> Plan:
    """A plan that splits the CFG branches (work_units.py), every rank at stride 1.

    ``cfg_split``: whole branches only, on the two fastest devices (the first of them, in
    list order, takes cond). ``cfg_split+bands``: the branch-major strip cut by speed, so
    a device may hold bands of both branches (4 devices: 2 x 2; fast + slow: uneven split).
    """
    speeds = [float(s) for s in speeds]
    names = list(devices) if devices is not None else [f"rank{i}" for i in range(len(speeds))]
    if len(names) != len(speeds):
        raise PlanError(f"{len(names)} device names for {len(speeds)} speeds: give one speed per device")
    if strategy not in ("cfg_split", "cfg_split+bands"):
        raise PlanError(f"unknown branch strategy {strategy!r}: use cfg_split or cfg_split+bands")
    if len(speeds) < 2:
        raise PlanError(f"{strategy} needs at least 2 devices (one per CFG branch); use strategy bands or auto")
    _check_options(height, 1, align, steps, warmup, mode, 1, ragged)
    bad = [f"{n}={s}" for n, s in zip(names, speeds) if not math.isfinite(s) or s <= 0]
    if bad:
        raise PlanError(f"speeds must be positive: {', '.join(bad)}")
    notes: list[str] = []
    if strategy == "cfg_split" and len(speeds) > 2:
        keep = sorted(sorted(range(len(speeds)), key=lambda i: (-speeds[i], i))[:2])
        notes.append(f"cfg_split: whole branches on {names[keep[0]]} and {names[keep[1]]}; "
                     f"{', '.join(n for i, n in enumerate(names) if i not in keep)} idle (cfg_split+bands uses them)")
        names, speeds = [names[i] for i in keep], [speeds[i] for i in keep]
    while True:
        weights = [1.0, 1.0] if strategy == "cfg_split" else speeds
        shares = branch_major_shares(height, weights, align)
        zero = [i for i, r in enumerate(shares) if r == 0]
        if not zero:
            break
        notes.extend(f"{names[i]} dropped: its share rounds to less than one {align}-row band" for i in zero)
        names = [n for i, n in enumerate(names) if i not in zero]
        speeds = [v for i, v in enumerate(speeds) if i not in zero]
    groups = branch_major_groups(height, shares, align)
    bands = tuple(Band(rank=r, device=n, row_start=0, rows=max(1, round(work_rows(groups, r))), stride=1, speed=v)
                  for r, (n, v) in enumerate(zip(names, speeds)))
    return Plan(height=height, align=align, steps=steps, warmup=warmup, mode=mode, bands=bands, sync_period=1,
                notes=tuple(notes), stride_option="off", sampler=sampler, max_stride=1, ragged=ragged,
                strategy=strategy, groups=groups)


def replan(plan: Plan, seconds_per_eval: Sequence[float]) -> Plan:
    """Re-plan from measured warmup timings: speed_i = rows_i / seconds_i, same options."""
    secs = [float(s) for s in seconds_per_eval]
    if len(secs) != plan.world_size:
        raise PlanError(f"{len(secs)} timings for {plan.world_size} ranks: give one timing per rank")
    if any(not math.isfinite(s) or s <= 0 for s in secs):
        raise PlanError(f"timings must be positive seconds, got {secs}")
    speeds = [r / s for r, s in zip(plan.rows, secs)]
    strides: str | Sequence[int] = plan.strides if plan.stride_option == "explicit" else plan.stride_option
    new = make_plan(plan.height, speeds, devices=plan.devices, align=plan.align, steps=plan.steps,
                    warmup=plan.warmup, mode=plan.mode, strides=strides, sampler=plan.sampler,
                    max_stride=plan.max_stride, ragged=plan.ragged)
    notes = list(dict.fromkeys(plan.notes + new.notes + ("re-planned from measured warmup timings",)))
    return replace(new, notes=tuple(notes))
