"""Adapter for ComfyUI's UNet (comfy.ldm openaimodel: SD1.5, SD2, SDXL) inside a worker.

Built like every ComfyUI family (``comfy_common.build_from_spec``); convs and GroupNorms are
made patch-parallel generically, and each transformer's self-attention gets the whole image's
keys and values (``BandSelfAttention``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from ..parallel import BandContext
from .comfy_common import build_from_spec, call_options, meta_network, model_sampling  # noqa: F401  (the family interface)

FAMILY = "comfy-unet"
TINY_CONFIGS: dict = {}
COMFY_CLASS = "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel"  # the ComfyUI network this adapter runs (SD1.x, SD2.x, SDXL)
COND_KEYS = ("y",)  # extra model inputs besides the context that this family accepts
TAKES_CONTROL = True  # ControlNet / T2I-Adapter residuals: cond["control"] (models/control_bands.py)
ANY_SIZE = True  # ComfyUI's UNet takes any latent size (ceil-sized downsamples, upsamples to the skip size)


def alignment(model) -> int:
    return 2 ** (len(model.channel_mult) - 1) if hasattr(model, "channel_mult") else 8


def latent_channels(model) -> int:
    return model.in_channels


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    options = call_options(model)  # empty in a worker; the exchange probe's attention route on a meta network
    extra = {"transformer_options": options} if options else {}
    return model(x, t, context=cond.get("context"), y=cond.get("y"), control=cond.get("control"), **extra)


def make_conditioning(model, batch: int, seed: int) -> dict:
    """Stand-in prompt embeddings shaped for this UNet (capability measurement, tests)."""
    gen = torch.Generator().manual_seed(seed)
    cross = next((m.attn2 for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"), None)
    dim = cross.to_k.in_features if cross is not None else 768
    cond = {"context": torch.randn(batch, 77, dim, generator=gen)}
    uncond = {"context": torch.zeros(batch, 77, dim)}
    if getattr(model, "num_classes", None) == "sequential":
        adm = model.label_emb[0][0].in_features
        cond["y"] = torch.randn(batch, adm, generator=gen)
        uncond["y"] = torch.zeros(batch, adm)
    return {"cond": cond, "uncond": uncond}


class BandSelfAttention(nn.Module):
    """ComfyUI CrossAttention used as self-attention: queries from the band, K/V of the whole image."""

    def __init__(self, inner: nn.Module, ctx: BandContext, layer_id: int):
        super().__init__()
        self.inner = inner
        self.ctx = ctx
        self.layer_id = layer_id

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        from comfy.ldm.modules.attention import optimized_attention

        if context is not None or value is not None or mask is not None:
            raise UnsupportedError("an attention patch (attn1_patch / IPAdapter-style) is active: "
                                   "STADI workers cannot split patched self-attention")
        inner = self.inner
        q = inner.to_q(x)
        k = inner.to_k(x)
        v = inner.to_v(x)
        kv = self.ctx.whole_tokens(self.layer_id, torch.cat([k, v], dim=-1), dim=1)
        k, v = kv.chunk(2, dim=-1)
        out = optimized_attention(q, k.contiguous(), v.contiguous(), inner.heads, attn_precision=inner.attn_precision,
                                  transformer_options=transformer_options)
        return inner.to_out(out)


def patch_attention(model, ctx: BandContext, next_id) -> int:
    """Swap every transformer block's self-attention (attn1) for the whole-image version."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "BasicTransformerBlock" and hasattr(module, "attn1"):
            if getattr(module, "disable_self_attn", False):
                continue  # attn1 attends to the text then: nothing spatial to share
            module.attn1 = BandSelfAttention(module.attn1, ctx, next_id())
            n += 1
    return n
