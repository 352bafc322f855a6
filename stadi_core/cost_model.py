"""The cost model the planner and the simulator share: compute, exchange and link seconds.

One network call of a plan costs, per rank, its units' compute plus the context exchanges of
the groups it belongs to; a branch arrangement also all-reduces the raw network output so
every rank holds both branches (a small tensor: the latent, twice). The planner feeds it
speeds (rows/s of both CFG branches); the simulator feeds it measured curves. Exchange bytes
follow the curves files' convention: per rank per call, per latent row of BOTH branches
(a one-branch unit sends half).

Context options (``ContextOptions``: partial, fp8, delta, overlap) are priced from a layer
inventory (``ExchangeCost.for_context``; bytes by context_bytes.py): synchronous calls (exact
mode, warmup) all-gather everything raw, displaced sync calls send what the options say. A plain
bytes ``ExchangeCost`` (no inventory) cannot tell K/V from halos, so it prices every option as
full raw context; only ``overlap`` changes its timing. The encode/decode compute of the codecs
is NOT priced (small elementwise kernels next to a band's network call; ignored here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .context_bytes import Inventory, Traffic, legacy_exchange, traffic
from .errors import PlanError
from .parallel.options import ContextOptions
from .work_units import BRANCHES

__all__ = ["LinkModel", "ExchangeCost", "StepCost", "gather_seconds", "plan_exchange_seconds", "predict_step",
           "traffic_seconds"]


@dataclass(frozen=True)
class LinkModel:
    """Bandwidth (GB/s = 1e9 bytes/s) and per-message latency (s) between each pair of ranks."""

    bandwidth_gbps: float = 25.0
    latency_s: float = 20e-6
    bandwidth_matrix: tuple[tuple[float, ...], ...] | None = None  # P x P, band order; diagonal unused
    latency_matrix: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not (self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps)):
            raise PlanError(f"bandwidth {self.bandwidth_gbps!r} GB/s must be a positive number")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise PlanError(f"latency {self.latency_s!r} s must be >= 0")
        for name in ("bandwidth_matrix", "latency_matrix"):
            m = getattr(self, name)
            if m is not None:
                object.__setattr__(self, name, tuple(tuple(float(x) for x in row) for row in m))

    def _check(self, p: int) -> None:
        for name, m in (("bandwidth", self.bandwidth_matrix), ("latency", self.latency_matrix)):
            if m is not None and (len(m) != p or any(len(row) != p for row in m)):
                raise PlanError(f"the {name} matrix must be {p} x {p} (one row and column per rank, band order)")

    def bandwidth(self, src: int, dst: int) -> float:
        bw = self.bandwidth_matrix[src][dst] if self.bandwidth_matrix is not None else self.bandwidth_gbps
        if bw <= 0:
            raise PlanError(f"link {src}->{dst}: bandwidth must be positive, got {bw}")
        return bw * 1e9

    def latency(self, src: int, dst: int) -> float:
        return self.latency_matrix[src][dst] if self.latency_matrix is not None else self.latency_s

    def transfer_s(self, src: int, dst: int, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency(src, dst) + nbytes / self.bandwidth(src, dst)


def gather_seconds(payloads: Sequence[float], link: LinkModel, ranks: Sequence[int] | None = None,
                   messages: int = 1, padded: bool = True) -> float:
    """Seconds of an all-gather of ``payloads`` (bytes per member) among ``ranks`` (plan ranks).

    Member i must receive every other member's payload: X_i = sum_j (messages * latency_ji +
    payload_j / bandwidth_ji); the collective is done when the last member has its data.
    """
    ranks = list(range(len(payloads))) if ranks is None else list(ranks)
    p = len(ranks)
    if p < 2:
        return 0.0
    payloads = [max(payloads)] * p if padded else list(payloads)  # padded to the largest band, as the engine does
    per = [sum(link.transfer_s(ranks[j], ranks[i], payloads[j], messages) for j in range(p) if j != i)
           for i in range(p)]
    return max(per)


@dataclass(frozen=True)
class ExchangeCost:
    """What a network call sends: context per rank, and the raw output (per both-branch row).

    With an ``inventory`` (``for_context``) the flat figures are derived from it (full raw) and
    kept for callers that read them, while the cost model times each context option per layer
    kind; ``context`` then overrides the plan's own ``Plan.context`` (to price one plan several
    ways without re-making it)."""

    bytes_per_row: float = 0.0
    bytes_fixed: float = 0.0
    messages: int = 1  # all-gathers per call (one per patch-parallel layer): each pays the latency
    output_bytes_per_row: float = 0.0  # raw network output, both branches, per latent row
    inventory: Inventory | None = None
    width: int = 0  # latent columns (inventory pricing)
    batch: float = 2  # samples of a both-branch call (2 with CFG, 1 for Flux-style guidance)
    dtype_bytes: int = 2
    context: ContextOptions | None = None

    @classmethod
    def for_context(cls, inventory: Inventory, width: int, batch: float = 2, dtype_bytes: int = 2,
                    options: ContextOptions | str | None = None) -> "ExchangeCost":
        flat = legacy_exchange(inventory, width, batch, dtype_bytes)
        if isinstance(options, str):
            options = ContextOptions.parse(options)
        opts = None if options is None else ContextOptions.from_dict(options)
        return cls(flat["bytes_per_row"], flat["bytes_fixed"], int(flat["messages"]), flat["output_bytes_per_row"],
                   inventory, int(width), batch, dtype_bytes, opts)

    def options_for(self, plan) -> ContextOptions:
        """The context a displaced sync call of ``plan`` is priced with."""
        return self.context if self.context is not None else plan.context

    def group_traffic(self, rows, branches: int, options: ContextOptions | None) -> Traffic:
        """An inventory group's traffic; ``options`` None: a synchronous call (raw, full)."""
        return traffic(self.inventory, rows, self.width, self.batch * branches / len(BRANCHES), self.dtype_bytes,
                       options, synchronous=options is None)


def traffic_seconds(t: Traffic, link: LinkModel, ranks: Sequence[int]) -> list[float]:
    """Per member: seconds until it holds its context. All-gathered kinds finish together (when the
    last member has them, as ``gather_seconds``); point-to-point kinds when the member's own
    neighbours' rows are in. Member i receives sum_j (messages_ji x latency + bytes_ji / bandwidth)."""
    p = len(ranks)

    def recv(kinds) -> list[float]:
        return [sum(link.transfer_s(ranks[j], ranks[i], sum(t.bytes[k][j][i] for k in kinds),
                                    sum(t.messages[k][j][i] for k in kinds)) for j in range(p) if j != i)
                for i in range(p)]

    if p < 2:
        return [0.0] * p
    gathered = recv(sorted(t.gathered))
    own = recv(sorted(set(t.bytes) - t.gathered))
    return [max(gathered) + x for x in own]


def _members_seconds(plan, link: LinkModel, cost: ExchangeCost, options: ContextOptions | None) -> list[list[float]]:
    """Per unit group, per member: seconds of one call's context (options None: synchronous)."""
    out = []
    for g in plan.unit_groups:
        if len(g.ranks) < 2:
            out.append([0.0] * len(g.ranks))
        elif cost.inventory is None:
            share = len(g.branches) / len(BRANCHES)
            payloads = [(cost.bytes_fixed + cost.bytes_per_row * r) * share for r in g.rows]
            out.append([gather_seconds(payloads, link, g.ranks, cost.messages)] * len(g.ranks))
        else:
            out.append(traffic_seconds(cost.group_traffic(g.rows, len(g.branches), options), link, g.ranks))
    return out


def group_exchange_seconds(plan, link: LinkModel, cost: ExchangeCost,
                           options: ContextOptions | None = None) -> list[float]:
    """Per unit group: seconds of one call's context exchanges among its members (the slowest
    member's). ``options`` None: a synchronous call; else a displaced sync call with them."""
    return [max(xs) if xs else 0.0 for xs in _members_seconds(plan, link, cost, options)]


def plan_exchange_seconds(plan, link: LinkModel, cost: ExchangeCost,
                          options: ContextOptions | None = None) -> list[float]:
    """Per rank: seconds of one call's context exchanges (its groups, one after another); a
    collective counts its slowest member's time, a point-to-point exchange the rank's own."""
    per_rank = [0.0] * plan.world_size
    for g, xs in zip(plan.unit_groups, _members_seconds(plan, link, cost, options)):
        for r, x in zip(g.ranks, xs):
            per_rank[r] += x
    return per_rank


def output_seconds(plan, link: LinkModel, cost: ExchangeCost) -> float:
    """A branch arrangement's all-reduce of the full raw output (ring: 2 (P-1)/P of it per rank)."""
    p = plan.world_size
    if not plan.splits_branches or p < 2:
        return 0.0
    full = cost.output_bytes_per_row * plan.height
    slowest = min(link.bandwidth(i, j) for i in range(p) for j in range(p) if i != j)
    worst_latency = max(link.latency(i, j) for i in range(p) for j in range(p) if i != j)
    return 2 * (p - 1) * (full / p / slowest + worst_latency)


def unit_times(plan, compute_s: Callable[[int, float], float]) -> list[dict[int, float]]:
    """Per unit group: {member rank: seconds of its unit}; a unit costs what a both-branch band
    with as many tokens costs (rows x branches / 2), one network call each."""
    share = lambda g: len(g.branches) / len(BRANCHES)  # noqa: E731
    return [{r: compute_s(r, n * share(g)) for r, n in zip(g.ranks, g.rows)} for g in plan.unit_groups]


def unit_compute_s(plan, rank: int, compute_s: Callable[[int, float], float]) -> float:
    """A rank's compute per call: the sum of its units."""
    return sum(t.get(rank, 0.0) for t in unit_times(plan, compute_s))


def sync_call_seconds(plan, compute_s: Callable[[int, float], float], group_x: Sequence[float]) -> float:
    """One synchronous call: every layer's exchange ties a group's members together, so a group
    takes as long as its slowest member's unit plus its exchange, and a rank takes its groups
    one after another (in plan order) -- a member that arrives early waits."""
    clock = [0.0] * plan.world_size
    for g, times, x in zip(plan.unit_groups, unit_times(plan, compute_s), group_x):
        start = max(clock[r] for r in g.ranks)
        end = start + max(times.values()) + (x if len(g.ranks) > 1 else 0.0)
        for r in g.ranks:
            clock[r] = end
    return max(clock)


@dataclass(frozen=True)
class StepCost:
    """Predicted seconds of one base step of a plan, and where they go."""

    seconds: float  # per base step, averaged over the run (synchronous warmup steps included)
    sync_s: float  # one synchronous step (exact mode, warmup)
    steady_s: float  # one displaced step after warmup (amortised over strides); = sync_s in exact mode
    compute_s: tuple[float, ...]  # per rank, per base step (amortised over strides)
    exchange_s: tuple[float, ...]  # per rank, a synchronous call's exchanges
    output_s: float  # branch arrangements' output all-reduce
    displaced_exchange_s: tuple[float, ...] = ()  # per rank, a displaced sync call's exchanges (its context)


def predict_step(plan, compute_s: Callable[[int, float], float], *, link: LinkModel | None = None,
                 cost: ExchangeCost | None = None) -> StepCost:
    """Seconds per base step: ``compute_s(rank, both-branch rows)`` plus exchanges on ``link``.

    Synchronous steps (exact mode; warmup in displaced mode) run each group in lockstep and
    block on their raw full exchanges (sync_call_seconds). A displaced sync step exchanges what
    the plan's context says (``cost.options_for``), as the engine does:
    * overlap on: each layer's exchange starts as soon as the layer has computed it and is waited
      for at the next sync call's same layer, so it overlaps that call's compute and every stale
      step in between: a rank costs max(compute, exchange / L) per base step (L = sync period);
    * overlap off: the exchange starts after the forward and is waited for when the next sync
      call begins, so it hides only behind the stale steps in between: a rank's sync period costs
      max(L x compute, its call's compute + exchange); at L = 1 that is compute + exchange.
    Strides amortise both over the sync period. A plan on one device costs its compute alone.
    The codecs' encode/decode compute is not priced (module docstring).
    """
    link, cost = link or LinkModel(), cost or ExchangeCost()
    multi = plan.world_size > 1
    group_x = group_exchange_seconds(plan, link, cost) if multi else [0.0]
    exch = plan_exchange_seconds(plan, link, cost) if multi else [0.0] * plan.world_size
    out = output_seconds(plan, link, cost)
    sync = sync_call_seconds(plan, compute_s, group_x) + out
    if plan.splits_branches:
        calls = [unit_compute_s(plan, b.rank, compute_s) for b in plan.bands]
        comp = list(calls)
    else:
        calls = [compute_s(b.rank, b.rows) for b in plan.bands]
        comp = [c / b.stride for c, b in zip(calls, plan.bands)]
    if plan.mode == "exact":
        return StepCost(sync, sync, sync, tuple(comp), tuple(exch), out, tuple(exch))
    opts = cost.options_for(plan)
    disp = plan_exchange_seconds(plan, link, cost, opts) if multi else [0.0] * plan.world_size
    period = plan.sync_period
    if opts.overlap:
        steady = max(max(c, x / period) for c, x in zip(comp, disp)) + out
    else:
        steady = max(max(c, (call + x) / period) for c, call, x in zip(comp, calls, disp)) + out
    warm = min(plan.warmup, plan.steps)
    mean = (warm * sync + (plan.steps - warm) * steady) / plan.steps
    return StepCost(mean, sync, steady, tuple(comp), tuple(exch), out, tuple(disp))
