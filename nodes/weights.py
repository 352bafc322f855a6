"""The weights the workers run, shared from the server's own memory (stadi_core/runtime/shared_memory.py).

- The diffusion network's *base* weights (as ComfyUI stores them, fp8 included) go into one
  anonymous memory file per model, and ComfyUI's own tensors are repointed at it, so the host
  keeps one copy: workers map those pages instead of reading a second and third copy from files.
- Weight patches (LoRA and the like) travel as the patches themselves, pickled into a small memory
  file per patch set; each worker applies them with ComfyUI's own ``calculate_weight`` and
  stochastic rounding, in the dtype and seed the server's ComfyUI uses (``comfy_api.lora_bake_settings``),
  so a LoRA change moves the LoRA, not the model. A patch that cannot be pickled (a merge whose
  convert function is a lambda) is computed here and shipped as its finished weight.
- A VAE (Patch Stitch, decode_on=devices) is shared the same way.

Nothing is written to ``/dev/shm`` or the temp dir: a memory file vanishes when the last process
holding it exits, however the server ends (SIGTERM, SIGKILL, Ctrl-C).
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import pickle
import threading
import weakref

import torch

from stadi_core.models.comfy_weights import patched_weight
from stadi_core.runtime.shared_memory import SharedFile, share_blob, share_tensors

_LOCK = threading.Lock()
_BASES: dict[int, tuple[SharedFile, dict]] = {}  # id(BaseModel) -> (memory file, its handle dict)
_PATCHES: dict[tuple, tuple[SharedFile, dict]] = {}  # (id(BaseModel), patches_uuid) -> patch blob
_PATCHES_KEPT = 2  # the current patch set and one more (alternating LoRA strengths stay warm)
_VAES: dict[int, tuple[SharedFile, dict, str]] = {}  # id(first_stage_model) -> (file, handle dict, key)
_PREFIX = "diffusion_model."
_log = logging.getLogger("stadi")


def identity(model_patcher) -> tuple:
    """Same key <=> same weights: the base model object and its patch set."""
    return (id(model_patcher.model), str(model_patcher.patches_uuid))


def _forget(cache: dict, key) -> None:
    """The model was garbage-collected: its id may be reused, so its memory file must not be."""
    entry = cache.pop(key, None)
    if entry is not None:
        entry[0].close()


def _base_handle(model_patcher, base_weights: dict) -> dict:
    """The model's base weights in shared memory, adopted by ComfyUI's tensors (once per model object).

    Not adopted when ComfyUI patches this model in place (``weight_inplace_update``): a LoRA
    written into the shared pages would change every worker's base weights.
    """
    model = model_patcher.model
    hit = _BASES.get(id(model))
    if hit is not None:
        return hit[1]
    adopt = not getattr(model_patcher, "weight_inplace_update", False)
    shared, handle = share_tensors(base_weights, adopt=adopt, label="network")
    dtypes = collections.Counter(str(t.dtype).removeprefix("torch.") for t in base_weights.values())
    _log.info("STADI: %d base weights shared with the workers (%.1f MB; %s), %s", len(base_weights),
              shared.size / 1e6, ", ".join(f"{k} {n}" for k, n in dtypes.most_common()),
              "the server's own tensors now live there" if adopt else "a copy: this model is patched in place")
    _BASES[id(model)] = (shared, handle.to_dict())
    weakref.finalize(model, _forget, _BASES, id(model))
    return _BASES[id(model)][1]


def _picklable(value) -> bytes | None:
    """The patch list pickled (tensors on the CPU), or None when it holds something unpicklable."""
    class CpuPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
                return obj.cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
            return NotImplemented

    buf = io.BytesIO()
    try:
        CpuPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return buf.getvalue()


def _patch_entries(model_patcher, key_patches: dict) -> dict:
    """{short name: ("patches", pickled list, patch dtype, intermediate dtype, seed) or ("weight", tensor)}."""
    import comfy.model_patcher

    from . import comfy_api

    entries = {}
    for name, patches in key_patches.items():
        if len(patches) < 2:
            continue
        weight = patches[0][0]
        if comfy.model_patcher.get_key_weight(model_patcher.model, name)[1] is not None:
            from stadi_core.errors import UnsupportedError

            raise UnsupportedError("STADI Sampler: LoRA on a scaled-fp8 model is not supported yet; load the "
                                   "model in fp8_e4m3fn/bf16/fp16 (UNETLoader weight_dtype) or use KSampler")
        patch_dtype, intermediate_dtype, seed_key = comfy_api.lora_bake_settings(model_patcher, name, weight)
        seed = comfy_api.string_to_seed(seed_key)
        blob = _picklable(patches[1:])
        short = name[len(_PREFIX):]
        if blob is None:
            entries[short] = ("weight", patched_weight(weight, patches[1:], name, patch_dtype, intermediate_dtype,
                                                       seed).to(device="cpu"))
        else:
            entries[short] = ("patches", blob, str(patch_dtype).removeprefix("torch."),
                              str(intermediate_dtype).removeprefix("torch."), seed)
    return entries


def patched_state_dict(model_patcher) -> dict:
    """The diffusion network's state dict (names without ``diffusion_model.``) with the patcher's weight
    patches applied as a loaded ComfyUI model has them, computed the way the workers compute them
    (``patched_weight``, ``comfy_api.lora_bake_settings``). For a ControlNet-LoRA, which copies the
    UNet's weights in the server."""
    from . import comfy_api

    out = {}
    for name, patches in model_patcher.get_key_patches(_PREFIX).items():
        weight = patches[0][0]
        if len(patches) > 1:
            patch_dtype, intermediate_dtype, seed_key = comfy_api.lora_bake_settings(model_patcher, name, weight)
            weight = patched_weight(weight, patches[1:], name, patch_dtype, intermediate_dtype,
                                    comfy_api.string_to_seed(seed_key))
        out[name[len(_PREFIX):]] = weight
    return out


def shared_network(model_patcher) -> dict:
    """The ModelSpec extras that tell workers where the network's weights are.

    ``{"shared_weights": handle, "weight_patches": handle or None, "weights_key": key}``: the base
    weights' memory file (one per model object, shared by all its clones), and the patch set's.
    Weights the workers cannot rebuild (quantized tensors, weight wrappers, per-layer attention
    configs) are refused first.
    """
    from . import comfy_api

    ident = identity(model_patcher)
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    with _LOCK:
        comfy_api.refuse_unrebuildable_weights(model_patcher)
        key_patches = None
        if id(model_patcher.model) not in _BASES or (ident not in _PATCHES and model_patcher.patches):
            key_patches = model_patcher.get_key_patches(_PREFIX)
        if id(model_patcher.model) not in _BASES:
            base = {name[len(_PREFIX):]: patches[0][0] for name, patches in key_patches.items()}
            _base_handle(model_patcher, base)
        base_handle = _BASES[id(model_patcher.model)][1]
        patch_handle = None
        if model_patcher.patches:
            if ident not in _PATCHES:
                entries = _patch_entries(model_patcher, key_patches)
                blob = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
                for old in list(_PATCHES)[:max(0, len(_PATCHES) - (_PATCHES_KEPT - 1))]:
                    _PATCHES.pop(old)[0].close()
                shared, handle = share_blob(blob, label="patches")
                _PATCHES[ident] = (shared, handle.to_dict())
                _log.info("STADI: %d patched weights shared with the workers (%.1f MB)", len(entries), len(blob) / 1e6)
            patch_handle = _PATCHES[ident][1]
        return {"shared_weights": base_handle, "weight_patches": patch_handle, "weights_key": key}


def shared_vae(vae) -> tuple[dict, str]:
    """(handle dict, key) of ``vae.first_stage_model``'s weights in shared memory, adopted by its tensors.

    A VAE carries no weight patches, so the model object is its identity; the key also includes the
    memory file's tag, so a later VAE that happens to get a collected one's id is a new key.
    """
    model = vae.first_stage_model
    if model is None:
        from stadi_core.errors import UnsupportedError

        raise UnsupportedError("Patch Stitch: this VAE has no weights (ComfyUI could not detect it)")
    with _LOCK:
        hit = _VAES.get(id(model))
        if hit is not None:
            return hit[1], hit[2]
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        state = {k: live.get(k, v) for k, v in vae.get_sd().items()}  # the module's own tensors, to adopt
        shared, handle = share_tensors(state, adopt=True, label="vae")
        key = hashlib.sha256(f"vae:{handle.pid}:{handle.tag}".encode()).hexdigest()[:16]
        for old in list(_VAES):  # one VAE shared at a time
            _forget(_VAES, old)
        _VAES[id(model)] = (shared, handle.to_dict(), key)
        weakref.finalize(model, _forget, _VAES, id(model))
        return handle.to_dict(), key
