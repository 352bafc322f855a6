"""Adapter for ComfyUI's Flux (Flux.1 dev / schnell: ``comfy.ldm.flux.model.Flux``) inside a worker.

The band's latent rows are patchified with ComfyUI's own ``process_img`` given the band's row
offset, so its RoPE image ids are those of its true place in the image (a band whose ids start
at zero would be a defect). Double- and single-stream attention see every band's image tokens
through ``comfy_common.BandAttention``; Flux applies RoPE before the attention call, so the
exchanged keys carry their own positions.

ComfyUI's Flux API moved between versions; this adapter detects what the installed one has
(docs/COMFYUI_COMPATIBILITY.md): ``process_img`` is a ``Flux`` method in 0.3.64 and a function of
``comfy.ldm.common_dit`` in newer versions; ``forward_orig`` gained ``timestep_zero_index`` before
``transformer_options``, so it is called by keyword; ``FluxParams`` gained Flux.2 fields
(``global_modulation``, ``txt_ids_dims``...) that this adapter has not been verified with.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import UnsupportedError
from .comfy_common import (attach_band_attention, band_attention, build_from_spec,  # noqa: F401
                           call_by_keyword, call_options, has_parameter, meta_network, model_sampling)
from .diffusers_sd3 import band_geometry

FAMILY = "comfy-flux"
TINY_CONFIGS: dict = {}
COMFY_CLASS = "comfy.ldm.flux.model:Flux"  # the ComfyUI network this adapter runs (Flux.1 dev / schnell)
COND_KEYS = ("y", "guidance")  # extra model inputs besides the context that this family accepts


def unverified_features(params) -> list[str]:
    """Flux.2-era ``FluxParams`` fields set away from Flux.1's values (the adapter runs Flux.1 only).

    ``params`` is a ``FluxParams`` or a ``unet_config`` dict; fields an older ComfyUI lacks count as
    Flux.1's defaults.
    """
    if isinstance(params, dict):
        get, has = params.get, params.__contains__
    else:
        def get(name, default=None):
            return getattr(params, name, default)

        def has(name):
            return hasattr(params, name)
    found = []
    for name in ("global_modulation", "mlp_silu_act", "yak_mlp", "txt_norm"):
        if get(name, False):
            found.append(name)
    if get("txt_ids_dims", None):
        found.append("txt_ids_dims")
    if get("ops_bias", True) is False:
        found.append("ops_bias=False")
    if has("vec_in_dim") and get("vec_in_dim") is None:
        found.append("no vec_in_dim")
    return found


def refuse_unverified(model) -> None:
    found = unverified_features(model.params)
    if found:
        raise UnsupportedError(f"this Flux variant ({', '.join(found)}: Flux.2 / LongCat-Image style) is not "
                               "supported in bands yet; use KSampler")


def patchify(model, x: torch.Tensor, h_offset: int):
    """(tokens, image ids) of ``x`` placed ``h_offset`` latent rows down, as ComfyUI's Flux does it.

    0.3.64: ``Flux.process_img(x, index, h_offset, w_offset)``; newer: the module function
    ``comfy.ldm.common_dit.process_img(x, index, h_offset, w_offset, patch_size, transformer_options)``.
    """
    method = getattr(model, "process_img", None)
    if callable(method):
        if not has_parameter(method, "h_offset"):
            raise UnsupportedError("this ComfyUI's Flux.process_img takes no h_offset: a band's positions cannot be "
                                   "placed; use KSampler")
        return method(x, h_offset=h_offset)
    try:
        common_dit = importlib.import_module("comfy.ldm.common_dit")
    except ImportError:
        common_dit = None
    fn = getattr(common_dit, "process_img", None)
    if fn is None:
        raise UnsupportedError("this ComfyUI has neither Flux.process_img nor comfy.ldm.common_dit.process_img; "
                               "use KSampler")
    return call_by_keyword(fn, "comfy.ldm.common_dit.process_img", required=("x", "h_offset", "patch_size"),
                           x=x, h_offset=h_offset, patch_size=model.patch_size)


def text_ids(model, batch: int, tokens: int, x: torch.Tensor) -> torch.Tensor:
    """Flux's text position ids, as its ``_forward`` makes them: zeros with one column per RoPE axis,
    in float32 where ``FluxParams`` has ``txt_ids_dims`` (newer ComfyUI), else in the input's dtype."""
    p = model.params
    axes = len(getattr(p, "axes_dim", ())) or 3
    dtype = torch.float32 if hasattr(p, "txt_ids_dims") else x.dtype
    if getattr(p, "txt_ids_dims", None):
        raise UnsupportedError("Flux variants with positional text ids (txt_ids_dims) are not supported in bands; "
                               "use KSampler")
    return torch.zeros((batch, tokens, axes), device=x.device, dtype=dtype)


def forward_orig(model, img, img_ids, txt, txt_ids, timesteps, y, guidance, transformer_options):
    """``Flux.forward_orig`` by keyword: 0.3.64's ``(..., control, transformer_options, attn_mask)`` and
    newer ``(..., control, timestep_zero_index, transformer_options, attn_mask)`` alike (a positional
    call would hand ``transformer_options`` to ``timestep_zero_index`` there)."""
    required = ("img", "img_ids", "txt", "txt_ids", "timesteps", "transformer_options")
    required += tuple(k for k, v in (("y", y), ("guidance", guidance)) if v is not None)
    return call_by_keyword(model.forward_orig, "Flux.forward_orig", required=required, img=img, img_ids=img_ids,
                           txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance, control=None,
                           transformer_options=transformer_options)


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
    refuse_unverified(model)
    img, img_ids = patchify(model, x, row_start)
    context = cond["context"]
    txt_ids = text_ids(model, x.shape[0], context.shape[1], x)
    attention = band_attention(model)
    options = call_options(model, attention.start(img.shape[1]) if attention is not None else {})
    out = forward_orig(model, img, img_ids, context, txt_ids, t, cond.get("y"), cond.get("guidance"), options)
    if attention is not None:
        attention.finish()
    b, h, w = x.shape[0], rows // p, width // p  # tokens (b, h*w, c*p*p) -> latent (b, c, h*p, w*p)
    return out.view(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, rows, width)


def patch_attention(model, ctx, next_id) -> int:
    """One attention per double-stream and per single-stream block."""
    refuse_unverified(model)
    if any(getattr(block, "flipped_img_txt", False) for block in model.double_blocks):
        raise UnsupportedError("Flux variants with image-first attention are not supported in bands")
    return attach_band_attention(model, ctx, next_id, len(model.double_blocks) + len(model.single_blocks))
