"""A picture of a STADI plan: which device computed which latent rows, its stride and its time.

`plan_image(plan, report)` draws the latent's row bands as horizontal stripes (height
proportional to rows) coloured per device, each labelled, under a header line and above the
notes, and returns it as a ComfyUI IMAGE tensor (1, H, W, 3), float in [0, 1].
"""

from __future__ import annotations

import math
import textwrap

import torch

__all__ = ["plan_image", "device_colour", "text_image"]

# Colours per device index (tab10-like); CPU workers get their own, muted set.
_CUDA_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]
_CPU_COLOURS = [(120, 144, 156), (188, 143, 143), (143, 188, 143), (176, 160, 208), (210, 180, 120),
                (150, 190, 210)]
_BG = (24, 24, 28)
_FG = (235, 235, 235)
_DIM = (170, 170, 175)
_PAD = 6


def device_colour(device: str) -> tuple[int, int, int]:
    """A fixed colour for a device name ("cuda:1" -> the second CUDA colour)."""
    kind, _, idx = str(device).partition(":")
    try:
        i = int(idx or 0)
    except ValueError:
        i = sum(map(ord, str(device)))
    table = _CPU_COLOURS if kind == "cpu" else _CUDA_COLOURS
    return table[i % len(table)]


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font


def _text_w(draw, font, s: str) -> int:
    l, _, r, _ = draw.textbbox((0, 0), s, font=font)
    return r - l


def _fit(draw, font, s: str, width: int) -> str:
    """s, shortened with an ellipsis until it fits in width pixels."""
    if _text_w(draw, font, s) <= width:
        return s
    while len(s) > 1 and _text_w(draw, font, s + "...") > width:
        s = s[:-1]
    return s + "..."


def _wrap(draw, font, s: str, width: int) -> list[str]:
    avg = max(1, _text_w(draw, font, "abcdefghij") // 10)
    return textwrap.wrap(s, width=max(8, width // avg)) or [""]


def _fmt_s(v) -> str:
    return "?" if v is None else f"{float(v):.2f} s"


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)


def _line_height(draw, font) -> int:
    _, t, _, b = draw.textbbox((0, 0), "Ag[]|", font=font)
    return (b - t) + 4


def plan_image(plan: dict, report: dict | None = None, width: int = 512) -> torch.Tensor:
    """ComfyUI IMAGE (1, H, W, 3) of a plan (Plan.to_dict()) and its run (RunReport.to_dict())."""
    from PIL import Image, ImageDraw

    report = report or {}
    width = max(160, int(width))
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    lh = _line_height(scratch, font)
    inner = width - 2 * _PAD

    bands = branch_units(plan) if plan.get("groups") else list(plan.get("bands", []))
    height = sum(int(b["rows"]) for b in bands) if plan.get("groups") else \
        int(plan.get("height") or sum(int(b["rows"]) for b in bands) or 1)
    ranks = {r.get("rank"): r for r in report.get("ranks", [])}

    wall = report.get("wall_s")
    denoise = report.get("denoise_s")
    head = (f"STADI {plan.get('mode', '?')} · {plan.get('steps', '?')} steps · warmup {plan.get('warmup', '?')} · "
            f"sync every {plan.get('sync_period', '?')} · {plan.get('height') or height} latent rows"
            + (f" · {plan.get('strategy')}: cond rows, then uncond rows" if plan.get("groups") else "")
            + (f" · context {_context_label(plan)}" if _context_label(plan) != "full" else ""))
    head2 = f"wall {_fmt_s(wall)}" + (f" · denoising {_fmt_s(denoise)}" if denoise is not None else "")
    header_lines = _wrap(scratch, font, head, inner) + [head2]

    notes: list[str] = []
    for n in list(report.get("notes") or []) + list(plan.get("notes") or []):
        if n not in notes:
            notes.append(str(n))
    note_lines: list[str] = []
    for n in notes:
        note_lines += _wrap(scratch, font, "note: " + n, inner)

    # label lines per band
    labels = []
    for b in bands:
        r = ranks.get(b["rank"], {})
        start, rows = int(b["row_start"]), int(b["rows"])
        busy, wall_r = r.get("busy_s"), r.get("wall_s")
        idle = None if busy is None or wall_r is None else max(0.0, float(wall_r) - float(busy))
        idle_pct = r.get("idle_pct")
        where = f"{b['branch']} rows [{b['branch_start']},{b['branch_start'] + rows})" if "branch" in b else \
            f"rows [{start},{start + rows})"
        line1 = f"rank {b['rank']} · {b['device']} · {where} = {rows}"
        evals = r.get("evals")
        line2 = (f"stride {b.get('stride', '?')} · evals {'?' if evals is None else evals} · busy {_fmt_s(busy)} · "
                 f"idle {_fmt_s(idle)}" + (f" ({float(idle_pct):.0f}%)" if idle_pct is not None else ""))
        labels.append((line1, line2))

    # stripes: tall enough that the thinnest band holds its two label lines (within reason)
    min_rows = min((int(b["rows"]) for b in bands), default=1)
    need = 2 * lh + 4
    area_h = int(min(1024, max(160, math.ceil(need * height / max(1, min_rows)))))
    header_h = _PAD + lh * len(header_lines) + _PAD
    notes_h = (lh * len(note_lines) + _PAD) if note_lines else 0
    total_h = header_h + area_h + _PAD + notes_h

    img = Image.new("RGB", (width, total_h), _BG)
    draw = ImageDraw.Draw(img)
    y = _PAD
    for i, line in enumerate(header_lines):
        draw.text((_PAD, y), _fit(draw, font, line, inner), fill=_FG if i == 0 else _DIM, font=font)
        y += lh

    top = header_h
    # cumulative rows -> pixel edges, so the stripes tile the area exactly
    edges = [top]
    acc = 0
    for b in bands:
        acc += int(b["rows"])
        edges.append(top + round(area_h * acc / height))
    if not bands:
        draw.text((_PAD, top + _PAD), "no bands in this plan", fill=_FG, font=font)
    for b, (line1, line2), y0, y1 in zip(bands, labels, edges[:-1], edges[1:]):
        colour = device_colour(b["device"])
        draw.rectangle([0, y0, width - 1, max(y0, y1 - 1)], fill=colour)
        if y1 - y0 >= 3:
            draw.line([0, y1 - 1, width - 1, y1 - 1], fill=_BG)  # separator, even between equal colours
        ink = _ink(colour)
        h = y1 - y0
        if h >= 2 * lh + 2:
            ty = y0 + (h - 2 * lh) // 2
            draw.text((_PAD, ty), _fit(draw, font, line1, inner), fill=ink, font=font)
            draw.text((_PAD, ty + lh), _fit(draw, font, line2, inner), fill=ink, font=font)
        elif h >= lh:
            draw.text((_PAD, y0 + (h - lh) // 2), _fit(draw, font, f"{line1} · {line2}", inner), fill=ink, font=font)
    y = top + area_h + _PAD
    for line in note_lines:
        draw.text((_PAD, y), _fit(draw, font, line, inner), fill=_DIM, font=font)
        y += lh
    return _to_tensor(img)


def branch_units(plan: dict) -> list[dict]:
    """A CFG-branch split drawn as the branch-major strip: all cond rows, then all uncond rows;
    one stripe per unit, labelled with its branch and its rows inside that branch."""
    by_rank = {b["rank"]: b for b in plan.get("bands", [])}
    groups = sorted(plan["groups"], key=lambda g: 0 if "cond" in g["branches"] else 1)
    units, offset = [], 0
    for g in groups:
        start = 0
        for rank, rows in zip(g["ranks"], g["rows"]):
            units.append(dict(by_rank.get(rank, {"device": f"rank {rank}"}), rank=rank, row_start=offset + start,
                              rows=int(rows), branch="+".join(g["branches"]), branch_start=start))
            start += int(rows)
        offset += start
    return units


def text_image(lines: list[str] | str, width: int = 320, height: int | None = None) -> torch.Tensor:
    """A small ComfyUI IMAGE showing some text (placeholders, messages)."""
    from PIL import Image, ImageDraw

    if isinstance(lines, str):
        lines = [lines]
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    lh = _line_height(scratch, font)
    wrapped: list[str] = []
    for line in lines:
        wrapped += _wrap(scratch, font, line, width - 2 * _PAD)
    h = height or (2 * _PAD + lh * len(wrapped) + 2 * _PAD)
    img = Image.new("RGB", (width, h), _BG)
    draw = ImageDraw.Draw(img)
    y = (h - lh * len(wrapped)) // 2
    for line in wrapped:
        w = _text_w(draw, font, line)
        draw.text((max(_PAD, (width - w) // 2), y), line, fill=_FG, font=font)
        y += lh
    return _to_tensor(img)


def _context_label(plan: dict) -> str:
    """How displaced steps exchanged context ('full' unless the plan says otherwise)."""
    from stadi_core.parallel.options import ContextOptions

    return ContextOptions.from_dict(plan.get("context")).label() if plan.get("mode") == "displaced" else "full"
