"""Wrappers that make a row band compute what the whole image would compute.

They wrap the model's own modules (any ``nn.Conv2d`` / ``nn.GroupNorm`` subclass,
so ComfyUI's casting ops work too) and call them, rather than re-implementing them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from . import moments
from .context import BandContext


class PaddedInputs:
    """Halo-padded conv inputs, one buffer per shape, shared by every conv of that shape.

    A band conv reads its halo rows from the neighbours; writing band and halos into a
    preallocated buffer (one ``cat`` into it) replaces allocating zeros and a concatenated
    copy per layer. The rows at an image border are zeroed once and never written. Convs
    run one after another, so convs of one shape can share a buffer.
    """

    MAX_BUFFERS = 48  # a new plan's shapes replace the old ones' instead of piling up

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def fill(self, x: torch.Tensor, pad: int, top, bottom) -> torch.Tensor:
        b, c, h, w = x.shape
        if torch.compiler.is_compiling():  # dynamo refuses a strided out=; the compiler plans the memory itself
            zeros = x.new_zeros((b, c, pad, w))
            return torch.cat([zeros if top is None else top, x, zeros if bottom is None else bottom], dim=2)
        key = (b, c, h, w, pad, x.dtype, x.device, top is None, bottom is None)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= self.MAX_BUFFERS:
                self._buffers.clear()
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buf = self._buffers[key] = x.new_zeros((b, c, h + 2 * pad, w))
        start = 0 if top is not None else pad
        stop = h + 2 * pad if bottom is not None else h + pad
        torch.cat([t for t in (top, x, bottom) if t is not None], dim=2, out=buf.narrow(2, start, stop - start))
        return buf


class PatchConv2d(nn.Module):
    """A k x k convolution whose vertical padding comes from the neighbouring bands.

    The wrapped conv keeps its horizontal padding; its vertical padding is set to
    zero and replaced by halo rows (zeros at the image border, as zero padding).
    Works for stride 1 and for stride-2 downsampling when bands start on even rows.
    """

    def __init__(self, conv: nn.Conv2d, ctx: BandContext, layer_id: int, padded: PaddedInputs | None = None):
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
        self.padded = padded if padded is not None else PaddedInputs()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        top, bottom = self.ctx.halo(self.layer_id, x, self.pad)
        return self.inner(self.padded.fill(x, self.pad, top, bottom), *args, **kwargs)


class PatchGroupNorm(nn.Module):
    """GroupNorm whose statistics are those of the whole image, not of the band.

    A displaced call merges its fresh moments with a summary of the other bands' stale ones
    (kept current by the context at each sync step), then normalizes in one pass."""

    def __init__(self, norm: nn.GroupNorm, ctx: BandContext, layer_id: int):
        super().__init__()
        self.inner = norm
        self.ctx = ctx
        self.layer_id = layer_id
        self.affine = moments.AffineRepeats(norm) if norm.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, ctx = self.inner, self.ctx
        if ctx.world_size == 1 or ctx.local_only:
            return norm(x)  # the band is the whole image (or measured alone): the stock kernel
        g = norm.num_groups
        mean, var = moments.local_moments(x, g)
        counts = ctx.sizes_like(math.prod(x.shape[2:]), rows=x.shape[2] if x.dim() > 2 else None)
        local = torch.stack([mean, var]) if ctx.sending else None
        parts, summary = ctx.summarised(self.layer_id, local, 0, [2] * ctx.world_size, moments.others_summary,
                                        (ctx.rank, tuple(counts), x.shape[1] // g))
        if summary is not None:  # displaced: our fresh moments merged with the others' stale summary
            mean, var = moments.with_summary(mean, var, summary, counts[ctx.rank] / float(sum(counts)))
            return moments.normalize_per_channel(x, mean, var, self.affine, float(norm.eps)).to(x.dtype)
        mean, var = moments.merge(parts, counts)  # fresh: every band's moments are current
        rstd = torch.rsqrt(var + norm.eps)
        return moments.normalize(x, g, mean, rstd, norm.weight if norm.affine else None,
                                 norm.bias if norm.affine else None)
