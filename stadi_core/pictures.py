"""PNG pictures the commands write: images, sample grids, a loss curve, a plan beside its image.

Plain PIL (no plotting library is a dependency); every function returns a PIL image.
"""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import torch

RANK_COLOURS = ((230, 90, 60), (60, 140, 230), (90, 190, 90), (220, 180, 50), (170, 90, 200), (60, 190, 190),
                (200, 120, 160), (140, 140, 140))


def image(rgb: torch.Tensor, scale: int = 1):
    """(3, H, W) in [0, 1] -> a PIL RGB picture, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    arr = (rgb.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def grid(images: Sequence, cols: int, pad: int = 4, captions: Sequence[str] | None = None):
    """Pictures of one size in rows of ``cols``, with an optional caption under each."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    chars = max(4, w // 6)
    lines = [textwrap.wrap(c, chars) or [""] for c in captions] if captions else []
    text_h = 11 * max(map(len, lines)) + 2 if captions else 0
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + text_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad + text_h)
        out.paste(im, (x, y))
        if captions:
            draw.multiline_text((x, y + h + 1), "\n".join(lines[i]), fill=(0, 0, 0), spacing=1)
    return out


def line_chart(series: dict[str, Sequence[tuple[float, float]]], title: str, size=(640, 360), log_y: bool = True):
    """A chart of (x, y) series, y on a log scale by default, with min/max labels."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    left, right, top, bottom = 60, size[0] - 20, 30, size[1] - 30
    pts = [p for s in series.values() for p in s]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    fy = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = fy(min(ys)), fy(max(ys))
    y1 = y1 if y1 > y0 else y0 + 1

    def at(x, y):
        return (left + (x - x0) / max(x1 - x0, 1e-12) * (right - left), bottom - (fy(y) - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((8, 8), title, fill=(0, 0, 0))
    draw.text((4, top), f"{max(ys):.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{min(ys):.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"{x0:g}", fill=(0, 0, 0))
    draw.text((right - 40, bottom + 6), f"{x1:g}", fill=(0, 0, 0))
    for i, (name, s) in enumerate(series.items()):
        colour = RANK_COLOURS[i % len(RANK_COLOURS)]
        draw.line([at(x, y) for x, y in s], fill=colour, width=2)
        draw.text((right - 200, top + 6 + 12 * i), name, fill=colour)
    return out


def plan_beside(picture, plan, rows: int):
    """The picture with the plan drawn to its right: each band's rows in its rank's colour,
    labelled with device, rows and stride (or the CFG branch a device takes)."""
    from PIL import Image, ImageDraw

    w, h = picture.size
    panel = 260
    out = Image.new("RGB", (w + panel, max(h, 24 * len(plan.bands))), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    per_row = h / rows
    for b in plan.bands:
        colour = RANK_COLOURS[b.rank % len(RANK_COLOURS)]
        y0, y1 = b.row_start * per_row, (b.row_start + b.rows) * per_row
        if plan.splits_branches:  # every rank steps the whole latent
            y0, y1 = b.rank * h / plan.world_size, (b.rank + 1) * h / plan.world_size
        draw.rectangle((w + 4, y0 + 1, w + 16, y1 - 1), fill=colour)
        if not plan.splits_branches:
            draw.line((0, y0, w, y0), fill=colour)
        label = f"rank {b.rank} {b.device}: rows {b.row_start}-{b.row_start + b.rows - 1}, stride {b.stride}"
        if plan.splits_branches:
            label = f"rank {b.rank} {b.device}: CFG-branch work, whole image"
        draw.text((w + 22, (y0 + y1) / 2 - 5), label, fill=(0, 0, 0))
    return out
