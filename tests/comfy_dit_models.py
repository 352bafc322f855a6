"""Tiny random-weight SD3-, Flux- and SDXL-family diffusion models and CLIP-L / CLIP-G text encoders
for tests against a real ComfyUI checkout (STADI_COMFYUI_PATH).

* SD3: ComfyUI's MMDiT with SD3.5-medium's structure (RMS qk-norm, a dual-attention first
  block), 2 blocks of width 128 (ComfyUI derives width = 64 x depth), a 16x16 position table
  so a 12-row image is a real centre crop. Detected as ``SD3``.
* Flux: ComfyUI's detector fixes the width (3072, 24 heads, T5 context 4096), so the tiny one is
  narrow in depth only: one double- and one single-stream block, guidance-embedded (dev-like),
  CLIP-L pooled vector (768). Detected as ``Flux``.
* Flux Fill: the same with 96 input channels (latent + masked-image latent + 8x8-packed mask).
  Detected as ``FluxInpaint``.
* CLIP-L: loaded with ``CLIPLoader(type="sd3")``, ComfyUI's SD3 text encoder without CLIP-G and
  T5: context zero-padded to 4096, pooled 768 + 1280 zeros. Both models take exactly that.

* SDXL family: ComfyUI's detector matches Segmind Vega (SDXL's width, context 2048, the 2816-wide
  size/crop ``y`` conditioning) on the transformer depths alone, so a UNet with Vega's depths but
  every level at 320 channels is an SDXL-family model of 110M parameters. With CLIP-G (full
  width, 32 layers, as the detector requires) and CLIP-L through ``DualCLIPLoader(type=sdxl)``.

Files go under ``diffusion_models`` and ``text_encoders``; built in a subprocess with the
checkout's own classes, checked with its own detector, cached like the SD1.5 checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from comfy_support import build_cached, check_detected, comfyui_version, random_fill, require_comfyui

_BUILDER_VERSION = "tiny-dit-v1"

TINY_SD3_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms", "x_block_self_attn_layers": [0],
    "pos_embed_scaling_factor": None, "input_size": None,
}
TINY_FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
TINY_SDXL_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": 1, "context_dim": 2048,
    "use_spatial_transformer": True, "legacy": False, "num_heads": -1, "num_head_channels": 64,
    "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_temporal_resblock": False, "use_temporal_attention": False, "use_checkpoint": False,
}
TINY_FLUX_FILL_CONFIG = dict(TINY_FLUX_CONFIG, in_channels=96)
# kind -> the supported_models class ComfyUI must detect
KINDS = {"sd3": "SD3", "flux": "Flux", "flux-fill": "FluxInpaint", "sdxl": "Segmind_Vega", "clip-l": None,
         "clip-g": None}


def _build_main(kind: str, out: str, seed: int, comfy_dir: str) -> None:
    """Runs in a subprocess with the ComfyUI checkout importable."""
    sys.path.insert(0, comfy_dir)
    import torch

    import comfy.options  # noqa: F401
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.ops
    import safetensors.torch

    ops = comfy.ops.disable_weight_init
    gen = torch.Generator().manual_seed(int(seed))
    sd: dict = {}
    if kind == "clip-l":
        import comfy.sd1_clip

        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
        random_fill(sd, clip.transformer, "", gen)
    elif kind == "clip-g":
        import comfy.sdxl_clip

        clip = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float32)
        random_fill(sd, clip.transformer, "", gen)
    else:
        if kind == "sd3":
            from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper as cls
            config = TINY_SD3_CONFIG
        elif kind == "sdxl":
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel as cls
            config = TINY_SDXL_CONFIG
        else:
            from comfy.ldm.flux.model import Flux as cls
            config = TINY_FLUX_FILL_CONFIG if kind == "flux-fill" else TINY_FLUX_CONFIG
        net = cls(**config, dtype=torch.float32, device="meta", operations=ops)
        random_fill(sd, net, "", gen)
        check_detected(sd, "", KINDS[kind], cls, ops)
    safetensors.torch.save_file(sd, out, metadata={"format": "pt", "stadi_test": f"{_BUILDER_VERSION} {kind}"})
    print(json.dumps({"kind": kind, "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}))


def write_tiny_model(kind: str, path, seed: int = 0, comfy: Path | None = None, timeout: float = 900.0) -> Path:
    """Write (a link to) the cached tiny ``kind`` model (one of KINDS) at ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    comfy = Path(comfy) if comfy else require_comfyui()
    blob = json.dumps({"v": _BUILDER_VERSION, "kind": kind, "sd3": TINY_SD3_CONFIG, "flux": TINY_FLUX_CONFIG,
                       "sdxl": TINY_SDXL_CONFIG,
                       "seed": seed, "comfy": comfyui_version(comfy)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return build_cached(f"tiny-{kind}-{key}", path, timeout,
                        lambda tmp: [sys.executable, str(Path(__file__).resolve()), kind, str(tmp), str(int(seed)),
                                     str(comfy)])

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _build_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
