"""What the band-splitting workers cannot reproduce, found before anything runs.

Each check names the feature and what to do instead; STADI refuses rather than
silently producing a different image.
"""

from __future__ import annotations

from stadi_core.errors import UnsupportedError

def _family_by_class() -> dict[str, str]:
    """ComfyUI network class -> the worker family that runs it in bands (adapters declare COMFY_CLASS)."""
    from stadi_core.models.spec import FAMILIES

    return {adapter.COMFY_CLASS: family for family, adapter in FAMILIES.items() if hasattr(adapter, "COMFY_CLASS")}


def check_model(model_patcher) -> str:
    """The worker family for this MODEL, or an error that says why it cannot run in bands."""
    diffusion_model = model_patcher.model.diffusion_model
    cls = type(diffusion_model)
    family = _family_by_class().get(f"{cls.__module__}:{cls.__qualname__}")
    if family is None:
        raise UnsupportedError(
            f"STADI Sampler: the {type(model_patcher.model).__name__} model ({cls.__name__}) is not supported by the "
            "patch-parallel engine yet (supported: SD1.x, SD2.x, SDXL, SD3/SD3.5 and Flux.1); use KSampler for "
            "this model"
        )
    opts = model_patcher.model_options
    t_opts = opts.get("transformer_options", {})
    if any(t_opts.get("patches", {}).values()) or any(t_opts.get("patches_replace", {}).values()):
        names = sorted(set(t_opts.get("patches", {})) | set(t_opts.get("patches_replace", {})))
        raise UnsupportedError(
            f"STADI Sampler: the model carries attention/block patches ({', '.join(names)}: IPAdapter, PAG, FreeU, "
            "attention couple and similar) that the workers cannot split into bands; remove them or use KSampler"
        )
    if opts.get("model_function_wrapper") is not None:
        raise UnsupportedError("STADI Sampler: a model_function_wrapper is set on the model (a node that wraps the "
                               "model call); remove it or use KSampler")
    network_wrappers = [k for k, v in getattr(model_patcher, "wrappers", {}).get("diffusion_model", {}).items() if v]
    if network_wrappers:
        raise UnsupportedError(f"STADI Sampler: a node wraps the diffusion network ({', '.join(network_wrappers)}; e.g. "
                               "step caching such as TeaCache); the workers run the plain network: remove it or use "
                               "KSampler")
    if getattr(model_patcher, "hook_patches", None):
        raise UnsupportedError("STADI Sampler: hook keyframes/weight hooks are not supported; use KSampler")
    other_objects = [k for k in getattr(model_patcher, "object_patches", {}) if k != "model_sampling"]
    if other_objects:
        raise UnsupportedError(f"STADI Sampler: object patches {other_objects} are not supported; use KSampler")
    return family


def check_conditioning(*conds) -> None:
    for cond in conds:
        for _, extra in cond:
            if extra.get("control") is not None:
                raise UnsupportedError("STADI Sampler: ControlNet / T2I adapters are not supported by the "
                                       "patch-parallel workers yet; use KSampler for this workflow")
            if extra.get("gligen") is not None:
                raise UnsupportedError("STADI Sampler: GLIGEN conditioning is not supported; use KSampler")
            if extra.get("hooks") is not None:
                raise UnsupportedError("STADI Sampler: conditioning hooks are not supported; use KSampler")
            if extra.get("area") is not None:
                raise UnsupportedError("STADI Sampler: area conditioning evaluates crops of the latent, which "
                                       "cannot be split into bands; use KSampler")


def check_call_options(transformer_options: dict) -> None:
    """Patches added for a single model call (PAG and SAG do this from a post-CFG function)."""
    patches = [k for k, v in transformer_options.get("patches", {}).items() if v]
    replaced = [k for k, v in transformer_options.get("patches_replace", {}).items() if v]
    if patches or replaced:
        raise UnsupportedError(
            f"STADI Sampler: a node patches the model's attention for some calls ({', '.join(patches + replaced)}; "
            "e.g. Perturbed Attention Guidance, Self-Attention Guidance): the workers cannot reproduce it; remove "
            "that node or use KSampler"
        )
