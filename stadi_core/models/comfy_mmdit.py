"""Adapter for ComfyUI's MMDiT (SD3 / SD3.5: ``OpenAISignatureMMDITWrapper``) inside a worker.

A band of latent rows is a contiguous run of the whole image's patch tokens. The worker runs
ComfyUI's own blocks on the band's tokens; attention sees every band's image tokens through
``comfy_common.BandAttention`` (ComfyUI's attention override hook). Positions: SD3 centre-crops
a fixed table to the image size, so a band takes the crop of the WHOLE image and keeps its own
token rows (``band_pos_embed``) -- cropping to the band's height would place it elsewhere.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .comfy_common import (attach_band_attention, band_attention, build_from_spec, call_by_keyword,  # noqa: F401
                           call_options, meta_network, model_sampling)
from .diffusers_sd3 import band_geometry

FAMILY = "comfy-mmdit"
TINY_CONFIGS: dict = {}
COMFY_CLASS = "comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper"  # the ComfyUI network this adapter runs (SD3, SD3.5)
COND_KEYS = ("y",)  # extra model inputs besides the context that this family accepts


def patch_size(model) -> int:
    return model.x_embedder.patch_size[0]


def alignment(model) -> int:
    return patch_size(model)


def latent_channels(model) -> int:
    return model.in_channels


def make_conditioning(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = model.context_embedder.in_features if model.context_embedder is not None else 4096
    cond = {"context": torch.randn(batch, 16, ctx_dim, generator=gen)}
    uncond = {"context": torch.zeros(batch, 16, ctx_dim)}
    if model.y_embedder is not None:
        adm = model.y_embedder.mlp[0].in_features
        cond["y"] = torch.randn(batch, adm, generator=gen)
        uncond["y"] = torch.zeros(batch, adm)
    return {"cond": cond, "uncond": uncond}


def band_pos_embed(model, row_start: int, total_rows: int, rows: int, width: int) -> torch.Tensor:
    """Positions of the band's tokens: the whole image's crop, the band's token rows."""
    p = patch_size(model)
    whole = model.cropped_pos_embed((total_rows, width), device=None)  # (1, total/p * width/p, dim)
    cols = (width + 1) // p
    return whole[:, (row_start // p) * cols:((row_start + rows) // p) * cols]


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The network output for ``x`` (a band or the whole latent), shaped like ``x``.

    Follows ComfyUI's ``MMDiT.forward`` with the positions of the band's true place.
    """
    import comfy.ops

    _, _, rows, width = x.shape
    p = patch_size(model)
    if rows % p or width % p:
        raise UnsupportedError(f"latent of {rows}x{width} is not a multiple of the patch size {p}")
    row_start, total_rows = band_geometry(model, rows)
    if row_start % p:
        raise UnsupportedError(f"band starts at latent row {row_start}, not on a patch boundary")
    context, y = cond.get("context"), cond.get("y")
    if model.context_processor is not None:
        context = model.context_processor(context)
    pos = band_pos_embed(model, row_start, total_rows, rows, width).to(x.device)
    h = model.x_embedder(x) + comfy.ops.cast_to_input(pos, x)
    c = model.t_embedder(t, dtype=h.dtype)
    if y is not None and model.y_embedder is not None:
        c = c + model.y_embedder(y)
    if context is not None:
        context = model.context_embedder(context)
    attention = band_attention(model)
    options = call_options(model, attention.start((rows // p) * (width // p)) if attention is not None else {})
    # by keyword, only what this ComfyUI's signature has (0.3.64 and the newest read take
    # (x, c_mod, context, control, transformer_options); docs/COMFYUI_COMPATIBILITY.md)
    h = call_by_keyword(model.forward_core_with_concat, "MMDiT.forward_core_with_concat",
                        required=("x", "c_mod", "transformer_options") + (("context",) if context is not None else ()),
                        x=h, c_mod=c, context=context, control=None, transformer_options=options)
    if attention is not None:
        attention.finish()
    return model.unpatchify(h, hw=(rows, width))[:, :, :rows, :width]


def patch_attention(model, ctx, next_id) -> int:
    """One joint attention per block, plus the image-only second attention of SD3.5's dual blocks."""
    if model.register_length > 0:
        raise UnsupportedError("MMDiT with register tokens is not supported in bands")
    sites = sum(1 + int(bool(block.x_block.x_block_self_attn)) for block in model.joint_blocks)
    return attach_band_attention(model, ctx, next_id, sites)
