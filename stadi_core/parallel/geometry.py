"""Where each band's rows land at every layer: pure functions of the band layout, no communication.

A layer that gathers the other bands' data (attention K/V, GroupNorm moments) needs every band's
extent at its own resolution. Bands aligned to the network's downsampling scale proportionally;
a ragged last band (a latent height off the alignment, which ComfyUI's UNet accepts) does not,
so its extents are found from the layer's downsampling factor, with the ceil sizes convs produce.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import UnsupportedError


def extent(rows: Sequence[int], rank: int, factor: int) -> int:
    """Rows of ``rank``'s band after downsampling the whole latent by ``factor`` (ceil, as convs do)."""
    start = sum(rows[:rank])
    end = start + rows[rank]
    return -(-end // factor) - -(-start // factor)


def band_sizes(rows: Sequence[int], rank: int, local_size: int, local_rows: int | None = None,
               ragged_align: int = 0, width: int = 0) -> list[int]:
    """Every band's extent along a band-proportional dimension, from ``rank``'s ``local_size``.

    ``local_rows``: the band's rows at this layer when the caller knows them (a GroupNorm's count
    spans channels too); otherwise, with a ragged layout, ``local_size`` is taken as rows x columns
    of a ``width``-column latent downsampled alike (attention tokens).
    """
    if ragged_align:
        return _ragged_sizes(rows, rank, local_size, local_rows, ragged_align, width)
    mine = rows[rank]
    sizes = []
    for r in rows:
        num = local_size * r
        if num % mine:
            raise UnsupportedError(
                f"band of {mine} latent rows maps to {local_size} rows/tokens at some layer, "
                f"which does not divide evenly between bands of {list(rows)}: "
                "the model downsamples more than the plan's row alignment allows"
            )
        sizes.append(num // mine)
    return sizes


def _ragged_sizes(rows, rank, local_size, local_rows, ragged_align, width) -> list[int]:
    factor = 1
    while factor <= ragged_align:
        mine = extent(rows, rank, factor)
        found = (local_rows == mine) if local_rows is not None else (mine * -(-width // factor) == local_size)
        if found:
            per_row = local_size // mine
            return [extent(rows, r, factor) * per_row for r in range(len(rows))]
        factor *= 2
    raise UnsupportedError(f"band of {rows[rank]} latent rows reaches a layer with {local_size} values that match "
                           f"no downsampling of bands {list(rows)} up to {ragged_align}x: use an image height that "
                           "is a multiple of the model's alignment")


def row_tokens(total_rows: int, width: int, total_tokens: int, max_factor: int = 64) -> int:
    """Tokens per feature row at a layer with ``total_tokens`` for the whole image, or 0 if unknown.

    The layer's downsampling factor is the power of two at which ceil(rows/f) x ceil(width/f)
    gives the token count (UNet levels, a DiT's 2x2 patches)."""
    factor = 1
    while width and factor <= max_factor:
        w = -(-width // factor)
        if -(-total_rows // factor) * w == total_tokens:
            return w
        factor *= 2
    return 0


def near_sizes(sizes: Sequence[int], portion: float, per_row: int) -> list[int]:
    """Partial context (PCPP): how much of each band an adjacent band attends to, in tokens.

    The nearest ceil(portion x rows) whole rows of the band (at least one), so a neighbour sees
    complete rows; with no row length known, ceil(portion x tokens)."""
    out = []
    for size in sizes:
        if per_row and size % per_row == 0:
            rows = size // per_row
            out.append(min(size, max(1, math.ceil(portion * rows - 1e-9)) * per_row))
        else:
            out.append(min(size, max(1, math.ceil(portion * size - 1e-9))))
    return out
