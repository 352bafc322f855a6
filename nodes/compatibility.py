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


def check_model(model_patcher, lockstep: bool = False) -> str:
    """The worker family for this MODEL, or an error that says why it cannot run in bands.

    ``lockstep``: one sampler loop in the server (STADI Parallel Model, or the STADI Sampler
    without strides); wrappers, CFG functions and step caches then run there on full tensors.
    Per-rank loops (strides) refuse anything image-wide (``image_wide_features``).
    """
    diffusion_model = model_patcher.model.diffusion_model
    cls = type(diffusion_model)
    family = _family_by_class().get(f"{cls.__module__}:{cls.__qualname__}")
    if family is None:
        raise UnsupportedError(
            f"STADI: the {type(model_patcher.model).__name__} model ({cls.__name__}) is not supported by the "
            "patch-parallel engine yet (supported: SD1.x, SD2.x, SDXL, SD3/SD3.5 and Flux.1); use KSampler for "
            "this model"
        )
    _refuse_variants(model_patcher)
    opts = model_patcher.model_options
    t_opts = opts.get("transformer_options", {})
    if any(t_opts.get("patches", {}).values()) or any(t_opts.get("patches_replace", {}).values()):
        names = sorted(set(t_opts.get("patches", {})) | set(t_opts.get("patches_replace", {})))
        raise UnsupportedError(
            f"STADI: the model carries attention/block patches ({', '.join(names)}: IPAdapter, PAG, FreeU, "
            "attention couple and similar) that the workers cannot split into bands; remove them or use KSampler"
        )
    if getattr(model_patcher, "hook_patches", None):
        raise UnsupportedError("STADI: hook keyframes/weight hooks are not supported; use KSampler")
    network_patches = [k for k in getattr(model_patcher, "object_patches", {})
                       if k == "diffusion_model" or k.startswith("diffusion_model.") or "." in k]
    if network_patches:
        raise UnsupportedError(f"STADI: object patches {network_patches} replace parts of the network the workers "
                               "run; remove the node that adds them or use KSampler")
    if not lockstep:
        found = image_wide_features(model_patcher)
        if found:
            raise UnsupportedError(
                f"STADI Sampler with strides: {', '.join(found)} see(s) the whole image, but with strides each "
                "rank's sampler loop holds only its band: set strides off (one sampler loop, exact image) or "
                "remove that node")
    return family


def _refuse_variants(model_patcher) -> None:
    """Newer ComfyUI model types that reuse a supported network class (Flux.2, LongCat-Image...)."""
    from .comfy_api import refuse_unsupported_variants

    refuse_unsupported_variants(model_patcher)


LOCKSTEP_KEY = "stadi_lockstep"  # the wrapper key of a STADI Parallel Model (lockstep.py)


def refuse_second_stadi(model_patcher) -> None:
    """A MODEL that already went through a STADI Parallel Model must not get a second STADI layer: the
    outer one's sampling run would hold the workers while the inner one waits for them."""
    if any(LOCKSTEP_KEY in by_key for by_key in getattr(model_patcher, "wrappers", {}).values()):
        raise UnsupportedError("STADI: this MODEL already comes from a STADI Parallel Model, and it goes into a second "
                               "STADI node (a STADI Sampler or another STADI Parallel Model): keep one, the STADI "
                               "Parallel Model for stock sampler nodes or the STADI Sampler alone")


def image_wide_features(model_patcher) -> list[str]:
    """What on this MODEL computes over the whole image between network calls (CFG functions,
    wrappers, step caches): right in one sampler loop, wrong in per-rank loops."""
    opts = model_patcher.model_options
    found = []
    for key in ("sampler_cfg_function", "sampler_calc_cond_batch_function", "model_function_wrapper"):
        if opts.get(key) is not None:
            found.append(f"{key} {_name(opts[key])}")
    for key in ("sampler_pre_cfg_function", "sampler_post_cfg_function"):
        for fn in opts.get(key, []) or []:
            found.append(f"{key} {_name(fn)}")
    for wrapper_type, by_key in getattr(model_patcher, "wrappers", {}).items():
        for key, fns in by_key.items():
            if fns and key != LOCKSTEP_KEY:
                found.append(f"{wrapper_type} wrapper '{key}'" + (" (a step cache)" if "cache" in key.lower() else ""))
    return found


def _name(fn) -> str:
    """A CFG function's origin: e.g. comfy_extras.nodes_model_advanced.rescale_cfg (the RescaleCFG node)."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"({module}.{name.replace('.<locals>', '')})"


def check_guider_conds(guider, model_patcher=None, lockstep: bool = True) -> None:
    """The conditioning a guider samples with (any guider: CFGGuider, PerpNeg, DualCFG...); with the
    MODEL, also whether its ControlNets can run in bands."""
    all_conds = list((getattr(guider, "conds", None) or guider.original_conds).values())
    for conds in all_conds:
        check_conditioning([(None, c) for c in conds])
    if model_patcher is not None:
        check_controls(model_patcher, *all_conds, lockstep=lockstep)


def check_controls(model_patcher, *conds, lockstep: bool) -> None:
    """ControlNets / T2I-Adapters in the conditionings: SD1.x/SD2.x/SDXL UNets in one sampler loop
    (lockstep) take them; per-rank loops (strides) and the DiT families refuse them."""
    from stadi_core.models.spec import FAMILIES

    from .control_residuals import check_controls as check, controls_in

    controls = controls_in(*conds)
    if controls:
        family = check_model(model_patcher, lockstep=True)
        check(controls, type(model_patcher.model).__name__, FAMILIES[family], lockstep)


def check_conditioning(*conds) -> None:
    """ComfyUI CONDITIONING lists ([tensor, options] pairs) the workers cannot reproduce
    (ControlNets: ``check_controls``, which needs the model and the execution shape)."""
    for cond in conds:
        for _, extra in cond:
            if extra.get("gligen") is not None:
                raise UnsupportedError("STADI: GLIGEN conditioning is not supported; use KSampler")
            if extra.get("hooks") is not None:
                raise UnsupportedError("STADI: conditioning hooks are not supported; use KSampler")
            if extra.get("area") is not None:
                raise UnsupportedError("STADI: area conditioning evaluates crops of the latent, which "
                                       "cannot be split into bands; use KSampler")


def check_call_options(transformer_options: dict) -> None:
    """Patches added for a single model call (PAG and SAG do this from a post-CFG function)."""
    patches = [k for k, v in transformer_options.get("patches", {}).items() if v]
    replaced = [k for k, v in transformer_options.get("patches_replace", {}).items() if v]
    if patches or replaced:
        raise UnsupportedError(
            f"STADI: a node patches the model's attention for some calls ({', '.join(patches + replaced)}; "
            "e.g. Perturbed Attention Guidance, Self-Attention Guidance): the workers cannot reproduce it; remove "
            "that node or use KSampler"
        )


def guider_branches(guider) -> bool:
    """Whether the guider's network calls hold one cond and one uncond branch (CFG > 1).

    CFGGuider (KSampler, SamplerCustom) has exactly positive and negative and skips the uncond
    pass at cfg 1; BasicGuider (Flux) has no negative; DualCFG and PerpNeg add a third
    conditioning. Only the first kind can be split by branch.
    """
    conds = getattr(guider, "original_conds", None) or getattr(guider, "conds", None) or {}
    cfg = getattr(guider, "cfg", None)
    return set(conds) == {"positive", "negative"} and isinstance(cfg, (int, float)) and float(cfg) != 1.0
