"""What model to run, in a form that crosses process boundaries, and the family registry.

A worker rebuilds the model from its ``ModelSpec``: a named tiny config or a config
dict initialised from a seed (tests, the default demo), or a local diffusers folder.
Adding a family is one module that provides: ``FAMILY``, ``TINY_CONFIGS``, ``build(config)``,
``load(path)``, ``alignment(model)``, ``latent_channels(model)``, ``forward(model, x, t, cond)``,
``patch_attention(model, ctx, next_id)``, ``model_sampling(model)`` and
``make_conditioning(model, batch, seed)``; a family whose model needs more than a config or a
folder (ComfyUI's, rebuilt from the server's config and baked weights) adds
``build_from_spec(spec, device)``, and a ComfyUI family names the network class it runs
(``COMFY_CLASS``, "module:QualName") and the extra model inputs it accepts (``COND_KEYS``): the
STADI Sampler picks the family from that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from types import ModuleType

import torch

from ..errors import UnsupportedError
from . import comfy_flux, comfy_mmdit, comfy_unet, diffusers_flux, diffusers_sd3, diffusers_unet, tiny_shapes

FAMILIES: dict[str, ModuleType] = {
    diffusers_unet.FAMILY: diffusers_unet,
    diffusers_sd3.FAMILY: diffusers_sd3,
    diffusers_flux.FAMILY: diffusers_flux,
    comfy_unet.FAMILY: comfy_unet,
    comfy_mmdit.FAMILY: comfy_mmdit,
    comfy_flux.FAMILY: comfy_flux,
    tiny_shapes.FAMILY: tiny_shapes,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          # storage only (ComfyUI's fp8 weights, computed in a higher precision by its manual-cast layers)
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class ModelSpec:
    family: str = diffusers_unet.FAMILY
    config: str | dict = "tiny-sd15"  # a name from the family's TINY_CONFIGS or a config dict
    seed: int = 0  # initialisation seed for random-weight models
    path: str | None = None  # a local diffusers model folder; overrides config/seed
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedError(f"unknown model family {self.family!r}: known are {', '.join(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise UnsupportedError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if isinstance(self.config, str) and self.path is None:
            known = named_configs(FAMILIES[self.family])
            if self.config not in known:
                raise UnsupportedError(f"unknown model config {self.config!r}: use one of {', '.join(known)}")

    def key(self) -> str:
        """Identity for caching a built model in a warm worker."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**d)

    @property
    def adapter(self) -> ModuleType:
        return FAMILIES[self.family]

    def resolved_config(self) -> dict:
        if isinstance(self.config, dict):
            return dict(self.config)
        return dict(named_configs(self.adapter)[self.config])


def named_configs(adapter: ModuleType) -> dict:
    """Tiny test configs plus, where a family has them, the full architectures (random weights)."""
    return {**getattr(adapter, "TINY_CONFIGS", {}), **getattr(adapter, "FULL_CONFIGS", {})}


# diffusers network class (a folder's transformer/ or unet/ config.json) -> family
FOLDER_CLASSES = {"UNet2DConditionModel": diffusers_unet.FAMILY, "SD3Transformer2DModel": diffusers_sd3.FAMILY,
                  "FluxTransformer2DModel": diffusers_flux.FAMILY}


def model_spec_for(model: str, dtype: str = "float32") -> ModelSpec:
    """A spec from what a user types: a named config of any family (``tiny-sd15``, ``tiny-sd3``,
    ``tiny-flux``, ``sdxl``...) or a local diffusers folder (UNet, SD3 or Flux, read from its config)."""
    import os

    if os.path.isdir(model):
        path = os.path.abspath(model)
        for sub in ("unet", "transformer", ""):
            config = os.path.join(path, sub, "config.json")
            if os.path.isfile(config):
                with open(config) as fh:
                    cls = json.load(fh).get("_class_name")
                if cls in FOLDER_CLASSES:
                    return ModelSpec(family=FOLDER_CLASSES[cls], path=path, config="local", dtype=dtype)
        raise UnsupportedError(f"{model}: no UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel "
                               "config.json in the folder, its unet/ or its transformer/")
    for family, adapter in FAMILIES.items():
        if model in named_configs(adapter):
            return ModelSpec(family=family, config=model, dtype=dtype)
    known = [name for adapter in FAMILIES.values() for name in named_configs(adapter)]
    raise UnsupportedError(f"unknown model {model!r}: use a local diffusers folder or one of {', '.join(known)}")


def family_adapter(spec: ModelSpec) -> ModuleType:
    return spec.adapter


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model in eval mode on ``device``; identical weights in every process for a seed."""
    adapter = spec.adapter
    if hasattr(adapter, "build_from_spec"):  # families that need more than a config or a folder
        return adapter.build_from_spec(spec, device).eval().requires_grad_(False)
    if spec.path is not None:
        model = adapter.load(spec.path)
    else:
        # initialise on the target device: a 2.6B-parameter random init is minutes on a CPU
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(spec.seed)
            model = adapter.build(spec.resolved_config())
    model = model.to(device=device)
    if DTYPES[spec.dtype] is not torch.float32:
        model = model.to(dtype=DTYPES[spec.dtype])
    return model.eval().requires_grad_(False)


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a network's inputs take: its compute dtype where its weights are stored narrower
    (ComfyUI's fp8 weights with manual-cast layers), else its weights' dtype."""
    return getattr(model, "_stadi_compute_dtype", None) or next(model.parameters()).dtype


def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint to confirm every rank built the same weights."""
    total = 0.0
    for i, p in enumerate(model.state_dict().values()):
        if p.is_floating_point():
            total += float(p.double().sum()) * (1 + (i % 7))
    return total


def make_conditioning(spec: ModelSpec, model: torch.nn.Module, batch: int, seed: int,
                      prompt: str | None = None) -> dict:
    """Prompt embeddings {"cond": ..., "uncond": ...}: the caption's for a family with a text encoder
    (tiny-shapes), else deterministic stand-ins drawn from ``seed``."""
    if not getattr(spec.adapter, "TAKES_PROMPT", False):
        if prompt:
            raise UnsupportedError(f"model family {spec.family} has no text encoder here, so a prompt cannot be "
                                   "used: drop the prompt or use the trained tiny-shapes model")
        return spec.adapter.make_conditioning(model, batch, seed)
    return spec.adapter.make_conditioning(model, batch, seed, prompt=prompt, weights=spec.adapter.weights_file(spec))


def batched_conditioning(conditioning: dict, cfg: float, device, dtype) -> dict:
    """[uncond; cond] concatenated as the network sees it under CFG (cond alone at cfg 1)."""
    cond, uncond = conditioning["cond"], conditioning["uncond"]
    keys = cond.keys()
    if cfg == 1.0:
        return {k: cond[k].to(device=device, dtype=dtype) for k in keys}
    return {k: torch.cat([uncond[k], cond[k]]).to(device=device, dtype=dtype) for k in keys}
