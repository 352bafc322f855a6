"""A worker's view of the server's ComfyUI weights: the base weights mapped from the server's memory,
weight patches (LoRA...) applied here with ComfyUI's own code (the server's side: nodes/weights.py).

The base mapping is kept across rebuilds of the network (a LoRA change rebuilds the network from
the same pages plus new patched tensors); only patched tensors are this worker's own memory.
"""

from __future__ import annotations

import pickle

import torch

from ..runtime.shared_memory import SharedHandle, open_blob, open_tensors

_BASE: dict[str, dict[str, torch.Tensor]] = {}  # memory-file tag -> name -> tensor over the server's pages
_PREFIX = "diffusion_model."


def base_weights(handle: dict, keep: bool = True) -> dict[str, torch.Tensor]:
    """The server's base weights, mapped once per memory file (one model per worker). ``keep=False``
    (a ControlNet, runtime/worker_controls.py): mapped for this build only, the network holds its pages."""
    shared = SharedHandle.from_dict(handle)
    if not keep:
        return open_tensors(shared)
    if shared.tag not in _BASE:
        _BASE.clear()  # the previous model's pages go with its network
        _BASE[shared.tag] = open_tensors(shared)
    return _BASE[shared.tag]


def apply_patches(base: dict[str, torch.Tensor], handle: dict | None) -> dict[str, torch.Tensor]:
    """``base`` with the server's weight patches applied the way the server's ComfyUI applies them."""
    state = dict(base)
    if not handle:
        return state
    entries = pickle.loads(open_blob(SharedHandle.from_dict(handle)))
    for name, entry in entries.items():
        if entry[0] == "weight":  # computed on the server (patches it could not send)
            state[name] = entry[1]
            continue
        _, blob, patch_dtype, intermediate_dtype, seed = entry
        state[name] = patched_weight(base[name], pickle.loads(blob), _PREFIX + name, getattr(torch, patch_dtype),
                                     getattr(torch, intermediate_dtype), seed)
    return state


def patched_weight(weight: torch.Tensor, patches: list, key: str, patch_dtype: torch.dtype,
                   intermediate_dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``weight`` with ``patches`` applied as ComfyUI applies them: ``calculate_weight`` on a copy in
    ``patch_dtype``, then stochastic rounding back to the stored dtype with ComfyUI's seed for ``key``.
    The workers use it, and the server for patches it cannot send."""
    import comfy.float
    import comfy.lora

    patched = comfy.lora.calculate_weight(patches, weight.to(patch_dtype, copy=True), key,
                                          intermediate_dtype=intermediate_dtype)
    return comfy.float.stochastic_rounding(patched, weight.dtype, seed=seed)


def comfy_state(extra: dict) -> dict[str, torch.Tensor]:
    """The network's state dict as the server's ComfyUI computes with it."""
    return apply_patches(base_weights(extra["shared_weights"], keep=extra.get("keep_mapping", True)),
                         extra.get("weight_patches"))
