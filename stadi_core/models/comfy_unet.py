"""Adapter for ComfyUI's UNet (comfy.ldm openaimodel: SD1.5, SD2, SDXL) inside a worker.

The worker rebuilds ``UNetModel`` from the server's ``unet_config`` and a state dict the
server wrote with LoRA already baked in. ComfyUI is imported lazily, with its command line
options set the way the server had them, so this module is importable without ComfyUI.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UnsupportedError
from ..parallel import BandContext

FAMILY = "comfy-unet"
TINY_CONFIGS: dict = {}

# ComfyUI options that change how the UNet computes; mirrored from the server into workers.
MIRRORED_ARGS = ("use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention",
                 "disable_xformers", "use_sage_attention", "use_flash_attention", "force_upcast_attention",
                 "dont_upcast_attention")


def prepare_comfy(comfy_args: dict, cpu: bool) -> None:
    """Set ComfyUI's options before its modules read them at import time."""
    import comfy.cli_args

    args = comfy.cli_args.args
    for name, value in comfy_args.items():
        setattr(args, name, value)
    args.cpu = cpu


def build_from_spec(spec, device) -> nn.Module:
    from safetensors.torch import load_file

    extra = spec.extra
    prepare_comfy(extra.get("comfy_args", {}), cpu=torch.device(device).type == "cpu")
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(spec.config)
    dtype = getattr(torch, spec.dtype)
    config["dtype"] = dtype
    model = UNetModel(**config, device="cpu", operations=comfy.ops.disable_weight_init)
    state = load_file(spec.path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedError(f"the UNet weights do not match its config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype)


def alignment(model) -> int:
    return 2 ** (len(model.channel_mult) - 1) if hasattr(model, "channel_mult") else 8


def latent_channels(model) -> int:
    return model.in_channels


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return model(x, t, context=cond.get("context"), y=cond.get("y"))


def model_sampling(model):
    raise UnsupportedError("ComfyUI models sample in ComfyUI's own loop (the server), not in the worker")


def make_conditioning(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    dim = model.context_dim if hasattr(model, "context_dim") else 768
    cond = {"context": torch.randn(batch, 77, dim, generator=gen)}
    uncond = {"context": torch.zeros(batch, 77, dim)}
    if getattr(model, "num_classes", None) == "sequential":
        adm = model.adm_in_channels
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
