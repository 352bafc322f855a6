"""ControlNet / T2I-Adapter residuals cut to a band (server) and handed to the band's UNet (worker).

ComfyUI computes a call's ControlNets on the whole latent (``calc_cond_batch`` -> ``get_control``)
and passes the diffusion network ``control = {"input": [...], "middle": [...], "output": [...]}``:
full-image tensors that ``UNetModel`` adds to its activations (``apply_control``: ``h += ctrl``,
popping each list from its end). A band's UNet holds latent rows [start, end); at a level
downsampled f times (f a power of two) it holds rows [start / f, ceil(end / f)): band starts are
multiples of the UNet's alignment (its largest f), and the UNet's stride-2 convolutions make
ceil-sized levels, so the last, ragged band ends with the image. Each residual is cut to those
rows; its level is found from its height (the f with ceil(H / f) == its height).

A residual whose height is no level of the image (or 1 row, which broadcasts) is sent whole: the
band's UNet then does with it what the full UNet does (adds it if it broadcasts, else ComfyUI's
"control could not be applied" warning). ``None`` entries stay ``None`` (list positions matter).

Wire format: the same dict of lists, numpy arrays (bfloat16 sent as float32, as ``x`` is).
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import numpy as np
import torch

KEYS = ("input", "middle", "output")
MAX_FACTOR = 1 << 10


def level_factor(height: int, rows: int) -> int | None:
    """The downsampling factor f (a power of two) of a level with ``rows`` rows of a ``height``-row
    latent (ceil(height / f) == rows), or None when no level has that height."""
    f = 1
    while f <= MAX_FACTOR:
        got = -(-height // f)
        if got == rows:
            return f
        if got < rows:
            return None
        f *= 2
    return None


def level_rows(height: int, rows: int, start: int, end: int) -> slice | None:
    """The rows of a residual with ``rows`` rows that belong to latent rows [start, end), or None (send whole)."""
    if rows <= 1:
        return None
    f = level_factor(height, rows)
    if f is None:
        return None
    return slice(start // f, -(-end // f))


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def band_residuals(control: dict, height: int, start: int, end: int, entries=None) -> dict:
    """The wire form of ``control`` for latent rows [start, end) of a ``height``-row call
    (``entries``: only these batch entries, for a CFG-branch unit; residuals of batch 1 broadcast)."""
    out = {}
    for key in KEYS:
        items = control.get(key)
        if not items:
            continue
        wire = []
        for r in items:
            if r is None:
                wire.append(None)
                continue
            if entries is not None and r.shape[0] > 1:
                r = r[torch.as_tensor(entries, device=r.device)]
            span = level_rows(height, int(r.shape[-2]), start, end) if r.dim() >= 3 else None
            wire.append(_numpy(r if span is None else r[..., span, :]))
        out[key] = wire
    unknown = sorted(set(control) - set(KEYS))
    if unknown:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"STADI: the ControlNet residuals carry {unknown} besides input/middle/output, which "
                               "the band UNet does not apply; use KSampler for this workflow")
    return out


def residuals_on(wire: dict | None, device, dtype=None) -> dict | None:
    """The worker's ``control`` argument from the wire form: fresh lists (the UNet pops them)."""
    if not wire:
        return None

    def tensor(a):
        t = torch.from_numpy(a).to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    return {key: [None if a is None else tensor(a) for a in items] for key, items in wire.items()}


def wire_bytes(wire: dict | None) -> int:
    return sum(a.nbytes for items in (wire or {}).values() for a in items if a is not None)
