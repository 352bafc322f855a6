"""Where a band loop stands between two steps: what it takes to continue it on other rows or ranks.

A standalone run's ranks send one at every sync step (a checkpoint) and when they pause together
(an in-run re-plan). The coordinator stitches the bands' states into the whole latent's and crops
it to each rank's new rows: the sampler math is row-local, so the continued loop steps exactly as
the first one would have (the noise is drawn per step from the seed, noise.py). That is how a run
finishes on the survivors when a worker dies, and how bands move mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# No torch at import: messages.py carries LoopState, and a worker imports messages before it picks its GPU.


@dataclass
class LoopState:
    """The loop before step ``step``: latent rows ``row_start``.. of ``x``, and the sampler's history
    (row-aligned arrays, e.g. DPM++ 2M's last denoised estimate, and floats)."""

    step: int
    row_start: int
    x: np.ndarray  # (B, C, rows, W) float32
    solver: dict = field(default_factory=dict)  # name -> ndarray (B, C, rows, W) or float

    @property
    def rows(self) -> int:
        return int(self.x.shape[2])

    @classmethod
    def capture(cls, step: int, row_start: int, x, solver_state: dict) -> "LoopState":
        """From the loop's torch tensors (copied to host float32 arrays)."""
        import torch

        def host(v):
            return v.detach().cpu().float().numpy().copy() if isinstance(v, torch.Tensor) else float(v)

        return cls(step, row_start, host(x), {k: host(v) for k, v in solver_state.items()})

    def tensors(self) -> tuple:
        """(x, solver state) as the loop holds them: torch tensors and floats."""
        import torch

        return torch.from_numpy(self.x), {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                          for k, v in self.solver.items()}

    def crop(self, row_start: int, rows: int) -> "LoopState":
        """Rows ``row_start``..``row_start + rows`` of the latent (they must lie within this state)."""
        lo = row_start - self.row_start
        if lo < 0 or lo + rows > self.rows:
            raise ValueError(f"rows {row_start}..{row_start + rows} are not within {self.row_start}.."
                             f"{self.row_start + self.rows}")
        return LoopState(self.step, row_start, self.x[:, :, lo:lo + rows].copy(),
                         {k: v[:, :, lo:lo + rows].copy() if isinstance(v, np.ndarray) else v
                          for k, v in self.solver.items()})


def stitch(states: Sequence[LoopState]) -> LoopState:
    """The whole latent's state from bands that cover it without gaps, all at the same step."""
    ordered = sorted(states, key=lambda s: s.row_start)
    steps = {s.step for s in ordered}
    if len(steps) != 1:
        raise ValueError(f"band states from different steps {sorted(steps)} cannot be stitched")
    for a, b in zip(ordered, ordered[1:]):
        if a.row_start + a.rows != b.row_start:
            raise ValueError(f"band states leave a gap or overlap at row {a.row_start + a.rows}")
    keys = {tuple(sorted(s.solver)) for s in ordered}
    if len(keys) != 1:
        raise ValueError(f"band states hold different sampler histories {sorted(keys)}")
    solver = {}
    for k in next(iter(keys)):
        values = [s.solver[k] for s in ordered]
        if isinstance(values[0], np.ndarray):
            solver[k] = np.concatenate(values, axis=2)
        elif len(set(values)) != 1:
            raise ValueError(f"band states disagree on {k}: {values}")
        else:
            solver[k] = values[0]
    return LoopState(ordered[0].step, ordered[0].row_start, np.concatenate([s.x for s in ordered], axis=2), solver)
