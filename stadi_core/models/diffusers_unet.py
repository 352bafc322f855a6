"""Adapter for diffusers ``UNet2DConditionModel`` (SD1.5- and SDXL-style configs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ..parallel import BandContext

FAMILY = "diffusers-unet"

# Tiny random-weight configs that keep the real architectures' structure: SD1.5 has four
# levels (3 downsamples -> 8-row alignment) and cross-attention everywhere but the last;
# SDXL has three levels, linear projections, 2-block transformers and added conditioning.
TINY_SD15 = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=16,
)
TINY_SDXL = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=32,
    attention_head_dim=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=16,
)
TINY_CONFIGS = {"tiny-sd15": TINY_SD15, "tiny-sdxl": TINY_SDXL}

# The real architectures (random weights here: nothing is downloaded), for GPU benchmarks.
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
FULL_CONFIGS = {"sd15": SD15, "sdxl": SDXL}


def build(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def alignment(model) -> int:
    """Latent rows per band unit: the UNet's total downsampling factor."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def added_cond_dim(model) -> int | None:
    """Width of SDXL's pooled text embedding, or None for SD1.5-type models."""
    cfg = model.config
    if cfg.addition_embed_type != "text_time":
        return None
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """One network evaluation: epsilon prediction for ``x`` (a band or the whole latent)."""
    added = None
    if "text_embeds" in cond:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return model(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added, return_dict=False)[0]


class BandSelfAttention:
    """diffusers attention processor: queries from the band, keys/values from the whole image."""

    def __init__(self, ctx: BandContext, layer_id: int):
        self.ctx = ctx
        self.layer_id = layer_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None:
            raise UnsupportedError("self-attention with spatial/group norm or a mask is not supported in bands")
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        kv = self.ctx.whole_tokens(self.layer_id, torch.cat([k, v], dim=-1), dim=1)
        k, v = kv.chunk(2, dim=-1)
        head_dim = k.shape[-1] // attn.heads
        q = q.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = k.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def patch_attention(model, ctx: BandContext, next_id) -> int:
    """Give every self-attention module the whole-image K/V processor."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            module.set_processor(BandSelfAttention(ctx, next_id()))
            n += 1
    return n


def load(path: str) -> torch.nn.Module:
    """A UNet from a local diffusers folder (the folder itself or its ``unet/`` subfolder)."""
    from .diffusers_folder import load_local

    return load_local("UNet2DConditionModel", path, "unet")


def model_sampling(model):
    """SD1.5/SDXL: epsilon prediction on SD's scaled-linear DDPM schedule."""
    from ..sampling.model_sampling import EpsDiscrete

    return EpsDiscrete()


def latent_channels(model) -> int:
    return model.config.in_channels


def make_conditioning(model, batch: int, seed: int, tokens: int = 8) -> dict:
    """Deterministic stand-in prompt embeddings (cond, uncond) for text-encoder-free runs.

    The tiny default models have no text encoder; their "prompt" is a fixed random
    embedding drawn from ``seed`` so runs are reproducible and CFG is exercised.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = cfg.cross_attention_dim
    cond = {"context": torch.randn(batch, tokens, ctx_dim, generator=gen)}
    uncond = {"context": torch.randn(batch, tokens, ctx_dim, generator=gen) * 0.1}
    pooled = added_cond_dim(model)
    if pooled is not None:
        size = [float(cfg.sample_size * 8)] * 2
        time_ids = torch.tensor([size + [0.0, 0.0] + size] * batch)
        cond.update(text_embeds=torch.randn(batch, pooled, generator=gen), time_ids=time_ids)
        uncond.update(text_embeds=torch.zeros(batch, pooled), time_ids=time_ids)
    return {"cond": cond, "uncond": uncond}
