"""The planner's choice of arrangement: one device, bands, or a CFG-branch split (DESIGN §4).

Every candidate is priced by the same cost model the simulator uses (cost_model.py) from the
devices' speeds, the exchange bytes and the link between each pair of devices, and ``auto``
takes the cheapest. The fastest device alone is always a candidate and wins ties, so ``auto``
never picks a split it predicts slower than one device. Branch splits need CFG > 1 with a
separate uncond pass; otherwise only one device or bands are considered.

``context="auto"`` (displaced mode) also prices each arrangement under the light context options
(``AUTO_CONTEXTS``: partial, FP8, delta; DESIGN §4 "Related techniques") and keeps the cheapest,
but the most faithful one whenever it is within ``CONTEXT_TIE`` of the cheapest: a lighter context
costs quality (staleness drops rows, quantisation adds error) that the cost model cannot see, so
it must buy a real speedup. Pricing light contexts needs the exchange's layer inventory
(``ExchangeCost.for_context``); plain bytes price them all as full, so ``auto`` keeps full.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from .cost_model import ExchangeCost, LinkModel, predict_step
from .errors import PlanError, UnsupportedError
from .parallel.options import ContextOptions
from .planner import Plan, make_branch_plan, make_plan
from .work_units import STRATEGIES

__all__ = ["Candidate", "Choice", "choose_plan", "host_shared_speeds", "CPU_PAIR_EFFICIENCY", "link_for",
           "AUTO_CONTEXTS", "CONTEXT_TIE"]

# Two single-thread CPU processes on one host each run at about this share of one alone
# (shared memory bandwidth and caches; measured on the 2-core CI machine, and printed by
# `python -m stadi_core bench-units` as the pair baseline).
CPU_PAIR_EFFICIENCY = 0.76
BRANCH_STRATEGIES = ("cfg_split", "cfg_split+bands")
# Speeds that are not rows/s (manual relative speeds, defaults) cannot be set against link
# seconds: then only compute is priced.
COMPUTE_ONLY = LinkModel(bandwidth_gbps=1e12, latency_s=0.0)
# What context="auto" tries, most faithful first (an assumption until bench-quality measures each:
# per-channel FP8 and error-fed deltas keep every band's context approximately, partial drops rows).
AUTO_CONTEXTS = (
    ContextOptions(),
    ContextOptions(exchange="fp8"),
    ContextOptions(exchange="delta", delta_bits=4),
    ContextOptions(context="partial", portion=0.3),
    ContextOptions(context="partial", portion=0.3, exchange="delta", delta_bits=4),
)
CONTEXT_TIE = 0.02  # a lighter context must be predicted more than 2 % faster than a more faithful one


@dataclass(frozen=True)
class Candidate:
    name: str  # "single cpu:0", "bands", "cfg_split", "cfg_split+bands"
    plan: Plan
    predicted_s: float  # per base step (seconds when speeds are rows/s)
    contexts: tuple[tuple[str, float], ...] = ()  # context="auto": (option label, predicted_s) of each tried


@dataclass(frozen=True)
class Choice:
    plan: Plan  # the chosen plan; its notes say what was chosen and why
    candidates: tuple[Candidate, ...]

    def table(self) -> str:
        best = self.candidates[0].predicted_s
        single = next((c.predicted_s for c in self.candidates if c.name.startswith("single")), best)
        lines = [f"{'arrangement':<20} {'predicted/step':>14} {'vs single':>9}  chosen"]
        for c in self.candidates:
            mark = "<-" if c.plan is self.plan or c.plan == self.plan else ""
            ctx = "" if c.plan.context.is_default else f"  context {c.plan.context.label()}"
            lines.append(f"{c.name:<20} {c.predicted_s:>14.4g} {c.predicted_s / single:>9.2f}  {mark}{ctx}")
        return "\n".join(lines)


def host_shared_speeds(devices: Sequence[str], speeds: Sequence[float], *, cpu_count: int,
                       efficiency: float = CPU_PAIR_EFFICIENCY) -> tuple[list[float], list[float]]:
    """(speeds while all run together, speeds of each device alone) for CPU workers sharing a host.

    A pool of n CPU workers gives each cpu_count // n threads, and n busy processes slow each
    other down (``efficiency``); one CPU worker alone would get all the cores (intra-op
    threads scale about linearly on large convs). GPUs are independent: both lists equal.
    """
    cpus = [i for i, d in enumerate(devices) if d.startswith("cpu")]
    together, alone = [float(s) for s in speeds], [float(s) for s in speeds]
    if len(cpus) >= 2:
        threads = max(1, cpu_count // len(cpus))
        for i in cpus:
            together[i] = speeds[i] * efficiency
            alone[i] = speeds[i] * max(1, cpu_count) / threads
    return together, alone


def link_for(link: LinkModel, devices: Sequence[str], plan: Plan) -> LinkModel:
    """``link`` (matrices in ``devices`` order) re-indexed to the plan's band order."""
    if link.bandwidth_matrix is None and link.latency_matrix is None:
        return link
    idx = [list(devices).index(b.device) for b in plan.bands]
    pick = lambda m: None if m is None else tuple(tuple(m[i][j] for j in idx) for i in idx)  # noqa: E731
    return replace(link, bandwidth_matrix=pick(link.bandwidth_matrix), latency_matrix=pick(link.latency_matrix))


def _locality_groups(devices: Sequence[str], speeds: Sequence[float], link: LinkModel) -> list[list[int]]:
    """Devices grouped by fast links (machines: bandwidth >= half the best), fastest first inside each."""
    n = len(devices)
    if link.bandwidth_matrix is None:
        return [sorted(range(n), key=lambda i: (-speeds[i], i))]
    top = max(link.bandwidth(i, j) for i in range(n) for j in range(n) if i != j)
    comp = list(range(n))
    for i in range(n):
        for j in range(n):
            if i != j and link.bandwidth(i, j) >= 0.5 * top:
                a, b = comp[i], comp[j]
                comp = [a if c == b else c for c in comp]
    firsts = sorted(set(comp), key=comp.index)
    return [sorted((k for k in range(n) if comp[k] == c), key=lambda k: (-speeds[k], k)) for c in firsts]


def _locality_order(devices: Sequence[str], speeds: Sequence[float], link: LinkModel) -> list[int]:
    return [i for g in _locality_groups(devices, speeds, link) for i in g]


def choose_plan(height: int, speeds: Sequence[float], *, devices: Sequence[str], strategy: str = "auto",
                branches: bool = True, alone_speeds: Sequence[float] | None = None, link: LinkModel | None = None,
                exchange: ExchangeCost | None = None, compute_s: Callable[[str, float], float] | None = None,
                align: int = 8, steps: int, warmup: int = 2, mode: str = "displaced",
                strides: str | Sequence[int] = "auto", sampler: str = "euler", max_stride: int = 4,
                ragged: bool = False, context: str | ContextOptions | None = None) -> Choice:
    """Price every arrangement ``strategy`` allows and return the cheapest, cheapest first.

    ``branches``: the run has two CFG branches the network evaluates separately (CFG > 1,
    not Flux-style guidance). ``compute_s(device, rows)``: seconds of one call on a band of
    ``rows`` rows of both branches; by default rows / speed. ``alone_speeds``: speeds when a
    device runs alone (host_shared_speeds), for the one-device candidate. ``context``: None (full,
    the default), a ``ContextOptions`` (or its string form) for every split, or ``"auto"`` (module
    docstring); exact mode always exchanges full context.
    """
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    devices, speeds = list(devices), [float(s) for s in speeds]
    if len(devices) != len(speeds):
        raise PlanError(f"{len(devices)} device names for {len(speeds)} speeds: give one speed per device")
    if strategy in BRANCH_STRATEGIES and not branches:
        raise UnsupportedError(f"strategy {strategy} splits the CFG branches, but this run has none to split (CFG is "
                               "1, or the model takes guidance as an input, as Flux does): use strategy bands or auto")
    if strategy in BRANCH_STRATEGIES and len(devices) < 2:
        raise PlanError(f"strategy {strategy} needs at least 2 devices (one per CFG branch): add a device or use auto")
    by_name = dict(zip(devices, speeds))
    alone = dict(zip(devices, alone_speeds if alone_speeds is not None else speeds))
    compute = compute_s or (lambda d, rows: rows / by_name[d])
    link, exchange = link or COMPUTE_ONLY, exchange or ExchangeCost()
    common = dict(align=align, steps=steps, warmup=warmup, mode=mode, sampler=sampler, ragged=ragged)
    if exchange.context is not None:  # priced through the plans' own context, so auto can vary it
        context, exchange = (exchange.context if context is None else context), replace(exchange, context=None)
    options = _context_options(context, mode)

    def price(plan: Plan, costs: Callable[[str, float], float] = compute) -> float:
        return predict_step(plan, lambda r, rows: costs(plan.bands[r].device, rows),
                            link=link_for(link, devices, plan), cost=exchange).seconds

    def candidate(name: str, plan: Plan) -> Candidate:
        """The arrangement priced under each context option; the most faithful near the cheapest."""
        if len(options) == 1:
            plan = plan if options[0].is_default else replace(plan, context=options[0])
            return Candidate(name, plan, price(plan))
        priced = [(o, p, price(p)) for o in options for p in [plan if o.is_default else replace(plan, context=o)]]
        low = min(t for _, _, t in priced)
        opts, best, t = next(x for x in priced if x[2] <= low * (1 + CONTEXT_TIE))
        others = ", ".join(f"{o.label()} {u:.4g}" for o, _, u in priced if o is not opts)
        note = f"context auto: {opts.label()}, predicted {t:.4g} per step (vs {others})"
        return Candidate(name, replace(best, notes=best.notes + (note,)), t,
                         tuple((o.label(), u) for o, _, u in priced))

    cands: list[Candidate] = []
    if strategy == "auto" or len(devices) == 1:
        fastest = max(devices, key=lambda d: (alone[d], -devices.index(d)))
        one = make_plan(height, [alone[fastest]], devices=[fastest], strides="off", **common)
        alone_cost = (lambda d, rows: rows / alone[d]) if compute_s is None or alone_speeds is not None else compute
        cands.append(Candidate(f"single {fastest}", one, price(one, alone_cost)))
    if len(devices) > 1:
        if strategy in ("auto", "cfg_split") and branches:
            plan = make_branch_plan(height, speeds, strategy="cfg_split", devices=devices, **common)
            cands.append(candidate("cfg_split", plan))
        if strategy in ("auto", "cfg_split+bands") and branches:
            best = None
            for order in (list(range(len(devices))), _locality_order(devices, speeds, link)):
                plan = make_branch_plan(height, [speeds[i] for i in order], strategy="cfg_split+bands",
                                        devices=[devices[i] for i in order], **common)
                c = candidate("cfg_split+bands", plan)
                if best is None or c.predicted_s < best.predicted_s * (1 - 1e-9):
                    best = c
            cands.append(best)
        if strategy in ("auto", "bands"):
            plan = make_plan(height, speeds, devices=devices, strides=strides, max_stride=max_stride, **common)
            cands.append(candidate("bands", plan))
        if strategy == "auto":  # bands inside one machine may beat bands across a slow link
            for machine in _locality_groups(devices, speeds, link):
                if 1 < len(machine) < len(devices):
                    names = [devices[i] for i in machine]
                    plan = make_plan(height, [speeds[i] for i in machine], devices=names, strides=strides,
                                     max_stride=max_stride, **common)
                    cands.append(candidate(f"bands on {'+'.join(names)}", plan))
    # ties (within 1e-6) go to the earlier candidate above: one device first, then the least communication
    low = min(c.predicted_s for c in cands)
    chosen = next(c for c in cands if c.predicted_s <= low * (1 + 1e-6))
    ranked = [chosen] + sorted((c for c in cands if c is not chosen), key=lambda c: c.predicted_s)
    others = ", ".join(f"{c.name} {c.predicted_s:.4g}" for c in ranked[1:])
    ctx = "" if chosen.plan.context.is_default else f" with context {chosen.plan.context.label()}"
    why = (f"strategy {strategy}: {chosen.name}{ctx}, predicted {chosen.predicted_s:.4g} per step"
           + (f" (vs {others})" if others else ""))
    plan = replace(chosen.plan, notes=chosen.plan.notes + (why,))
    return Choice(plan, tuple(replace(c, plan=plan) if c is chosen else c for c in ranked))


def _context_options(context: str | ContextOptions | None, mode: str) -> tuple[ContextOptions, ...]:
    """The context options to price: one given, ``AUTO_CONTEXTS`` for "auto" (displaced), full in exact."""
    if isinstance(context, str) and context.strip().lower() == "auto":
        return AUTO_CONTEXTS if mode == "displaced" else (ContextOptions(),)
    opts = ContextOptions.parse(context) if isinstance(context, str) else ContextOptions.from_dict(context)
    if mode == "exact" and not opts.is_default:
        raise PlanError(f"context '{opts.label()}' only applies to displaced mode: exact mode always exchanges every "
                        "band's full context uncompressed; use mode displaced, or context full or auto")
    return (opts,)
