"""Work units beyond bands: which device computes which rows of which CFG branch.

Under classifier-free guidance every network call evaluates two branches (uncond, cond) on
the same latent. A unit is (branches, rows): a whole branch needs no context from anyone
(Hybridiff's condition-based partitioning; ComfyUI core's "MultiGPU CFG Split"), a band of
one branch exchanges context only inside that branch's group, and the classic band of both
branches is a unit too. Laying the branches end to end ("branch-major": all cond rows, then
all uncond rows) and cutting that 2H-row strip by device speed gives, from one rule:

* 2 equal devices -> one whole branch each (plain CFG split);
* 4 equal devices -> 2 branches x 2 bands;
* a fast + a 2x slower device -> the fast one takes the whole cond branch plus the top third
  of the uncond branch, the slow one the rest of uncond: both finish together and only the
  uncond group exchanges (the uneven branch split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import PlanError

BRANCHES = ("uncond", "cond")  # the CFG batch order of the engine: [uncond; cond]
STRATEGIES = ("auto", "bands", "cfg_split", "cfg_split+bands")


@dataclass(frozen=True)
class BranchGroup:
    """CFG branches computed together, cut into row bands over ``ranks`` (top to bottom)."""

    branches: tuple[str, ...]
    ranks: tuple[int, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", tuple(self.branches))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        if not self.branches or any(b not in BRANCHES for b in self.branches):
            raise PlanError(f"malformed work units: branches {self.branches} (use {BRANCHES})")
        if len(self.ranks) != len(self.rows) or not self.ranks or any(r < 1 for r in self.rows):
            raise PlanError(f"malformed work units: ranks {self.ranks} with rows {self.rows}")
        if len(set(self.ranks)) != len(self.ranks):
            raise PlanError(f"malformed work units: a rank appears twice in one group {self.ranks}")

    @property
    def height(self) -> int:
        return sum(self.rows)

    def row_start(self, rank: int) -> int:
        i = self.ranks.index(rank)
        return sum(self.rows[:i])

    def rows_of(self, rank: int) -> int:
        return self.rows[self.ranks.index(rank)]

    def to_dict(self) -> dict:
        return {"branches": list(self.branches), "ranks": list(self.ranks), "rows": list(self.rows)}

    @classmethod
    def from_dict(cls, d) -> "BranchGroup":
        return cls(tuple(d["branches"]), tuple(d["ranks"]), tuple(d["rows"]))


@dataclass(frozen=True)
class Unit:
    """One rank's share of one group: rows [row_start, row_start + rows) of ``branches``."""

    group: int
    branches: tuple[str, ...]
    row_start: int
    rows: int

    @property
    def row_end(self) -> int:
        return self.row_start + self.rows


def units_of(groups: Sequence[BranchGroup], rank: int) -> list[Unit]:
    """The units a rank computes in one network call, in group order."""
    return [Unit(g, grp.branches, grp.row_start(rank), grp.rows_of(rank))
            for g, grp in enumerate(groups) if rank in grp.ranks]


def work_rows(groups: Sequence[BranchGroup], rank: int) -> float:
    """A rank's work per call in rows of both branches (a whole branch of H rows = H/2)."""
    return sum(u.rows * len(u.branches) / len(BRANCHES) for u in units_of(groups, rank))


def check_groups(groups: Sequence[BranchGroup], height: int, world_size: int) -> None:
    """Every branch computed exactly once over every row, by ranks that exist, each rank used."""
    seen = [b for g in groups for b in g.branches]
    if sorted(seen) != sorted(BRANCHES):
        raise PlanError(f"malformed work units: branches {seen} must cover {BRANCHES} exactly once")
    for g in groups:
        if g.height != height:
            raise PlanError(f"malformed work units: group {g.branches} covers {g.height} rows, latent has {height}")
        if any(not 0 <= r < world_size for r in g.ranks):
            raise PlanError(f"malformed work units: ranks {g.ranks} outside 0..{world_size - 1}")
    used = {r for g in groups for r in g.ranks}
    if used != set(range(world_size)):
        raise PlanError(f"malformed work units: ranks {sorted(set(range(world_size)) - used)} have no work")


def branch_major_groups(height: int, shares: Sequence[int], align: int) -> tuple[BranchGroup, ...]:
    """Cut the strip [cond rows 0..H) + [uncond rows 0..H) into consecutive pieces of ``shares``.

    ``shares`` are rows of the 2H strip per rank (multiples of ``align`` except where H is
    not, summing to 2H). A rank whose piece crosses the branch boundary holds a band of each.
    Cond goes first so the rank listed first (the fastest) gets the whole cond branch.
    """
    if sum(shares) != 2 * height or any(s < 1 for s in shares):
        raise PlanError(f"branch shares {list(shares)} must be positive and sum to {2 * height}")
    order = ("cond", "uncond")
    members: dict[str, list[tuple[int, int]]] = {b: [] for b in order}
    pos = 0
    for rank, share in enumerate(shares):
        end = pos + share
        for bi, branch in enumerate(order):
            lo, hi = max(pos, bi * height), min(end, (bi + 1) * height)
            if hi > lo:
                members[branch].append((rank, hi - lo))
        pos = end
    return tuple(BranchGroup((b,), tuple(r for r, _ in members[b]), tuple(n for _, n in members[b]))
                 for b in ("uncond", "cond"))


def branch_major_shares(height: int, weights: Sequence[float], align: int) -> list[int]:
    """Rows of the 2H branch-major strip per rank, proportional to ``weights``.

    Cut points are rounded to the nearest position a band may start at: a multiple of
    ``align`` from the start of its branch, or a branch boundary (so a ragged last band of
    each branch is allowed when H is not a multiple of ``align``). A share may round to 0.
    """
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise PlanError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    valid = sorted({min(k * align, height) for k in range(height // align + 2)})
    valid = valid + [height + v for v in valid[1:]]
    total = float(sum(weights))
    cuts, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w
        ideal = 2 * height * acc / total
        nearest = min(valid, key=lambda v: (abs(v - ideal), v))
        cuts.append(max(cuts[-1], nearest))
    cuts.append(2 * height)
    return [b - a for a, b in zip(cuts, cuts[1:])]
