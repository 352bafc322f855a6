"""Adapter for diffusers ``FluxTransformer2DModel`` (Flux.1 dev / schnell) under row-band parallelism.

The band loop works on (B, C, H, W) latents of 16 channels; Flux's transformer takes 2x2
patches packed into 64-wide tokens (the pipeline's ``_pack_latents``), so ``forward`` packs
the band, runs the transformer and unpacks its output. A band of latent rows
[row_start, row_start + rows) is then a contiguous run of row-major image tokens.

Attention is the only thing that couples bands:

* double-stream blocks: queries are the text tokens and the band's image tokens; keys/values
  are the text tokens and ALL image tokens (ours fresh, the others' from the band context);
* single-stream blocks: the same on the concatenated [text; image] sequence, gathering only
  its image part.

Keys are exchanged after qk-norm and RoPE, so every band's keys carry their own true
positions. Positions: the RoPE image ids of a band are (0, row_start // 2 + i, j), as in the
whole image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from .diffusers_sd3 import band_geometry, whole_image_kv
from .diffusers_sd3 import make_conditioning as sd3_conditioning

FAMILY = "diffusers-flux"

PACK = 2  # Flux packs 2x2 latent patches into one token

# Small random-weight Flux transformers with the real structure: double-stream then
# single-stream blocks, 3-axis RoPE (axes sum to the head dim 16), 64-wide packed tokens.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,  # dev-like: guidance-distilled, takes a guidance scale
    axes_dims_rope=(4, 6, 6),
)
TINY_FLUX_SCHNELL = dict(TINY_FLUX, guidance_embeds=False)
TINY_CONFIGS = {"tiny-flux": TINY_FLUX, "tiny-flux-schnell": TINY_FLUX_SCHNELL}

TEXT_TOKENS = 8  # stand-in prompt length of make_conditioning
GUIDANCE = 3.5  # the Flux pipeline's default embedded guidance
DEV_MU = 1.15  # ComfyUI's default Flux-dev time shift (exp(mu) in SD3's shift form)


def build(config: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_config(config)


def load(path: str) -> torch.nn.Module:
    """The transformer of a local diffusers Flux folder (the folder itself or its ``transformer/``)."""
    from .diffusers_folder import load_local

    return load_local("FluxTransformer2DModel", path, "transformer")


def alignment(model) -> int:
    """Latent rows per band unit: one row of packed 2x2 patches."""
    return PACK * model.config.patch_size


def latent_channels(model) -> int:
    """Channels of the unpacked latent: 64-wide tokens are 2x2 patches of 16 channels."""
    return model.config.in_channels // (PACK * PACK)


def model_sampling(model):
    """Rectified flow; Flux's transformer scales t by 1000 itself, so it takes t = sigma.

    Shift: Flux-dev (guidance-embedded) uses the exponential time shift with mu = 1.15,
    which equals SD3's shift form with shift = exp(1.15) (ComfyUI's default; the diffusers
    pipeline makes mu depend on resolution). Schnell is not shifted.
    """
    from ..sampling.model_sampling import FlowMatch

    shift = math.exp(DEV_MU) if model.config.guidance_embeds else 1.0
    return FlowMatch(shift=shift, multiplier=1.0)


def make_conditioning(model, batch: int, seed: int, tokens: int = TEXT_TOKENS) -> dict:
    """SD3's stand-in T5/CLIP embeddings (same shapes) plus Flux-dev's distilled guidance."""
    out = sd3_conditioning(model, batch, seed, tokens)
    if model.config.guidance_embeds:
        for part in out.values():
            part["guidance"] = torch.full((batch,), GUIDANCE)
    return out


# -- packing and positions --------------------------------------------------------------------
def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), row-major tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack`` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // PACK, w // PACK, d // (PACK * PACK), PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (PACK * PACK), h, w)


def image_ids(first_row: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """RoPE ids (0, row, col) of ``rows`` token rows starting at token row ``first_row``."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(first_row, first_row + rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Velocity prediction for ``x`` (a band or the whole latent, 16 channels), shaped like ``x``."""
    _, c, rows, width = x.shape
    if rows % PACK or width % PACK:
        raise UnsupportedError(f"latent of {rows}x{width} is not a multiple of Flux's 2x2 packing")
    if model.config.patch_size != 1:
        raise UnsupportedError(f"Flux transformer with patch_size {model.config.patch_size} is not supported")
    row_start, _ = band_geometry(model, rows)
    if row_start % PACK:
        raise UnsupportedError(f"band starts at latent row {row_start}, not on a 2-row patch boundary")
    context = cond["encoder_hidden_states"]
    state = getattr(model, "_stadi_flux", None)
    if state is not None:
        state.text_tokens = context.shape[1]  # where the single-stream blocks' image part starts
    img_ids = image_ids(row_start // PACK, rows // PACK, width // PACK, device=x.device)
    txt_ids = torch.zeros(context.shape[1], 3, device=x.device)
    out = model(
        pack(x),
        encoder_hidden_states=context,
        pooled_projections=cond["pooled_projections"],
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=cond.get("guidance") if model.config.guidance_embeds else None,
        return_dict=False,
    )[0]
    return unpack(out, rows, width)


# -- attention --------------------------------------------------------------------------------------
class _FluxBand:
    """What the processors share with ``forward``: the band context and the text length."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.text_tokens: int | None = None


class BandFluxAttention:
    """diffusers processor for Flux attention on a band (mirrors ``FluxAttnProcessor``, 0.42).

    Double-stream calls get the text separately (``encoder_hidden_states``); single-stream
    calls get [text; band image] concatenated, split at ``state.text_tokens``. Either way the
    image keys (after norm and RoPE) and values of the whole image come from one exchange.
    """

    def __init__(self, state: _FluxBand, layer_id: int):
        self.state = state
        self.layer_id = layer_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attention_mask is not None:
            raise UnsupportedError("masked Flux attention is not supported in bands")
        if getattr(attn, "fused_projections", False):
            raise UnsupportedError("fused Flux QKV projections are not supported in bands")
        q = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))  # (B, S, H, D)
        k = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            cq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            ck = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            cv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            q = torch.cat([attn.norm_added_q(cq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ck), k], dim=1)
            v = torch.cat([cv, v], dim=1)
            n_text = encoder_hidden_states.shape[1]
        elif encoder_hidden_states is None:
            n_text = self.state.text_tokens
            if n_text is None:
                raise RuntimeError("single-stream Flux attention called before forward set the text length")
        else:
            raise UnsupportedError("Flux cross-attention without added projections is not supported in bands")
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        k_img, v_img = whole_image_kv(self.state.ctx, self.layer_id, k[:, n_text:], v[:, n_text:])
        k = torch.cat([k[:, :n_text], k_img], dim=1)
        v = torch.cat([v[:, :n_text], v_img], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        txt, img = out[:, :n_text], out[:, n_text:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())


def patch_attention(model, ctx, next_id) -> int:
    """Give every Flux attention module the whole-image K/V processor; keep ``ctx`` for positions."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    state = _FluxBand(ctx)
    model._stadi_ctx = ctx
    model._stadi_flux = state
    n = 0
    for module in model.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(BandFluxAttention(state, next_id()))
            n += 1
    return n
