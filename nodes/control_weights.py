"""A ControlNet's weights for the workers: shared once per identity through host memory, like the UNet's.

The worker rebuilds ``comfy.cldm.cldm.ControlNet`` the way it rebuilds the UNet
(``comfy_common.build_from_spec``: the class, a config, the server's dtypes and a shared-memory handle),
so the ControlNet travels as a ``ModelSpec`` of the UNet family whose ``model_class`` is the ControlNet.

- A ControlNet's config is what ComfyUI's loader detects from its weights
  (``model_detection.model_config_from_unet``, minus ``out_channels``, plus ``hint_channels``); it is
  checked against the loaded network (same names, same shapes) before anything is shared.
- A ControlNet-LoRA builds its network at ``pre_run`` from the model's UNet config and weights plus its
  own; its low-rank layers compute ``weight + up @ down`` at every call, which is baked here into plain
  weights (the same sum, once), so the worker runs a plain ControlNet. Its identity is its weights file
  and the model's (base object, patch set): a LoRA change on the model is a new ControlNet.

The memory file is kept while the ControlNet lives (a regular one) or for the last few identities
(ControlNet-LoRAs, rebuilt every run); a worker that mapped it keeps its pages.
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import torch

from stadi_core.errors import UnsupportedError
from stadi_core.runtime.shared_memory import share_tensors

_LOCK = threading.Lock()
_SHARED: dict = {}  # identity -> (SharedFile, spec dict)
_KEPT_LORAS = 4
_CLASS = "comfy.cldm.cldm:ControlNet"


def _name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _identity(link, model_patcher) -> tuple:
    import comfy.controlnet

    from .weights import identity

    if type(link) is comfy.controlnet.ControlLora:
        return ("lora", id(link.control_weights)) + identity(model_patcher)
    return ("net", id(link.control_model))


def baked_state(net: torch.nn.Module) -> dict:
    """``net``'s state dict with every ControlNet-LoRA layer's ``weight + up @ down`` computed as its
    forward computes it, and the ``up``/``down`` entries dropped."""
    state = {}
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        skip = {"up", "down"} | set(getattr(module, "_non_persistent_buffers_set", ()))
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if pname in skip:
                continue
            state[prefix + pname] = p
        up = getattr(module, "up", None)
        if up is not None and getattr(module, "weight", None) is not None:
            w = module.weight
            state[prefix + "weight"] = w + torch.mm(up.flatten(start_dim=1), module.down.flatten(start_dim=1)).reshape(
                w.shape).type(w.dtype)
    return state


def _config(link, model_patcher, state: dict) -> dict:
    import comfy.controlnet
    import comfy.model_detection

    if type(link) is comfy.controlnet.ControlLora:
        config = dict(model_patcher.model.model_config.unet_config)
    else:
        detected = comfy.model_detection.model_config_from_unet(state, "", True)  # what ComfyUI's loader does
        if detected is None:
            raise UnsupportedError("STADI: ComfyUI detects no UNet config in the ControlNet's weights")
        config = dict(detected.unet_config)
    config.pop("out_channels", None)
    config.pop("dtype", None)
    config.pop("device", None)
    config.pop("operations", None)
    config["hint_channels"] = int(state["input_hint_block.0.weight"].shape[1])
    return config


def _check(config: dict, state: dict) -> None:
    """The config rebuilds exactly the network the server loaded (names and shapes)."""
    import comfy.cldm.cldm
    import comfy.ops

    built = comfy.cldm.cldm.ControlNet(**config, dtype=torch.float32, device="meta",
                                       operations=comfy.ops.disable_weight_init).state_dict()
    want = {k: tuple(v.shape) for k, v in state.items()}
    got = {k: tuple(v.shape) for k, v in built.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got))[:3] or [k for k in want if want[k] != got.get(k)][:3]
        raise UnsupportedError(f"STADI: the ControlNet's detected config does not rebuild its network ({diff}); "
                               "set STADI_CONTROLNET=server or use KSampler")


def control_spec(link, model_patcher) -> tuple[str, dict]:
    """(key, ModelSpec dict) of ``link``'s network for the workers; its weights shared once per identity."""
    ident = _identity(link, model_patcher)
    with _LOCK:
        hit = _SHARED.get(ident)
        if hit is not None:
            return hit[1]["extra"]["weights_key"], hit[1]
        import comfy.cli_args

        from stadi_core.models.comfy_common import mirrored_args
        from stadi_core.models.spec import ModelSpec

        net = link.control_model
        state = baked_state(net)  # a regular ControlNet's own parameters: adopted by the shared pages below
        config = _config(link, model_patcher, state)
        _check(config, state)
        regular = ident[0] == "net"
        shared, handle = share_tensors(state, adopt=regular, label="controlnet")
        key = hashlib.sha256(f"controlnet:{handle.pid}:{handle.tag}".encode()).hexdigest()[:16]
        spec = ModelSpec(family="comfy-unet", config=config, dtype=_name(net.dtype),
                         extra={"comfy_args": mirrored_args(comfy.cli_args.args), "shared_weights": handle.to_dict(),
                                "weight_patches": None, "weights_key": key, "model_class": _CLASS, "keep_mapping": False,
                                "compute_dtype": _name(link.manual_cast_dtype)}).to_dict()
        if regular:
            weakref.finalize(net, _forget, ident)
        else:
            loras = [k for k in _SHARED if k[0] == "lora"]
            for old in loras[:max(0, len(loras) - (_KEPT_LORAS - 1))]:
                _forget(old)
        _SHARED[ident] = (shared, spec)
        return key, spec


def _forget(ident) -> None:
    entry = _SHARED.pop(ident, None)
    if entry is not None:
        entry[0].close()
