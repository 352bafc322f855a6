"""ControlNets and T2I-Adapters under STADI: what the server does with them (lockstep only).

ComfyUI itself decides, at every network call, which ControlNets apply (strength, start/end
percent, chains through ``previous_controlnet``, per-cond ControlNets, masks) and computes their
residuals on the whole latent (``calc_cond_batch`` -> ``ControlBase.get_control``). That runs
here in the server, unchanged; each band call then carries the band's rows of every residual
(``stadi_core/models/control_bands.py``) and the worker's UNet adds them as the full UNet would.

What this module adds around that:
- ``load_controls``: our PREPARE_SAMPLING wrapper loads no diffusion model in the server, but the
  ControlNets run here, so they are loaded as ComfyUI's ``_prepare_sampling`` loads them;
- ``check_controls``: refusals before the run (per-rank loops, non-UNet families, hooks);
- ``band_control``: one band's residuals for a BandCall.
"""

from __future__ import annotations

from stadi_core.errors import UnsupportedError
from stadi_core.models.control_bands import band_residuals, wire_bytes


def controls_in(*conds) -> list:
    """The ControlNet objects of ComfyUI conditionings: CONDITIONING lists of ``[tensor, options]`` pairs
    or a guider's converted lists of option dicts."""
    found = []
    for cond in conds:
        for item in cond or []:
            options = item[1] if isinstance(item, (list, tuple)) else item
            control = options.get("control") if isinstance(options, dict) else None
            if control is not None and not any(control is c for c in found):
                found.append(control)
    return found


def chain(control) -> list:
    """A ControlNet and every ``previous_controlnet`` it chains to, first the outermost."""
    out = []
    while control is not None:
        out.append(control)
        control = getattr(control, "previous_controlnet", None)
    return out


def check_controls(controls: list, model_name: str, adapter, lockstep: bool) -> None:
    """Refuse what the band workers cannot reproduce, before anything runs; each message names the fix."""
    if not controls:
        return
    names = sorted({type(c).__name__ for top in controls for c in chain(top)})
    if not getattr(adapter, "TAKES_CONTROL", False):
        raise UnsupportedError(
            f"STADI: ControlNets ({', '.join(names)}) with the {model_name} model are not supported in bands yet (their "
            "residuals are image tokens, not UNet feature maps); SD1.x, SD2.x and SDXL ControlNets and T2I-Adapters "
            "are; use KSampler for this workflow")
    if not lockstep:
        raise UnsupportedError(
            f"STADI Sampler with strides: a ControlNet ({', '.join(names)}) looks at the whole latent at every call, "
            "but with strides each rank's sampler loop holds only its band: set strides off (one sampler loop; "
            "exact mode equals KSampler) or use the STADI Parallel Model")
    for top in controls:
        for c in chain(top):
            if getattr(c, "extra_hooks", None) is not None:
                raise UnsupportedError(f"STADI: the ControlNet {type(c).__name__} carries hooks (extra_hooks), which "
                                       "the band workers cannot apply; remove them or use KSampler")


def load_controls(model_patcher, conds: dict) -> list:
    """Load the conditionings' ControlNets (and other additional models) as ComfyUI's ``_prepare_sampling``
    does, without the diffusion model (the workers hold it). Returns them: the sampler's cleanup
    (``cleanup_models``) releases them as it does after a stock run. Without a ControlNet: nothing, as before."""
    if not controls_in(*conds.values()):
        return []
    import comfy.model_management
    import comfy.sampler_helpers

    models, memory = comfy.sampler_helpers.get_additional_models(conds, model_patcher.model_dtype())
    if models:
        comfy.model_management.load_models_gpu(models, memory_required=memory, minimum_memory_required=memory)
    return models


def band_control(control, height: int, row_start: int, row_end: int, entries=None) -> dict | None:
    """One band's residuals for its BandCall (None when the call has no ControlNet)."""
    if control is None:
        return None
    return band_residuals(control, height, row_start, row_end, entries)


def call_control_bytes(call: dict) -> int:
    """Bytes of ControlNet residuals in one rank's BandCall fields (its band's, or its CFG-branch units')."""
    return wire_bytes(call.get("control")) + sum(wire_bytes(getattr(u, "control", None)) for u in call.get("units", []))


def control_note(records: list) -> list[str]:
    """The run report's note on what step 1 of docs/CONTROLNET.md cost: residual bytes sent to the ranks."""
    per_call = [sum(r.get("control_bytes", 0) for r in calls) for calls in zip(*records)]
    with_control = [b for b in per_call if b]
    if not with_control:
        return []
    total = sum(with_control)
    return [f"ControlNet: computed in the server; {len(with_control)} of {len(per_call)} calls sent the ranks their rows "
            f"of its residuals, {total / 1e6:.1f} MB in all ({total / len(with_control) / 1e6:.2f} MB per call)"]
