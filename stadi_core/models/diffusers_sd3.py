"""Adapter for diffusers ``SD3Transformer2DModel`` (SD3 / SD3.5 MMDiT) under row-band parallelism.

A band is latent rows [row_start, row_start + rows) of the whole image. With patch size p
its image tokens are a contiguous run of the whole image's row-major token sequence, so
each rank embeds and transforms only its own tokens; what couples the bands is attention:

* joint attention: queries are the band's image tokens and the text tokens; keys/values are
  ALL image tokens (ours fresh, the others' from the band context) plus the text tokens;
* SD3.5's second, image-only attention (``attn2``): the same without the text.

Positions: SD3's ``PatchEmbed`` centre-crops a fixed table (``pos_embed_max_size``) to the
input's size. A band takes the crop of the WHOLE image and keeps its own token rows; cropping
to the band's height would hand it the positions of some other place in the image.

The band geometry comes from the ``BandContext`` that ``patch_attention`` leaves on the model
(``model._stadi_ctx``); an unwrapped model (the single-process reference) is a band of one
that starts at row 0.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..errors import UnsupportedError

FAMILY = "diffusers-sd3"

# Small random-weight MMDiTs with SD3's structure: 2x2 patches of 16-channel latents, joint
# text+image attention, the last block context-pre-only. pos_embed_max_size 32 (tokens) leaves
# room for 64-latent-row images and makes the centre crop a real offset. head dim 16.
TINY_SD3 = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=32,  # = heads * head dim: the context stream's width
    pooled_projection_dim=32,
    pos_embed_max_size=32,
)
# SD3.5-medium-like: RMS qk-norm and a dual (image-only second attention) first block.
TINY_SD35 = dict(TINY_SD3, qk_norm="rms_norm", dual_attention_layers=(0,))
TINY_CONFIGS = {"tiny-sd3": TINY_SD3, "tiny-sd35": TINY_SD35}

TEXT_TOKENS = 8  # stand-in prompt length of make_conditioning


def build(config: dict) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_config(config)


def load(path: str) -> torch.nn.Module:
    """The transformer of a local diffusers SD3 folder (the folder itself or its ``transformer/``)."""
    from .diffusers_folder import load_local

    return load_local("SD3Transformer2DModel", path, "transformer")


def alignment(model) -> int:
    """Latent rows per band unit: one row of patches."""
    return model.config.patch_size


def latent_channels(model) -> int:
    return model.config.in_channels


def model_sampling(model):
    """Rectified flow with SD3's scheduler shift 3.0; the transformer takes t = 1000 * sigma."""
    from ..sampling.model_sampling import FlowMatch

    return FlowMatch(shift=3.0, multiplier=1000.0)


def make_conditioning(model, batch: int, seed: int, tokens: int = TEXT_TOKENS) -> dict:
    """Deterministic stand-in text embeddings (cond, uncond): random from ``seed``, no text encoder."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    cond = {
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
    }
    uncond = {
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=gen) * 0.1,
        "pooled_projections": torch.zeros(batch, cfg.pooled_projection_dim),
    }
    return {"cond": cond, "uncond": uncond}


# -- band geometry (shared with the Flux adapter) ------------------------------------------------
def band_geometry(model, rows: int) -> tuple[int, int]:
    """(first latent row of this band in the whole image, the whole image's latent rows).

    Without a band context (the unwrapped reference) the input is the whole image. A
    capability measurement (``ctx.local_only``) runs bands of any height alone: positions do
    not matter there, so it is treated as a whole image of its own height.
    """
    ctx = getattr(model, "_stadi_ctx", None)
    if ctx is None or ctx.local_only:
        return 0, rows
    start, total = ctx.row_start, ctx.total_rows
    if start + rows > total:
        raise UnsupportedError(
            f"a band of {rows} latent rows at row {start} does not fit the plan's {total}-row image"
        )
    return start, total


def whole_image_kv(ctx, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (batch, tokens, ...) of every band's image tokens, ours fresh: one exchange per call."""
    kv = ctx.whole_tokens(layer_id, torch.cat([k, v], dim=-1), dim=1)
    return kv.split([k.shape[-1], v.shape[-1]], dim=-1)


# -- network call ---------------------------------------------------------------------------------
def band_pos_embed(pos_embed, row_start: int, total_rows: int, rows: int, width: int) -> torch.Tensor:
    """The positional embedding of the band's tokens: the whole image's crop, the band's token rows."""
    p = pos_embed.patch_size
    whole = pos_embed.cropped_pos_embed(total_rows, width)  # (1, total/p * width/p, dim)
    cols = width // p
    return whole[:, (row_start // p) * cols : ((row_start + rows) // p) * cols]


def forward(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """Velocity prediction for ``x`` (a band or the whole latent), shaped like ``x``.

    Follows ``SD3Transformer2DModel.forward`` (diffusers 0.42) with the patch embedding's
    positions taken from the band's true place in the image.
    """
    b, _, rows, width = x.shape
    p = model.config.patch_size
    if rows % p or width % p:
        raise UnsupportedError(f"latent of {rows}x{width} is not a multiple of the patch size {p}")
    row_start, total_rows = band_geometry(model, rows)
    if row_start % p:
        raise UnsupportedError(f"band starts at latent row {row_start}, not on a patch boundary")
    pe = model.pos_embed
    if pe.pos_embed is None or not pe.pos_embed_max_size:
        raise UnsupportedError("SD3 transformer without a croppable positional table (pos_embed_max_size)")

    hidden = pe.proj(x).flatten(2).transpose(1, 2)
    if pe.layer_norm:
        hidden = pe.norm(hidden)
    hidden = (hidden + band_pos_embed(pe, row_start, total_rows, rows, width)).to(hidden.dtype).contiguous()
    temb = model.time_text_embed(t, cond["pooled_projections"])
    context = model.context_embedder(cond["encoder_hidden_states"])
    for block in model.transformer_blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    hidden = model.proj_out(model.norm_out(hidden, temb))

    h, w, c = rows // p, width // p, model.out_channels
    hidden = hidden.reshape(b, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(b, c, rows, width)


# -- attention --------------------------------------------------------------------------------------
class BandJointAttention:
    """diffusers processor for SD3's joint (and SD3.5's image-only) attention on a band.

    Mirrors ``JointAttnProcessor2_0``; the image keys/values (after qk-norm) are those of the
    whole image, exchanged once per call through the band context.
    """

    def __init__(self, ctx, layer_id: int):
        self.ctx = ctx
        self.layer_id = layer_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise UnsupportedError("masked joint attention is not supported in bands")
        batch, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split_heads(t):
            return t.view(batch, -1, heads, t.shape[-1] // heads)  # (B, S, H, D)

        q = split_heads(attn.to_q(hidden_states))
        k = split_heads(attn.to_k(hidden_states))
        v = split_heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        k, v = whole_image_kv(self.ctx, self.layer_id, k, v)

        if encoder_hidden_states is not None:
            cq = split_heads(attn.add_q_proj(encoder_hidden_states))
            ck = split_heads(attn.add_k_proj(encoder_hidden_states))
            cv = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q = torch.cat([q, cq], dim=1)  # image first, text after: JointAttnProcessor2_0's order
            k = torch.cat([k, ck], dim=1)
            v = torch.cat([v, cv], dim=1)

        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * q.shape[-1]).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if encoder_hidden_states is None:
            return img
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


def patch_attention(model, ctx, next_id) -> int:
    """Give every attention module of the MMDiT the whole-image K/V processor; keep ``ctx`` for positions."""
    from diffusers.models.attention_processor import Attention

    model._stadi_ctx = ctx
    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(BandJointAttention(ctx, next_id()))
            n += 1
    return n
