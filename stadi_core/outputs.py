"""Files a standalone run leaves behind: the latent, its picture with the plan beside it, the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def latent_preview(latent: torch.Tensor, scale: int = 8):
    """A PIL picture of the first sample's first three latent channels, for models without a VAE
    whose latent is not a picture (the random-weight tiny configs)."""
    from .pictures import image

    x = latent[0, :3].float()
    lo = x.flatten(1).quantile(0.01, dim=1).view(3, 1, 1)
    hi = x.flatten(1).quantile(0.99, dim=1).view(3, 1, 1)
    return image((x - lo) / (hi - lo).clamp_min(1e-6), scale)


def write_outputs(folder: Path, latent: torch.Tensor, report, adapter, plan) -> list[Path]:
    """latent.safetensors, report.json and either image.png + image_plan.png (a model whose output
    is a picture: tiny-shapes) or preview.png + preview_plan.png (a latent's first channels)."""
    from safetensors.torch import save_file

    from .pictures import image, plan_beside

    folder.mkdir(parents=True, exist_ok=True)
    to_rgb = getattr(adapter, "to_rgb", None)
    if to_rgb is not None:
        scale = max(1, 384 // max(latent.shape[-2:]))
        picture, name = image(to_rgb(latent)[0], scale), "image"
    else:
        picture, name = latent_preview(latent), "preview"
    paths = [folder / "latent.safetensors", folder / f"{name}.png", folder / f"{name}_plan.png", folder / "report.json"]
    save_file({"latent_tensor": latent.contiguous()}, str(paths[0]))
    picture.save(paths[1])
    plan_beside(picture, plan, latent.shape[-2]).save(paths[2])
    paths[3].write_text(json.dumps(report.to_dict(), indent=1))
    return paths
