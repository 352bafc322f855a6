"""Adapter for ComfyUI's Flux (Flux.1 dev / schnell: ``comfy.ldm.flux.model.Flux``) inside a worker.

The band's latent rows are patchified with ComfyUI's own ``process_img`` given the band's row
offset, so its RoPE image ids are those of its true place in the image (a band whose ids start
at zero would be a defect). Double- and single-stream attention see every band's image tokens
through ``comfy_common.BandAttention``; Flux applies RoPE before the attention call, so the
exchanged keys carry their own positions.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .comfy_common import attach_band_attention, band_attention, build_from_spec, model_sampling  # noqa: F401
from .diffusers_sd3 import band_geometry

FAMILY = "comfy-flux"
TINY_CONFIGS: dict = {}
COMFY_CLASS = "comfy.ldm.flux.model:Flux"  # the ComfyUI network this adapter runs (Flux.1 dev / schnell)
COND_KEYS = ("y", "guidance")  # extra model inputs besides the context that this family accepts


def alignment(model) -> int:
    return model.patch_size


def latent_channels(model) -> int:
    return model.params.in_channels


def make_conditioning(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    p = model.params
    cond = {"context": torch.randn(batch, 16, p.context_in_dim, generator=gen),
            "y": torch.randn(batch, p.vec_in_dim, generator=gen)}
    uncond = {"context": torch.zeros(batch, 16, p.context_in_dim), "y": torch.zeros(batch, p.vec_in_dim)}
    if p.guidance_embed:
        for part in (cond, uncond):
            part["guidance"] = torch.full((batch,), 3.5)
    return {"cond": cond, "uncond": uncond}


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The network output for ``x`` (a band or the whole latent), shaped like ``x``.

    Follows ComfyUI's ``Flux._forward`` with the band's row offset in its image ids.
    """
    _, _, rows, width = x.shape
    p = model.patch_size
    if rows % p or width % p:
        raise UnsupportedError(f"latent of {rows}x{width} is not a multiple of Flux's {p}x{p} patches")
    row_start, _ = band_geometry(model, rows)
    if row_start % p:
        raise UnsupportedError(f"band starts at latent row {row_start}, not on a patch boundary")
    img, img_ids = model.process_img(x, h_offset=row_start)
    context = cond["context"]
    txt_ids = torch.zeros((x.shape[0], context.shape[1], 3), device=x.device, dtype=x.dtype)
    attention = band_attention(model)
    options = attention.start(img.shape[1]) if attention is not None else {}
    out = model.forward_orig(img, img_ids, context, txt_ids, t, cond.get("y"), cond.get("guidance"), None, options)
    if attention is not None:
        attention.finish()
    b, h, w = x.shape[0], rows // p, width // p  # tokens (b, h*w, c*p*p) -> latent (b, c, h*p, w*p)
    return out.view(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, rows, width)


def patch_attention(model, ctx, next_id) -> int:
    """One attention per double-stream and per single-stream block."""
    if any(getattr(block, "flipped_img_txt", False) for block in model.double_blocks):
        raise UnsupportedError("Flux variants with image-first attention are not supported in bands")
    return attach_band_attention(model, ctx, next_id, len(model.double_blocks) + len(model.single_blocks))
