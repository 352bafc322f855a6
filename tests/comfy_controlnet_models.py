"""Tiny random-weight ControlNets and a T2I-Adapter for the tiny SD1.5 and SDXL-family test models
(real-ComfyUI tests; STADI_COMFYUI_PATH).

* ``cn-sd15`` / ``cn-sdxl``: ComfyUI's own ``comfy.cldm.cldm.ControlNet`` built from the tiny UNet's
  config (``TINY_SD15_UNET_CONFIG`` / ``TINY_SDXL_CONFIG`` without ``out_channels``, 3 hint channels),
  saved in the ldm layout (``zero_convs.0.0.weight`` at the root) that ``ControlNetLoader`` detects.
  Weights as in random_fill: the zero convolutions are not zero, so every residual is large. The hint
  block's eight convolutions have their weights scaled by HINT_GAIN: at PyTorch's default scale they
  shrink the hint 200-fold (std 0.014 against 2.8 for the latent's path into the first block) and the
  hint would hardly matter; x3.2 makes both paths of the same size.
* ``clora-sd15``: a ControlNet-LoRA (``lora_controlnet`` key): only the hint block, zero convs and the
  middle block's output; ComfyUI copies the rest from the model's UNet at ``pre_run``.
* ``t2i-sdxl``: a full SDXL T2I-Adapter (``Adapter``, xl: 16x pixel unshuffle, features of 320/640/1280/1280
  channels, as ComfyUI's loader rebuilds it from ``conv_in``). The tiny SDXL-family UNet has 320 channels
  on every level, so its first features (320 channels at half the latent size, added after input block 3)
  apply and the wider ones are skipped with ComfyUI's "could not be applied" warning, by stock and STADI
  alike.

Each is built in a subprocess with the checkout's classes and checked by loading it back with
``comfy.controlnet.load_controlnet`` (the loader the nodes use): the detected class and every
weight must round-trip. Cached like the other tiny models.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from comfy_support import TINY_SD15_UNET_CONFIG, build_cached, comfyui_version, random_fill, require_comfyui

_BUILDER_VERSION = "tiny-controlnet-v2"
HINT_GAIN = 3.2  # the hint block's weights, scaled: see the module docstring
KINDS = {"cn-sd15": "ControlNet", "cn-sdxl": "ControlNet", "clora-sd15": "ControlLora", "t2i-sdxl": "T2IAdapter"}


def _unet_config(kind: str) -> dict:
    if kind.endswith("sdxl"):
        from comfy_dit_models import TINY_SDXL_CONFIG

        return dict(TINY_SDXL_CONFIG)
    return dict(TINY_SD15_UNET_CONFIG)


def _build_main(kind: str, out: str, seed: int, comfy_dir: str) -> None:
    """Runs in a subprocess with the ComfyUI checkout importable."""
    sys.path.insert(0, comfy_dir)
    import torch

    import comfy.options  # noqa: F401
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import comfy.t2i_adapter.adapter
    import safetensors.torch

    ops = comfy.ops.disable_weight_init
    gen = torch.Generator().manual_seed(int(seed))
    sd: dict = {}
    if kind == "t2i-sdxl":
        net = comfy.t2i_adapter.adapter.Adapter(cin=3 * 16 * 16, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1,
                                                sk=True, use_conv=False, xl=True)
        random_fill(sd, net, "", gen)
    else:
        config = {k: v for k, v in _unet_config(kind).items() if k != "out_channels"}
        net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float32, device="meta", operations=ops)
        random_fill(sd, net, "", gen)
        for k in sd:
            if k.startswith("input_hint_block.") and k.endswith(".weight"):
                sd[k] = (sd[k].float() * HINT_GAIN).to(sd[k].dtype)
        if kind == "clora-sd15":  # the ControlNet-LoRA layout: what the UNet does not have, and the marker
            sd = {k: v for k, v in sd.items()
                  if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
            sd["lora_controlnet"] = torch.tensor([])
    named = out + ".safetensors"  # ComfyUI's loader picks the format by the file name
    safetensors.torch.save_file(sd, named, metadata={"format": "pt", "stadi_test": f"{_BUILDER_VERSION} {kind}"})
    loaded = comfy.controlnet.load_controlnet(named)  # the loader ControlNetLoader calls
    if type(loaded).__name__ != KINDS[kind]:
        raise RuntimeError(f"{kind}: ComfyUI loaded a {type(loaded).__name__}, not {KINDS[kind]}")
    if kind in ("cn-sd15", "cn-sdxl"):
        got = loaded.control_model.state_dict()
        bad = sorted(k for k in sd if k not in got or not torch.equal(got[k].float(), sd[k].float()))
        if bad or set(got) != set(sd):
            raise RuntimeError(f"{kind}: weights do not round-trip: {bad[:5]} {sorted(set(got) ^ set(sd))[:5]}")
    os.replace(named, out)
    print(json.dumps({"kind": kind, "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}))


def write_tiny_control(kind: str, path, seed: int = 0, comfy: Path | None = None, timeout: float = 900.0) -> Path:
    """Write (a link to) the cached tiny ``kind`` control model (one of KINDS) at ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    comfy = Path(comfy) if comfy else require_comfyui()
    blob = json.dumps({"v": _BUILDER_VERSION, "kind": kind, "unet": _unet_config(kind), "seed": seed,
                       "comfy": comfyui_version(comfy)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return build_cached(f"tiny-{kind}-{key}", path, timeout,
                        lambda tmp: [sys.executable, str(Path(__file__).resolve()), kind, str(tmp), str(int(seed)),
                                     str(comfy)])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _build_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
