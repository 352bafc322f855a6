"""A branch arrangement's network call on one rank: its units, then the whole output everywhere.

The sampler loop (band_loop.run_band) runs over the whole latent on every rank, exactly as
the single-device loop does. Each call, the rank evaluates its units (a whole branch, or a
band of one branch with its group's context), writes them into a zero tensor the shape of
the whole raw output [uncond; cond], and one all-reduce (sum) completes it on every rank:
every element was written by exactly one rank, and adding zeros is exact, so every rank
then steps the same full latent. Only the raw output moves: the latent twice per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..work_units import Unit

# network(x_unit, t, phase) -> (raw for the unit's batch, comm seconds, bytes sent)
UnitCall = Callable[[torch.Tensor, object, object], tuple]


@dataclass
class RankUnit:
    unit: Unit
    call: UnitCall


def add_sent(total: dict, more: dict) -> dict:
    """Bytes sent per kind of context, summed over calls."""
    return {k: total.get(k, 0) + more.get(k, 0) for k in total.keys() | more.keys()}


def branch_batch(branches: Sequence[str], batch: int) -> slice:
    """Rows of the [uncond; cond] batch a unit's branches occupy (they are consecutive)."""
    lo = 0 if branches[0] == "uncond" else batch
    return slice(lo, lo + batch * len(branches))


def _timestep_slice(t, rows: slice):
    return t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t


class UnitsNetwork:
    """Called like a band network on the whole latent's CFG batch; returns (whole raw, comm s, bytes sent)."""

    def __init__(self, units: Sequence[RankUnit], combine: Callable[[torch.Tensor], None]):
        if not units:
            raise ValueError("a rank of a branch arrangement needs at least one unit")
        self.units = list(units)
        self.combine = combine  # in place: the sum over every rank

    def __call__(self, x_in: torch.Tensor, t, phase):
        batch = x_in.shape[0] // 2
        full = None
        comm, sent = 0.0, {}
        for ru in self.units:
            u = ru.unit
            rows = branch_batch(u.branches, batch)
            out, c, b = ru.call(x_in[rows, :, u.row_start:u.row_end], _timestep_slice(t, rows), phase)
            comm += c
            sent = add_sent(sent, b)
            if full is None:
                full = out.new_zeros((2 * batch, out.shape[1]) + tuple(x_in.shape[2:]))
            full[rows, :, u.row_start:u.row_end] = out
        t0 = time.perf_counter()
        self.combine(full)
        return full, comm + time.perf_counter() - t0, sent  # context only (the all-reduce is not counted)
