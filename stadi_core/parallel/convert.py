"""Turn a model into its patch-parallel form, in place, on a copy the caller owns."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .context import BandContext
from .layers import PaddedInputs, PatchConv2d, PatchGroupNorm

# An attention adapter patches a family's self-attention modules; it gets the model,
# the context and a function handing out fresh layer ids, and returns how many it patched.
AttentionAdapter = Callable[[nn.Module, BandContext, Callable[[], int]], int]


def make_patch_parallel(model: nn.Module, ctx: BandContext, attention: AttentionAdapter | None = None,
                        first_id: int = 0) -> dict:
    """Wrap every context-needing layer of ``model``; returns counts per layer kind, and in ``"ids"``
    the layer ids it handed out (``first_id`` up to ``first_id + ids``).

    Convs whose kernel is 1 row tall, patchify convs (a DiT's patch embedding) and per-token
    layers need no context and stay. A second network on the same context (a ControlNet beside
    its UNet) starts its ids where the first one's end, so their exchanges never share a key.
    """
    counter = iter(range(first_id, 1 << 30))
    handed = []

    def next_id() -> int:  # a tiny id source shared with adapters
        handed.append(next(counter))
        return handed[-1]

    counts = {"conv": 0, "groupnorm": 0, "attention": 0}
    padded = PaddedInputs()  # one set of halo-padded input buffers for all the model's convs
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and _needs_rows(child):
                setattr(parent, name, PatchConv2d(child, ctx, next_id(), padded))
                counts["conv"] += 1
            elif isinstance(child, nn.GroupNorm):
                setattr(parent, name, PatchGroupNorm(child, ctx, next_id()))
                counts["groupnorm"] += 1
    if attention is not None:
        counts["attention"] = attention(model, ctx, next_id)
    counts["ids"] = len(handed)
    return counts


def _needs_rows(conv: nn.Conv2d) -> bool:
    """Whether a conv reads rows outside the band's own: not so for 1-row kernels, nor for
    unpadded kernel == stride convs (patchify), given bands aligned to the stride."""
    kh = conv.kernel_size[0]
    unpadded = conv.padding == "valid" or (not isinstance(conv.padding, str) and conv.padding[0] == 0)
    patchify = kh == conv.stride[0] and unpadded and conv.dilation[0] == 1
    return kh > 1 and not patchify
