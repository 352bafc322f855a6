"""Procedural scenes and their captions: the data the tiny-shapes model is trained on.

Every scene has structure that crosses the engine's band boundaries (bands are row ranges):
a sky gradient or a horizon spanning the height, optional vertical stripes running top to
bottom, and one coloured shape that may straddle a boundary. A caption names four slots:
colour, shape, scene and stripes ("red circle horizon stripes"); a missing slot is "any".
Pictures are RGB in [-1, 1], drawn with torch ops so a batch of 64 takes milliseconds.
"""

from __future__ import annotations

import torch

from ..errors import StadiError

COLOURS = {
    "red": (0.95, 0.15, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.98, 0.88, 0.10), "white": (0.96, 0.96, 0.96), "purple": (0.60, 0.20, 0.80),
}
SHAPES = ("circle", "square", "triangle")
SCENES = ("sky", "horizon", "flat")
STRIPES = ("stripes", "clear")
SLOTS = (tuple(COLOURS), SHAPES, SCENES, STRIPES)
NULL = "<null>"  # the unconditional caption's token (CFG's uncond branch)
ANY = "<any>"  # a slot the caption leaves open
VOCAB = (NULL, ANY) + tuple(w for slot in SLOTS for w in slot)
CAPTION_TOKENS = len(SLOTS)

# backgrounds: (top colour, bottom colour) pairs for skies, sky and ground colours for horizons
_SKIES = ((0.35, 0.60, 0.95), (0.10, 0.10, 0.30), (0.95, 0.55, 0.25), (0.55, 0.75, 0.90), (0.20, 0.20, 0.20))
_LIGHT = ((0.95, 0.95, 1.00), (0.40, 0.20, 0.50), (0.50, 0.20, 0.45), (0.95, 0.90, 0.75), (0.55, 0.55, 0.55))
_GROUNDS = ((0.25, 0.55, 0.20), (0.55, 0.40, 0.25), (0.85, 0.75, 0.50), (0.30, 0.30, 0.35))
_FLATS = ((0.30, 0.30, 0.30), (0.85, 0.85, 0.80), (0.20, 0.35, 0.45), (0.45, 0.25, 0.20))


def tokenize(caption: str | None) -> list[int]:
    """Token ids of a caption, one per slot; None or "" is the unconditional (null) caption."""
    if not caption or not caption.strip():
        return [VOCAB.index(NULL)] * CAPTION_TOKENS
    ids = [VOCAB.index(ANY)] * CAPTION_TOKENS
    for word in caption.lower().replace(",", " ").split():
        for s, slot in enumerate(SLOTS):
            if word in slot:
                ids[s] = VOCAB.index(word)
                break
        else:
            raise StadiError(f"caption word {word!r} is not in the tiny-shapes vocabulary: use colours "
                             f"({', '.join(COLOURS)}), shapes ({', '.join(SHAPES)}), scenes ({', '.join(SCENES)}) "
                             f"and {' or '.join(STRIPES)}")
    return ids


def caption_for(seed: int) -> str:
    """A full caption drawn from ``seed`` (the default prompt of a generation)."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(slot[int(torch.randint(len(slot), (1,), generator=gen))] for slot in SLOTS)


def scenes(n: int, height: int = 32, width: int = 32, *, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes (n, 3, height, width) in [-1, 1] and their full captions."""
    g = generator

    def pick(k):
        return torch.randint(k, (n,), generator=g)

    def unif(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    colour_i, shape_i, scene_i, stripe_i = pick(len(COLOURS)), pick(len(SHAPES)), pick(len(SCENES)), pick(len(STRIPES))
    yy = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5
    xx = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    size = float(min(height, width))

    # background
    sky_i, ground_i, flat_i = pick(len(_SKIES)), pick(len(_GROUNDS)), pick(len(_FLATS))
    top = torch.tensor(_SKIES)[sky_i].view(n, 3, 1, 1)
    bottom = torch.tensor(_LIGHT)[sky_i].view(n, 3, 1, 1)
    ramp = (yy / height).unsqueeze(1)  # (1, 1, H, 1)
    sky = top + (bottom - top) * ramp
    line = (unif(0.35, 0.75) * height).view(n, 1, 1, 1)
    ground = torch.tensor(_GROUNDS)[ground_i].view(n, 3, 1, 1) * (0.8 + 0.4 * ramp)
    horizon = torch.where(yy.unsqueeze(1) < line, sky, ground.expand(n, 3, height, width))
    flat = torch.tensor(_FLATS)[flat_i].view(n, 3, 1, 1).expand(n, 3, height, width)
    kind = scene_i.view(n, 1, 1, 1)
    img = torch.where(kind == 0, sky.expand(n, 3, height, width), torch.where(kind == 1, horizon, flat)).clone()

    # vertical stripes from top to bottom
    period = unif(5.0, 9.0).view(n, 1, 1)
    phase = unif(0.0, 9.0).view(n, 1, 1)
    stripe_w = unif(1.5, 2.5).view(n, 1, 1)
    on = ((xx + phase) % period) < stripe_w
    stripe_mask = (on & (stripe_i.view(n, 1, 1) == 0)).unsqueeze(1).float()
    stripe_colour = torch.tensor(_LIGHT)[pick(len(_LIGHT))].view(n, 3, 1, 1) * 0.5 + 0.35
    img = img * (1 - 0.8 * stripe_mask) + stripe_colour * 0.8 * stripe_mask

    # the shape
    r = (unif(0.16, 0.30) * size).view(n, 1, 1)
    cy = (unif(0.2, 0.8) * height).view(n, 1, 1)
    cx = (unif(0.2, 0.8) * width).view(n, 1, 1)
    dy, dx = yy - cy, xx - cx
    circle = dy**2 + dx**2 < r**2
    square = (dy.abs() < r * 0.85) & (dx.abs() < r * 0.85)
    triangle = (dy < r * 0.8) & (dy > -r) & (dx.abs() < (dy + r) * 0.55)
    s = shape_i.view(n, 1, 1)
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).unsqueeze(1).float()
    colour = torch.tensor(list(COLOURS.values()))[colour_i].view(n, 3, 1, 1)
    img = img * (1 - mask) + colour * mask

    captions = [" ".join((tuple(COLOURS)[int(c)], SHAPES[int(sh)], SCENES[int(sc)], STRIPES[int(st)]))
                for c, sh, sc, st in zip(colour_i, shape_i, scene_i, stripe_i)]
    return (img.clamp(0, 1) * 2 - 1), captions
