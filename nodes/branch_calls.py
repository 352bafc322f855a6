"""A lockstep network call of a branch arrangement: which rank gets which rows of which entries.

ComfyUI batches the conditionings of one call into one ``x`` and says which chunk is which
in ``transformer_options["cond_or_uncond"]`` (0 = cond, 1 = uncond; chunks of ``B`` entries).
Each of the plan's groups gets its branches' chunks; each member of a group gets its rows of
them. The outputs are written back at the same entries and rows, so the server's sampler loop
sees the whole output as if one device had computed it.
"""

from __future__ import annotations

from dataclasses import dataclass


import numpy as np
import torch

from stadi_core.errors import UnsupportedError
from stadi_core.runtime.messages import UnitInput
from stadi_core.runtime.session_conds import ConditioningOnce, digest

from .control_residuals import band_control

BRANCH_OF = {0: "cond", 1: "uncond"}  # ComfyUI's cond_or_uncond codes


@dataclass(frozen=True)
class Placement:
    rank: int
    entries: np.ndarray  # batch indices of x the unit computed
    rows: slice


def split_call(plan, x: torch.Tensor, timesteps: np.ndarray, cond: dict, cond_or_uncond,
               sent: "ConditioningOnce | None" = None, control: dict | None = None) -> tuple[dict, list]:
    """({rank: [UnitInput]}, [[Placement] per rank]) for one call of a branch arrangement
    (``control``: the call's ControlNet residuals; each unit gets its entries' rows of them)."""
    codes = list(cond_or_uncond or [])
    n = x.shape[0]
    if not codes or n % len(codes) or any(c not in BRANCH_OF for c in codes):
        raise UnsupportedError(f"STADI: a network call with conditionings {codes} cannot be split by CFG branch (the "
                               "guider sends something other than one cond and one uncond): use strategy bands")
    per = n // len(codes)
    n_rows = x.shape[2]
    xs = x.detach().cpu().float().numpy()
    for k, v in cond.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise UnsupportedError(f"STADI: model input {k!r} is not one entry per batch item ({tuple(v.shape)}); "
                                   "use strategy bands")
    units: dict[int, list] = {b.rank: [] for b in plan.bands}
    places: dict[int, list] = {b.rank: [] for b in plan.bands}
    for gi, group in enumerate(plan.groups):
        chunks = [i for i, c in enumerate(codes) if BRANCH_OF[c] in group.branches]
        if not chunks:
            continue  # e.g. the uncond pass ComfyUI skips at cfg 1
        entries = np.concatenate([np.arange(i * per, (i + 1) * per) for i in chunks])
        unit_cond = {k: np.ascontiguousarray(v[entries]) for k, v in cond.items()}  # the same for every member
        key = digest(unit_cond) if sent is not None else ""
        for rank, rows in zip(group.ranks, group.rows):
            start = group.row_start(rank)
            span = slice(start, start + rows)
            lean = sent.lean(rank, unit_cond, key) if sent is not None else unit_cond
            units[rank].append(UnitInput(gi, np.ascontiguousarray(xs[entries][:, :, span]), timesteps[entries],
                                         lean, key, control=band_control(control, n_rows, span.start, span.stop,
                                                                         entries)))
            places[rank].append(Placement(rank, entries, span))
    return units, places


def assemble(x: torch.Tensor, outs: dict, places: dict) -> torch.Tensor:
    """The whole raw output from every rank's unit outputs."""
    full = None
    for rank, unit_places in places.items():
        for place, out in zip(unit_places, outs[rank].unit_outs):
            o = torch.from_numpy(out)
            if full is None:
                full = torch.zeros((x.shape[0], o.shape[1]) + tuple(x.shape[2:]), dtype=o.dtype)
            full[torch.from_numpy(place.entries), :, place.rows] = o
    return full.to(device=x.device, dtype=x.dtype)


