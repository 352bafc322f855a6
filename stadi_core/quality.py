"""Image-quality measures for approximate modes: PSNR, SSIM and a seam score.

All take pictures in [0, 1], shaped (3, H, W) or (B, 3, H, W). The seam score is the one a
band split needs: the mean absolute vertical gradient on the rows where one band meets the
next, divided by the same over every other row pair. A seamless image scores about 1 (its
boundary rows are like any other); a seam, a jump between bands, scores clearly above 1.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def _batched(x: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(0) if x.ndim == 3 else x).double()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for a data range of 1 (inf for identical pictures)."""
    mse = float((_batched(a) - _batched(b)).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window, per channel; a
    7-pixel window rather than 11 because the tiny model's pictures are 32 px wide."""
    x, y = _batched(a), _batched(b)
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def row_gradients(x: torch.Tensor) -> torch.Tensor:
    """Mean |x[row i+1] - x[row i]| over samples, channels and columns: (H - 1,)."""
    x = _batched(x)
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def seam_sums(x: torch.Tensor, boundaries: Iterable[int]) -> tuple[float, int, float, int]:
    """(gradient sum, count) on the boundary row pairs and on the others, to pool over images."""
    grads = row_gradients(x)
    at = sorted({int(r) - 1 for r in boundaries if 0 < int(r) < grads.shape[0] + 1})
    mask = torch.zeros_like(grads, dtype=torch.bool)
    mask[at] = True
    return float(grads[mask].sum()), int(mask.sum()), float(grads[~mask].sum()), int((~mask).sum())


def seam_score(images: torch.Tensor | Sequence[torch.Tensor], boundaries: Iterable[int]) -> float:
    """Boundary-row gradient / other-row gradient, pooled over ``images`` (one boundary set)."""
    boundaries = list(boundaries)
    pics = [images] if isinstance(images, torch.Tensor) else list(images)
    on = n_on = off = n_off = 0
    for pic in pics:
        a, b, c, d = seam_sums(pic, boundaries)
        on, n_on, off, n_off = on + a, n_on + b, off + c, n_off + d
    if not n_on or not off:
        return float("nan")
    return (on / n_on) / (off / n_off)


def band_boundaries(plan) -> list[int]:
    """The latent rows where a band starts, the first excepted (none for a branch split)."""
    if plan.splits_branches:
        return []
    return [b.row_start for b in plan.bands if b.row_start > 0]
