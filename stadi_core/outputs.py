"""Files a standalone run leaves behind: the latent, a preview picture, the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def latent_preview(latent: torch.Tensor, scale: int = 8):
    """A PIL picture of the first sample's first three latent channels (no VAE here)."""
    from PIL import Image

    x = latent[0, :3].float()
    lo = x.flatten(1).quantile(0.01, dim=1).view(3, 1, 1)
    hi = x.flatten(1).quantile(0.99, dim=1).view(3, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    arr = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_outputs(folder: Path, latent: torch.Tensor, report) -> list[Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "latent.safetensors", folder / "preview.png", folder / "report.json"]
    save_file({"latent_tensor": latent.contiguous()}, str(paths[0]))
    latent_preview(latent).save(paths[1])
    paths[2].write_text(json.dumps(report.to_dict(), indent=1))
    return paths
