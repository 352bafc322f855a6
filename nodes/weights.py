"""Diffusion-network weights with LoRA and other weight patches baked in, written once for the workers
(and a VAE's weights, for the Patch Stitch node's decode on the devices: ``baked_vae_file``).

The server never loads its own GPU copy: patched weights are computed on the CPU with
ComfyUI's own ``calculate_weight`` and written to shared memory (``/dev/shm`` where it
exists) as safetensors, which each worker reads. Cached per model identity + patch set.
Shared memory is RAM: the folder is removed when the server exits, and folders left by
servers that died without cleaning up are removed when the next one starts writing.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
import weakref


_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()
_KEEP = 2  # baked files kept around (the current model and one more)


_PREFIX = "stadi-weights-"
_SHM = "/dev/shm"
WEIGHTS_DIR_ENV = "STADI_WEIGHTS_DIR"  # where to write baked weights instead (a fast local disk)


def _bases() -> list[str]:
    """Candidate folders, preferred first: $STADI_WEIGHTS_DIR, else shared memory, else the temp dir."""
    if os.environ.get(WEIGHTS_DIR_ENV):
        return [os.environ[WEIGHTS_DIR_ENV]]
    shm = [_SHM] if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else []
    return shm + [tempfile.gettempdir()]


def _base(needed_bytes: int = 0) -> str:
    """The first candidate with room for ``needed_bytes`` and a margin: shared memory is RAM, and
    containers often give it only 64 MB (Docker's default), so big models go to the temp dir."""
    bases = _bases()
    for base in bases:
        os.makedirs(base, exist_ok=True)
        if shutil.disk_usage(base).free >= 2 * needed_bytes:
            return base
    from stadi_core.errors import StadiError

    raise StadiError(f"STADI Sampler: no room for the model's {needed_bytes / 2**30:.1f} GiB of weights in "
                     f"{', '.join(bases)}; free some space or set {WEIGHTS_DIR_ENV} to a folder with room")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(base: str) -> list[str]:
    """Remove weight folders of servers that are gone; returns what was removed."""
    removed = []
    for name in os.listdir(base):
        pid = name[len(_PREFIX):]
        if name.startswith(_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
    return removed


def remove_stale_weight_folders() -> list[str]:
    """Sweep every candidate folder (at server start and before each write)."""
    return [name for base in _bases() if os.path.isdir(base) for name in remove_stale_folders(base)]


def _folder(needed_bytes: int) -> str:
    remove_stale_weight_folders()
    path = os.path.join(_base(needed_bytes), f"{_PREFIX}{os.getpid()}")
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        atexit.register(shutil.rmtree, path, True)
    return path


def identity(model_patcher) -> tuple:
    """Same key <=> same weights: the base model object and its patch set."""
    return (id(model_patcher.model), str(model_patcher.patches_uuid))


def baked_network_file(model_patcher) -> tuple[str, str]:
    """(path, key) of a safetensors file with the diffusion model's patched weights.

    Every tensor keeps the dtype ComfyUI stores it in (fp8 weights stay fp8: the workers compute
    with the same manual-cast layers as the server). A patched tensor is computed the way the
    installed ComfyUI patches it (``comfy_api.lora_bake_settings``: float32 in 0.3.64's
    ``patch_weight_to_device``, ``lora_compute_dtype`` or the inference dtype in newer versions)
    and rounded back to the stored dtype with ComfyUI's stochastic rounding and seed (a plain cast
    for fp16/bf16/fp32). Weights the workers cannot rebuild (quantized tensors, weight wrappers,
    per-layer attention configs) are refused first.
    """
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    from safetensors.torch import save_file

    from . import comfy_api

    ident = identity(model_patcher)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    with _LOCK:
        path = _CACHE.get(ident)
        if path and os.path.exists(path):
            return path, key
        comfy_api.refuse_unrebuildable_weights(model_patcher)
        prefix = "diffusion_model."
        state = {}
        for name, patches in model_patcher.get_key_patches(prefix).items():
            weight, convert = patches[0]
            if len(patches) > 1:
                if comfy.model_patcher.get_key_weight(model_patcher.model, name)[1] is not None:
                    from stadi_core.errors import UnsupportedError

                    raise UnsupportedError("STADI Sampler: LoRA on a scaled-fp8 model is not supported yet; load the "
                                           "model in fp8_e4m3fn/bf16/fp16 (UNETLoader weight_dtype) or use KSampler")
                patch_dtype, intermediate_dtype, seed_key = comfy_api.lora_bake_settings(model_patcher, name, weight)
                patched = comfy.lora.calculate_weight(patches[1:], convert(weight.to(patch_dtype, copy=True),
                                                                           inplace=True), name,
                                                      intermediate_dtype=intermediate_dtype)
                seed = comfy_api.string_to_seed(seed_key)
                weight = comfy.float.stochastic_rounding(patched, weight.dtype, seed=seed)
            state[name[len(prefix):]] = weight.to(device="cpu").contiguous()
        needed = sum(t.numel() * t.element_size() for t in state.values())
        for old in list(_CACHE)[:len(_CACHE) - (_KEEP - 1)]:  # make room before writing the new one
            with contextlib.suppress(OSError):
                os.remove(_CACHE.pop(old))
        path = os.path.join(_folder(needed), f"network-{key}.safetensors")
        save_file(state, path + ".partial")
        os.replace(path + ".partial", path)
        _CACHE[ident] = path
        return path, key


# -- VAE weights (Patch Stitch, decode_on=devices) ----------------------------------------------
_VAE_CACHE: dict[int, tuple[str, str]] = {}  # id(first_stage_model) -> (path, key)
_VAE_SERIAL = itertools.count(1)
_VAE_KEEP = 1


def _forget_vae(ident: int, path: str) -> None:
    """The VAE's model was garbage-collected: its id may be reused, so its file must not be."""
    if _VAE_CACHE.get(ident, (None,))[0] == path:
        _VAE_CACHE.pop(ident, None)
    with contextlib.suppress(OSError):
        os.remove(path)


def baked_vae_file(vae) -> tuple[str, str]:
    """(path, key) of a safetensors file with ``vae.first_stage_model``'s state dict, written once per VAE.

    A VAE carries no weight patches, so the model object is its identity; the key also numbers
    the bake, so a later VAE that happens to get a collected one's id is a new key (workers cache
    their VAE by key). Tensors keep the VAE's dtype (``vae.vae_dtype``).
    """
    from safetensors.torch import save_file

    model = vae.first_stage_model
    if model is None:
        from stadi_core.errors import UnsupportedError

        raise UnsupportedError("Patch Stitch: this VAE has no weights (ComfyUI could not detect it)")
    ident = id(model)
    with _LOCK:
        hit = _VAE_CACHE.get(ident)
        if hit and os.path.exists(hit[0]):
            return hit
        state = {k: v.detach().to(device="cpu").contiguous() for k, v in vae.get_sd().items()}
        key = hashlib.sha256(f"vae:{os.getpid()}:{next(_VAE_SERIAL)}:{ident}".encode()).hexdigest()[:16]
        needed = sum(t.numel() * t.element_size() for t in state.values())
        for old in list(_VAE_CACHE)[:len(_VAE_CACHE) - (_VAE_KEEP - 1)]:
            with contextlib.suppress(OSError):
                os.remove(_VAE_CACHE.pop(old)[0])
        path = os.path.join(_folder(needed), f"vae-{key}.safetensors")
        save_file(state, path + ".partial")
        os.replace(path + ".partial", path)
        _VAE_CACHE[ident] = (path, key)
        weakref.finalize(model, _forget_vae, ident, path)
        return path, key
