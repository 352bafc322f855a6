"""Diffusion-network weights with LoRA and other weight patches baked in, written once for the workers.

The server never loads its own GPU copy: patched weights are computed on the CPU with
ComfyUI's own ``calculate_weight`` and written to shared memory (``/dev/shm`` where it
exists) as safetensors, which each worker reads. Cached per model identity + patch set.
Shared memory is RAM: the folder is removed when the server exits, and folders left by
servers that died without cleaning up are removed when the next one starts writing.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading

import torch

_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()
_KEEP = 2  # baked files kept around (the current model and one more)


_PREFIX = "stadi-weights-"


def _base() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(base: str | None = None) -> list[str]:
    """Remove weight folders of servers that are gone; returns what was removed."""
    base = base or _base()
    removed = []
    for name in os.listdir(base):
        pid = name[len(_PREFIX):]
        if name.startswith(_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
    return removed


def _folder() -> str:
    path = os.path.join(_base(), f"{_PREFIX}{os.getpid()}")
    if not os.path.isdir(path):
        remove_stale_folders()
        os.makedirs(path, exist_ok=True)
        atexit.register(shutil.rmtree, path, True)
    return path


def identity(model_patcher) -> tuple:
    """Same key <=> same weights: the base model object and its patch set."""
    return (id(model_patcher.model), str(model_patcher.patches_uuid))


def baked_network_file(model_patcher) -> tuple[str, str]:
    """(path, key) of a safetensors file with the diffusion model's patched weights.

    Every tensor keeps the dtype ComfyUI stores it in (fp8 weights stay fp8: the workers compute
    with the same manual-cast layers as the server). A patched tensor is computed in float32 and
    rounded back exactly as ComfyUI's ``patch_weight_to_device`` does (stochastic rounding seeded
    by its key, which is a plain cast for fp16/bf16/fp32).
    """
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    from safetensors.torch import save_file

    ident = identity(model_patcher)
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
                if comfy.model_patcher.get_key_weight(model_patcher.model, name)[1] is not None:
                    from stadi_core.errors import UnsupportedError

                    raise UnsupportedError("STADI Sampler: LoRA on a scaled-fp8 model is not supported yet; load the "
                                           "model in fp8_e4m3fn/bf16/fp16 (UNETLoader weight_dtype) or use KSampler")
                patched = comfy.lora.calculate_weight(patches[1:], convert(weight.to(torch.float32, copy=True),
                                                                           inplace=True), name)
                weight = comfy.float.stochastic_rounding(patched, weight.dtype, seed=comfy.model_patcher.string_to_seed(name))
            state[name[len(prefix):]] = weight.to(device="cpu").contiguous()
        path = os.path.join(_folder(), f"network-{key}.safetensors")
        save_file(state, path + ".partial")
        os.replace(path + ".partial", path)
        _CACHE[ident] = path
        for old in list(_CACHE)[:-_KEEP]:
            try:
                os.remove(_CACHE.pop(old))
            except OSError:
                pass
        return path, key
