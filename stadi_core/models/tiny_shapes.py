"""The tiny-shapes family: a small UNet trained here on procedural scenes, shipped with the package.

Unlike the random-weight tiny configs its pictures mean something (a caption's shape, colour
and scene), so it is the yardstick for approximate modes: seams and drift show in the image.
It works in pixel space (3 channels, no VAE), predicts epsilon on SD's DDPM schedule and is a
diffusers ``UNet2DConditionModel``, so it reuses that family's band machinery. The caption
encoder (a token and slot embedding) runs on the server only: workers receive embeddings.

Weights: ``weights/tiny_shapes.safetensors`` beside this file, with a JSON sidecar holding its
sha256 and how it was trained (``python -m stadi_core train-tiny``). ``ModelSpec.extra["weights"]``
points a spec at another file (a fresh training run).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import StadiError
# the family interface where it is the diffusers UNet's own
from .diffusers_unet import alignment, build, forward, latent_channels, model_sampling, patch_attention  # noqa: F401
from .tiny_shapes_data import CAPTION_TOKENS, VOCAB, caption_for, tokenize

FAMILY = "tiny-shapes"
TAKES_PROMPT = True  # make_conditioning reads a caption
DEMO_SIZE = (64, 32)  # the command line's default picture: twice the training height
CONTEXT_DIM = 64
CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    # attention only at the 8x8 level: cheap enough to train on two CPU cores in half an hour
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_CONFIGS = {"tiny-shapes": CONFIG}
WEIGHTS = Path(__file__).with_name("weights") / "tiny_shapes.safetensors"


class CaptionEncoder(nn.Module):
    """Caption token ids (B, 4) -> cross-attention context (B, 4, CONTEXT_DIM)."""

    def __init__(self, dim: int = CONTEXT_DIM):
        super().__init__()
        self.token = nn.Embedding(len(VOCAB), dim)
        self.slot = nn.Embedding(CAPTION_TOKENS, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.token(ids) + self.slot.weight)


def weights_file(spec) -> Path:
    return Path(spec.extra.get("weights") or WEIGHTS)


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def load_state(path: str) -> dict:
    """The file's tensors after its checksum matched the sidecar's: {"unet.*", "text.*"}."""
    from safetensors.torch import load_file

    file, meta = Path(path), sidecar(Path(path))
    retrain = "retrain it with `python -m stadi_core train-tiny --ship` or reinstall the package"
    if not file.is_file() or not meta.is_file():
        raise StadiError(f"tiny-shapes weights missing: {file} (and its {meta.name}) should ship with the "
                         f"package; {retrain}")
    expected = json.loads(meta.read_text()).get("sha256")
    actual = sha256(file)
    if actual != expected:
        raise StadiError(f"tiny-shapes weights corrupt: {file} has sha256 {actual[:12]}..., its {meta.name} "
                         f"says {str(expected)[:12]}...; {retrain}")
    return load_file(str(file))


def split_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_from_spec(spec, device) -> nn.Module:
    """The trained UNet on ``device`` (the structure only on "meta": planning needs no weights)."""
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = build(spec.resolved_config())
    if str(device) == "meta":
        return model
    model.load_state_dict(split_state(load_state(str(weights_file(spec))), "unet."))
    return model.to(device)


@functools.lru_cache(maxsize=4)
def caption_encoder(path: str) -> CaptionEncoder:
    enc = CaptionEncoder()
    enc.load_state_dict(split_state(load_state(path), "text."))
    return enc.eval().requires_grad_(False)


def encode(captions: list[str | None], path: Path | str = WEIGHTS) -> torch.Tensor:
    ids = torch.tensor([tokenize(c) for c in captions])
    with torch.no_grad():
        return caption_encoder(str(path))(ids)


def make_conditioning(model, batch: int, seed: int, prompt: str | None = None, weights: Path | str = WEIGHTS) -> dict:
    """cond = the caption (``prompt``, else one drawn from ``seed``), uncond = the null caption."""
    caption = prompt_caption(prompt, seed)
    return {"cond": {"context": encode([caption] * batch, weights)},
            "uncond": {"context": encode([None] * batch, weights)}}


def prompt_caption(prompt: str | None, seed: int) -> str:
    """The caption a generation uses: the prompt, else one drawn from the seed."""
    return prompt if prompt else caption_for(seed)


def to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """The model's output is the picture: (B, 3, H, W) in [-1, 1] -> [0, 1]."""
    return ((latent.float() + 1) / 2).clamp(0, 1)
