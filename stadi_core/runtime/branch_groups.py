"""One rank's CFG-branch groups for one plan: their process groups, contexts and unit calls.

Used by both job protocols of the worker (worker.py): a whole generation (GenerateJob: the
units feed the engine's sampler loop through UnitsNetwork) and a ComfyUI session (each
BandCall carries this rank's units). Each group that spans several ranks gets a
torch.distributed group of its own and a BandContext the rank's layers are switched to
(parallel/router.py) while it computes that group's unit; a group of one exchanges nothing.
"""

from __future__ import annotations

import time
from datetime import timedelta

from ..errors import UnsupportedError
from ..parallel import BandContext
from ..sampling.band_loop import require_finite
from ..sampling.unit_network import RankUnit, add_sent
from ..work_units import units_of
from .messages import BandOutput


class BranchGroups:
    """Built collectively by every rank at the start of a job (new_group is a world collective)."""

    def __init__(self, worker, plan, router):
        self.worker, self.plan, self.router = worker, plan, router
        init = worker.init
        self.rank = init.rank
        subgroups = _subgroups(worker, plan.groups)
        self.entries = []  # per group: (context key, context factory)
        for g in plan.groups:
            if len(g.ranks) > 1 and worker.transport is not None and self.rank in g.ranks:
                raise UnsupportedError("bands of one CFG branch on workers that share a GPU are not supported: use "
                                       "strategy cfg_split or bands")
            key = (g.ranks, g.rows, self.rank)
            make = (lambda g=g: BandContext(g.rows, g.ranks.index(self.rank), subgroups.get(g.ranks),
                                            timeout_s=init.timeout_s, options=plan.context))
            if self.rank in g.ranks:  # a new run: nothing of the last one in flight, same buffers if same rows
                router.activate(key, make).reset(g.rows, plan.align if plan.ragged else 0, plan.context)
                router.deactivate()
            self.entries.append((key, make))

    def routed(self, group: int, net):
        """``net`` called with the group's context active on this rank's layers."""
        key, make = self.entries[group]
        router = self.router

        def call(x, t, phase, *args):
            router.activate(key, make)
            try:
                return net(x, t, phase, *args)
            finally:
                router.deactivate()
        return call

    def rank_units(self, model, spec, conditioning: dict, slowdown: float, dtype) -> list[RankUnit]:
        """A generation's units: each with its branches' conditioning, eager (CUDA graphs are keyed
        to one context, parallel/graphs.py)."""
        torch, w = self.worker.torch, self.worker
        units = []
        for u in units_of(self.plan.groups, self.rank):
            cond = {k: torch.cat([conditioning[b][k] for b in u.branches]).to(w.device, dtype)
                    for k in conditioning["cond"]}
            units.append(RankUnit(u, self.routed(u.group, w.band_network(model, self.router, spec, cond, slowdown))))
        return units

    def combine(self, full) -> None:
        """Sum the ranks' partial raw outputs in place (each element was written by one rank)."""
        w = self.worker
        if w.group is None:
            return
        import torch.distributed as dist

        if w.init.backend == "nccl":
            dev = full.to(w.device)
            dist.all_reduce(dev, group=w.group)
            full.copy_(dev.cpu())
        else:
            dist.all_reduce(full, group=w.group)

    def call(self, msg, phase, model, spec, slowdown: float, dtype) -> BandOutput:
        """A session call's units, in group order, so a group's members reach its exchanges together."""
        torch, w = self.worker.torch, self.worker
        outs, busy, comm, sent = [], 0.0, 0.0, {}
        for unit in msg.units:
            cond = w.cond_on_device(unit.cond, dtype, unit.cond_key)
            if getattr(unit, "control", None):
                cond = w.with_control(cond, unit.control)
            net = self.routed(unit.group, w.band_network(model, self.router, spec, cond, slowdown))
            with torch.inference_mode():
                t0 = time.perf_counter()
                out, c, b = net(torch.from_numpy(unit.x), torch.from_numpy(unit.timesteps), phase, msg.slot)
                busy += time.perf_counter() - t0 - c
                comm += c
                sent = add_sent(sent, b)
            require_finite(out, msg.step, phase)
            outs.append(out.numpy())
        return BandOutput(msg.job_id, msg.call_id, self.rank, None, busy, comm, unit_outs=outs, sent=sent)


def _subgroups(worker, groups) -> dict:
    """A torch.distributed group per multi-rank branch group, made once per rank set and cached
    on the worker; every rank creates every group, members or not, in the plan's order."""
    if worker.group is None:
        return {}
    import torch.distributed as dist

    out = {}
    for g in groups:
        if len(g.ranks) > 1:
            key = tuple(sorted(g.ranks))
            if key not in worker.dist_groups:
                worker.dist_groups[key] = dist.new_group(list(key), timeout=timedelta(seconds=worker.init.timeout_s))
            out[g.ranks] = worker.dist_groups[key]
    return out
