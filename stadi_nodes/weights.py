"""UNet weights with LoRA and other weight patches baked in, written once for the workers.

The server never loads its own GPU copy: patched weights are computed on the CPU with
ComfyUI's own ``calculate_weight`` and written to shared memory (``/dev/shm`` where it
exists) as safetensors, which each worker reads. Cached per model identity + patch set.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading

import torch

_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()
_KEEP = 2  # baked files kept around (the current model and one more)


def _folder() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, f"stadi-weights-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def identity(model_patcher, dtype: torch.dtype) -> tuple:
    """Same key <=> same weights: the base model object, its patch set, and the dtype."""
    return (id(model_patcher.model), str(model_patcher.patches_uuid), str(dtype))


def baked_unet_file(model_patcher, dtype: torch.dtype) -> tuple[str, str]:
    """(path, key) of a safetensors file with the diffusion model's patched weights."""
    import comfy.lora
    from safetensors.torch import save_file

    ident = identity(model_patcher, dtype)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    with _LOCK:
        path = _CACHE.get(ident)
        if path and os.path.exists(path):
            return path, key
        prefix = "diffusion_model."
        state = {}
        for name, patches in model_patcher.get_key_patches(prefix).items():
            weight, convert = patches[0]
            if len(patches) > 1:
                weight = comfy.lora.calculate_weight(patches[1:], convert(weight.to(torch.float32, copy=True),
                                                                           inplace=True), name)
            state[name[len(prefix):]] = weight.to(device="cpu", dtype=dtype).contiguous()
        path = os.path.join(_folder(), f"unet-{key}.safetensors")
        save_file(state, path + ".partial")
        os.replace(path + ".partial", path)
        _CACHE[ident] = path
        for old in list(_CACHE)[:-_KEEP]:
            try:
                os.remove(_CACHE.pop(old))
            except OSError:
                pass
        return path, key
