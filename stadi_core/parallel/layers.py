"""Wrappers that make a row band compute what the whole image would compute.

They wrap the model's own modules (any ``nn.Conv2d`` / ``nn.GroupNorm`` subclass,
so ComfyUI's casting ops work too) and call them, rather than re-implementing them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from .context import BandContext


class PatchConv2d(nn.Module):
    """A k x k convolution whose vertical padding comes from the neighbouring bands.

    The wrapped conv keeps its horizontal padding; its vertical padding is set to
    zero and replaced by halo rows (zeros at the image border, as zero padding).
    Works for stride 1 and for stride-2 downsampling when bands start on even rows.
    """

    def __init__(self, conv: nn.Conv2d, ctx: BandContext, layer_id: int):
        super().__init__()
        if isinstance(conv.padding, str):
            raise UnsupportedError(f"conv with padding={conv.padding!r} is not supported in patch-parallel mode")
        if conv.padding_mode != "zeros":
            raise UnsupportedError(f"conv with padding_mode={conv.padding_mode!r} is not supported")
        kh = conv.kernel_size[0]
        pad = conv.padding[0]
        if conv.dilation[0] != 1 or kh - 1 != 2 * pad:
            raise UnsupportedError(
                f"conv kernel {conv.kernel_size} padding {conv.padding} dilation {conv.dilation}: "
                "only 'same'-padded kernels can be split into row bands"
            )
        self.pad = pad
        conv.padding = (0, conv.padding[1])
        self.inner = conv
        self.ctx = ctx
        self.layer_id = layer_id

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        top, bottom = self.ctx.halo(self.layer_id, x, self.pad)
        return self.inner(torch.cat([top, x, bottom], dim=2), *args, **kwargs)


class PatchGroupNorm(nn.Module):
    """GroupNorm whose statistics are those of the whole image, not of the band."""

    def __init__(self, norm: nn.GroupNorm, ctx: BandContext, layer_id: int):
        super().__init__()
        self.inner = norm
        self.ctx = ctx
        self.layer_id = layer_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.inner
        b, c = x.shape[:2]
        g = norm.num_groups
        xg = x.reshape(b, g, -1).float()
        count = xg.shape[-1]
        mean = xg.mean(-1)
        m2 = ((xg - mean.unsqueeze(-1)) ** 2).sum(-1)
        g_mean, g_var = self.ctx.group_moments(self.layer_id, mean, m2, count, rows=x.shape[2] if x.dim() > 2 else None)
        y = (xg - g_mean.unsqueeze(-1)) * torch.rsqrt(g_var.unsqueeze(-1) + norm.eps)
        y = y.reshape(x.shape)
        if norm.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * norm.weight.to(y.dtype).reshape(shape) + norm.bias.to(y.dtype).reshape(shape)
        return y.to(x.dtype)
