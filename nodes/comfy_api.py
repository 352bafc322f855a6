"""The ComfyUI APIs whose shape differs between ComfyUI 0.3.64 and newer versions, behind one door.

Every shim here detects the feature (an attribute, a function, a parameter in a signature), never
a version string, so it keeps working on versions in between and on forks. What each one copes
with, and what was read where, is in docs/COMFYUI_COMPATIBILITY.md.

Importable without ComfyUI: comfy modules are imported inside the functions. Worker-side code
(stadi_core/models/comfy_*.py) cannot import this package; it adapts in place with the same
helpers (stadi_core.models.comfy_common.accepted_kwargs / call_by_keyword).
"""

from __future__ import annotations

import importlib

from stadi_core.errors import UnsupportedError

# ComfyUI network class -> the BaseModel classes (comfy.model_base) whose model the band adapter runs
SUPPORTED_BASES = {
    "comfy.ldm.flux.model:Flux": ("Flux",),  # Flux.1 dev / schnell / Fill (Kontext's reference latents are refused per call)
    "comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper": ("SD3",),  # SD3, SD3.5
}
# BaseModel / model_config class names of newer model types that reuse one of those networks
KNOWN_VARIANTS = {"Flux2": "Flux.2", "LongCatImage": "LongCat-Image"}
FLUX_NETWORK = "comfy.ldm.flux.model:Flux"
UNET_NETWORK = "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel"
# per-model transformer_options that change what the network computes; the workers never see them
NETWORK_OPTIONS = {
    "rope_options": "RoPE scale/shift options (e.g. a ScaleROPE node, or LongCat-Image's own)",
    "optimized_attention_override": "an attention-function override (set_model_optimized_attention)",
}


def comfy_nodes():
    """ComfyUI's own ``nodes`` module (KSampler's input lists), never this pack's ``nodes`` package.

    ComfyUI imports its ``nodes`` before it loads any pack, so inside ComfyUI it is in sys.modules;
    elsewhere a plain ``import nodes`` could find this pack's folder instead (the pack's directory
    is on sys.path for the workers' ``stadi_core``): refuse rather than import that.
    """
    import sys

    module = sys.modules.get("nodes")
    if module is None or not hasattr(module, "KSampler"):
        raise ImportError("ComfyUI's nodes module is not loaded: the STADI Sampler's inputs are KSampler's")
    return module


def _module(name: str):
    """``importlib.import_module(name)`` or None: a missing module is a missing feature."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


# -- small renames and moves -----------------------------------------------------------------------

def string_to_seed(data) -> int:
    """ComfyUI's CRC32 seed of a weight key (stochastic rounding). ``comfy.utils.string_to_seed`` in
    newer ComfyUI (the old ``comfy.model_patcher`` name logs a deprecation warning per call there),
    ``comfy.model_patcher.string_to_seed`` in 0.3.64."""
    utils = _module("comfy.utils")
    fn = getattr(utils, "string_to_seed", None)
    if fn is None:
        fn = getattr(_module("comfy.model_patcher"), "string_to_seed", None)
    if fn is None:
        raise UnsupportedError("this ComfyUI has no string_to_seed (comfy.utils or comfy.model_patcher); the baked "
                               "LoRA weights could not be rounded like ComfyUI does; use KSampler")
    return fn(data)


def load_nothing(executor, model, noise_shape, conds, model_options=None, **kwargs):
    """A PREPARE_SAMPLING wrapper that loads nothing (the workers hold the weights).

    ComfyUI 0.3.64 calls it with ``(model, noise_shape, conds, model_options=)``; newer versions add
    ``force_full_load=`` and ``force_offload=``: any further keyword is accepted and ignored. Returns
    what ``_prepare_sampling`` returns in both: ``(real_model, conds, additional_models)``.
    """
    return model.model, conds, []


def scaled_fp8_dtype(model_config):
    """``model_config.scaled_fp8`` (0.3.64), or None where the attribute is gone (newer ComfyUI loads
    scaled-fp8 files as quantized tensors: see ``quantized_weights``)."""
    return getattr(model_config, "scaled_fp8", None)


def compute_dtype(model_patcher):
    """The dtype the server's network computes in: a ``manual_cast_dtype`` object patch
    (``ModelPatcher.set_model_compute_dtype``, the ModelComputeDtype node) wins over the BaseModel's."""
    patches = getattr(model_patcher, "object_patches", {}) or {}
    if "manual_cast_dtype" in patches:
        return patches["manual_cast_dtype"]
    return getattr(model_patcher.model, "manual_cast_dtype", None)


def inference_dtype(model_patcher):
    """The dtype the network's inputs (and, under dynamic VRAM, its LoRA math) take on the server:
    ``BaseModel.get_dtype_inference()`` where it exists, else the compute dtype or the weights' dtype."""
    dtype = compute_dtype(model_patcher)
    if dtype is not None:
        return dtype
    base = model_patcher.model
    get = getattr(base, "get_dtype_inference", None) or getattr(base, "get_dtype", None)
    return get() if callable(get) else None


def is_dynamic(model_patcher) -> bool:
    """Whether the MODEL is a ``ModelPatcherDynamic`` (newer ComfyUI's dynamic VRAM; ``clone()`` keeps
    the class). 0.3.64's ModelPatcher has no ``is_dynamic``."""
    fn = getattr(model_patcher, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is ComfyUI's interrupt. It derives from ``Exception`` in 0.3.64 and from
    ``BaseException`` in newer ComfyUI: catch ``BaseException`` and ask this, never ``except Exception``."""
    mm = _module("comfy.model_management")
    cls = getattr(mm, "InterruptProcessingException", None)
    return cls is not None and isinstance(exc, cls)


def lora_bake_settings(model_patcher, key: str, weight):
    """How ComfyUI computes a LoRA-patched weight, for baking the same one on the server:
    (dtype the weight is patched in, ``calculate_weight``'s ``intermediate_dtype``, the string that
    seeds the stochastic rounding back to the stored dtype).

    - 0.3.64 (``patch_weight_to_device``): float32, float32, the weight's key.
    - newer, plain ModelPatcher: ``comfy.model_management.lora_compute_dtype(load_device)`` (fp16 on
      most GPUs, float32 on CPU), float32, the key.
    - newer, ModelPatcherDynamic (``LowVramPatch`` at cast time): the inference dtype for both, and
      the module's name (``seed_key``) for the rounding of the resident copy.
    """
    import torch

    if is_dynamic(model_patcher):
        dtype = inference_dtype(model_patcher) or weight.dtype
        return dtype, dtype, key.rsplit(".", 1)[0]
    lora_dtype = getattr(_module("comfy.model_management"), "lora_compute_dtype", None)
    if lora_dtype is None:
        return torch.float32, torch.float32, key
    return lora_dtype(model_patcher.load_device), torch.float32, key


# -- refusals --------------------------------------------------------------------------------------

def _refuse(model_name: str, reason: str) -> None:
    raise UnsupportedError(f"STADI: the {model_name} model {reason}; the patch-parallel workers do not support it "
                           "yet (they would compute a different image); use KSampler for this model")


def _is_comfy_model(base) -> bool:
    return any(c.__module__ == "comfy.model_base" for c in type(base).__mro__)


def refuse_unsupported_variants(model_patcher) -> None:
    """Refuse model types that reuse a network class the band adapters run, but differ around it.

    Newer ComfyUI builds Flux.2 (``model_base.Flux2``, unet_config ``image_model: "flux2"``) and
    LongCat-Image (``model_base.LongCatImage``, which injects RoPE shifts per call) on the very
    ``comfy.ldm.flux.model.Flux`` class of Flux.1, so the network class alone does not tell them
    apart: the BaseModel class, the model_config class and Flux.2-only unet_config fields do.
    SD3's MMDiT class is accepted under ``model_base.SD3`` only. UNets with temporal layers
    (SVD) are refused: their attention runs over frames, not image rows. Per-model options that
    change the network's math but never reach the workers (RoPE options, an attention override)
    are refused for every model. Objects that are not ComfyUI models (test doubles) are judged by
    what they carry.
    """
    base = model_patcher.model
    network = getattr(base, "diffusion_model", None)
    net_path = _class_path(network)
    base_name = type(base).__name__
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__ if config is not None else None
    unet_config = getattr(config, "unet_config", None) or {}
    shown = KNOWN_VARIANTS.get(base_name) or KNOWN_VARIANTS.get(config_name or "") or base_name

    allowed = SUPPORTED_BASES.get(net_path)
    if allowed is not None:
        net_name = net_path.rsplit(":", 1)[-1]
        if _is_comfy_model(base) and not (type(base).__module__ == "comfy.model_base" and base_name in allowed):
            _refuse(shown, f"({base_name}) reuses the {net_name} network of {'/'.join(allowed)} but runs it "
                           "differently")
        if config_name in KNOWN_VARIANTS:
            _refuse(KNOWN_VARIANTS[config_name], f"(config {config_name}) reuses the {net_name} network")
    if net_path == FLUX_NETWORK:
        image_model = unet_config.get("image_model", "flux") if isinstance(unet_config, dict) else "flux"
        if image_model != "flux":
            _refuse(shown, f"(image_model {image_model!r}) reuses the Flux network")
        from stadi_core.models.comfy_flux import unverified_features

        found = unverified_features(dict(unet_config)) if isinstance(unet_config, dict) else []
        if found:
            _refuse(shown, f"uses Flux.2-era network options ({', '.join(found)})")
    if net_path == UNET_NETWORK and isinstance(unet_config, dict):
        temporal = [k for k in ("use_temporal_attention", "use_temporal_resblock") if unet_config.get(k)]
        if temporal:
            _refuse(shown, f"has temporal layers ({', '.join(temporal)}: a video model)")

    t_opts = (getattr(model_patcher, "model_options", None) or {}).get("transformer_options", {}) or {}
    options = [what for key, what in NETWORK_OPTIONS.items() if t_opts.get(key) is not None]
    if options:
        raise UnsupportedError(f"STADI: the MODEL carries {'; '.join(options)}, which the patch-parallel workers "
                               "cannot apply; remove the node that sets it or use KSampler")


def _is_quantized(tensor) -> bool:
    for t in (tensor, getattr(tensor, "data", None)):
        if t is not None and any(c.__name__ == "QuantizedTensor" for c in type(t).__mro__):
            return True
    return False


def refuse_unrebuildable_weights(model_patcher) -> None:
    """Refuse weights the workers cannot rebuild from a plain safetensors file of tensors.

    - quantized weights: newer ComfyUI loads scaled-fp8 (and nvfp4/mxfp8/int8...) checkpoints into
      ``QuantizedTensor`` s with mixed-precision layers chosen from ``model_config.quant_config``;
    - per-layer attention configs (``ComfyAttention.config``, e.g. Comfy Kitchen int8 attention),
      which the band attention would bypass;
    - weight wrappers (``ModelPatcher.add_weight_wrapper``): functions, not tensors.
    """
    base = model_patcher.model
    config = getattr(base, "model_config", None)
    if getattr(config, "quant_config", None):
        raise UnsupportedError("STADI: this model's weights are quantized (a scaled-fp8 / mixed-precision checkpoint, "
                               "which this ComfyUI loads as quantized tensors); the patch-parallel workers cannot "
                               "rebuild them: load a plain fp8_e4m3fn/bf16/fp16 model (UNETLoader weight_dtype) or use "
                               "KSampler")
    if getattr(model_patcher, "weight_wrapper_patches", None):
        raise UnsupportedError("STADI: a node wraps the model's weights (add_weight_wrapper); the workers run plain "
                               "weights: remove that node or use KSampler")
    network = getattr(base, "diffusion_model", None)
    modules = network.modules() if hasattr(network, "modules") else ()
    for module in modules:
        attention = getattr(module, "comfy_attention", None)
        if attention is not None and (getattr(attention, "config", None) is not None
                                      or getattr(attention, "function", None) is not None):
            raise UnsupportedError("STADI: this model sets its own attention per layer (a ComfyAttention config, e.g. "
                                   "Comfy Kitchen int8 attention), which the band attention would bypass; use KSampler")
        for name, param in list(module.named_parameters(recurse=False)) if hasattr(module, "named_parameters") else ():
            if _is_quantized(param):
                raise UnsupportedError(f"STADI: the weight {name} is a quantized tensor (scaled fp8 / nvfp4 / mxfp8 / "
                                       "int8 formats of this ComfyUI); the workers cannot rebuild it: load a plain "
                                       "fp8_e4m3fn/bf16/fp16 model or use KSampler")


def check_rebuildable(model_patcher) -> None:
    """Everything above: the model's type, its options and its weights."""
    refuse_unsupported_variants(model_patcher)
    refuse_unrebuildable_weights(model_patcher)
