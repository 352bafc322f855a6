"""GroupNorm statistics of the whole image from per-band moments (the math only; no communication).

Each band contributes its per-group (mean, biased variance) and its element count; Chan's
parallel merge weights them by count, so bands of different heights give the whole-image
statistics up to float rounding. In a displaced call the other bands' moments are stale
constants until the next sync step, so their part of the merge is folded once into a
two-tensor summary (``others_summary``) and each stale call adds its own moments with a few
elementwise ops (``with_summary``) and normalizes with one fused kernel (``normalize_per_channel``).
"""

from __future__ import annotations

from typing import Sequence

import torch


def local_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, group) mean and biased variance of ``x``, in float32."""
    xg = x.reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(xg if xg.dtype == torch.float32 else xg.float(), dim=-1, correction=0)
    return mean, var


def merge(parts: Sequence[torch.Tensor], counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image (mean, variance) from every band's stacked [mean, var] (Chan's merge)."""
    total = float(sum(counts))
    # python-scalar weights: no host-to-device copy, so this is legal inside CUDA graph capture
    mean = sum(p[0] * (n / total) for p, n in zip(parts, counts))
    var = sum((p[1] + (p[0] - mean) ** 2) * (n / total) for p, n in zip(parts, counts))
    return mean, var


def others_summary(parts: Sequence[torch.Tensor], rank: int, counts: Sequence[int], cpg: int):
    """(M, C) per channel: the other bands' weighted mean and their whole-image variance terms.

    With w0 our weight and W = 1 - w0, d = m0 - M: mean = M + w0 d and
    var = w0 v0 + w0 W d^2 + C, where C = sum_o w_o (v_o + (m_o - M)^2)
    (the parallel-axis theorem; no term cancels, so it holds in float as well as Chan's).
    Each group's value is repeated over its ``cpg`` channels here, once per sync step, so that a
    stale call's statistics come out at the resolution ``batch_norm`` takes without a copy.
    """
    total = float(sum(counts))
    others = [(p, n / total) for i, (p, n) in enumerate(zip(parts, counts)) if i != rank]
    big_w = sum(w for _, w in others)
    m = sum(p[0] * (w / big_w) for p, w in others)
    c = sum((p[1] + (p[0] - m) ** 2) * w for p, w in others)
    return tuple(t.unsqueeze(-1).expand(*t.shape, cpg).contiguous() for t in (m, c))


def with_summary(mean0: torch.Tensor, var0: torch.Tensor, summary, w0: float):
    """Whole-image per-channel (mean, var) from our fresh per-group moments and the others'
    summary: four small ops, already at channel resolution (broadcast against the summary)."""
    m, c = summary
    d = mean0.unsqueeze(-1) - m
    mean = torch.add(m, d, alpha=w0)
    var = torch.addcmul(c, d, d, value=w0 * (1.0 - w0)).add_(var0.unsqueeze(-1), alpha=w0)
    return mean, var


def normalize_per_channel(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, affine, eps: float) -> torch.Tensor:
    """GroupNorm's output from given per-channel statistics in ONE fused kernel: inference-mode
    ``batch_norm`` over ``x`` seen as one sample of batch x channels, with the statistics as its
    running estimates and ``affine`` (``AffineRepeats``) as its per-(sample, channel) weight and bias.
    It computes x * scale + shift with scale = rstd * weight, shift = bias - mean * scale, as the
    stock GroupNorm kernel does."""
    b, c = x.shape[:2]
    weight, bias = affine.get(b, x.device) if affine is not None else (None, None)
    y = torch.nn.functional.batch_norm(x.reshape(1, b * c, -1), mean.reshape(-1), var.reshape(-1), weight, bias,
                                       False, 0.0, eps)
    return y.reshape(x.shape)


class AffineRepeats:
    """A GroupNorm's weight and bias repeated once per sample (batch_norm's channels are samples x
    channels), kept between calls: rebuilt only when the batch, the device or the weights change
    (an in-place weight patch bumps the tensors' version counter)."""

    def __init__(self, norm):
        self.norm = norm
        self._key = None
        self._value = (None, None)

    def get(self, batch: int, device):
        w, b = self.norm.weight, self.norm.bias
        if torch.compiler.is_compiling():  # traced once into the graph, which fuses it; no cache to guard
            return tuple(None if t is None else t.to(device=device, dtype=torch.float32).repeat(batch) for t in (w, b))
        key = (batch, device, w.data_ptr(), _version(w), None if b is None else (b.data_ptr(), _version(b)))
        if key != self._key:
            with torch.inference_mode(False):
                self._value = tuple(None if t is None else t.detach().to(device=device, dtype=torch.float32)
                                    .repeat(batch) for t in (w, b))
            self._key = key
        return self._value


def _version(t: torch.Tensor):
    """The tensor's version counter; inference tensors (weights made under ``torch.inference_mode``, e.g.
    a network deep-copied there) have none and can only change in place inside inference mode: None."""
    return None if t.is_inference() else t._version


def normalize(x: torch.Tensor, num_groups: int, mean: torch.Tensor, rstd: torch.Tensor, weight, bias) -> torch.Tensor:
    """GroupNorm's output from given statistics: x * scale + shift per channel, as the stock kernel
    computes it (scale = rstd * weight, shift = bias - mean * scale), in one pass over ``x``."""
    b, c = x.shape[:2]
    cpg = c // num_groups
    rstd = rstd.unsqueeze(-1)
    if weight is not None:
        scale = rstd * weight.to(device=x.device, dtype=torch.float32).view(1, num_groups, cpg)
    else:
        scale = rstd.expand(b, num_groups, cpg)
    if bias is not None:
        shift = torch.addcmul(bias.to(device=x.device, dtype=torch.float32).view(1, num_groups, cpg),
                              mean.unsqueeze(-1), scale, value=-1.0)
    else:
        shift = -mean.unsqueeze(-1) * scale
    x4 = x.reshape(b, num_groups, cpg, -1)
    y = torch.addcmul(shift.unsqueeze(-1), x4, scale.unsqueeze(-1))
    return y.reshape(x.shape).to(x.dtype)
