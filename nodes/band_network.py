"""The stand-in diffusion network of one rank's sampler loop, and the private model shell it sits in.

ComfyUI's ``BaseModel._apply_model`` does everything around the network -- model_sampling's
input scaling, timestep mapping, extra conditioning, ``calculate_denoised`` -- and then calls
``self.diffusion_model(x, t, context=..., control=..., transformer_options=..., **extra)``.
Each rank's clone of the MODEL gets, through ComfyUI's object-patch mechanism, a
``BandNetwork`` as its ``diffusion_model``: it receives exactly the network's inputs for every
family (UNet, MMDiT, Flux) and hands them to that rank's worker. Everything else stays stock.

Object patches are applied when ComfyUI loads a model; the STADI Sampler loads nothing on the
server (the workers hold the weights), so ``private_shell`` applies them itself, to a shallow
copy of the BaseModel whose module table is its own: the shared model is never modified.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from stadi_core.errors import UnsupportedError


class BandNetwork(torch.nn.Module):
    """Forwards network calls to ``call``; reads anything else (dtype, patch size...) from the real one."""

    def __init__(self, real: torch.nn.Module, call: Callable, state: Callable | None = None):
        super().__init__()
        object.__setattr__(self, "_real", real)  # not a submodule: nothing may move or save it
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_state", state)

    def state_dict(self, *args, **kwargs):
        """Called directly (``diffusion_model.state_dict()``), the network's weights as the server's ComfyUI
        computes with them (``state``: base weights with the model's LoRA applied): a ControlNet-LoRA copies
        the UNet's encoder from here in its ``pre_run``, as it does from a loaded, patched UNet in a stock
        run. Inside a parent's state_dict (keyword arguments) or without ``state``: nothing, as before."""
        state = object.__getattribute__(self, "_state")
        if state is not None and not args and not kwargs:
            return state()
        return super().state_dict(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **extra):
        # the real networks run their DIFFUSION_MODEL wrappers (step caches such as EasyCache) around
        # their forward; so does this one, around the band call, with transformer_options last as they expect
        import comfy.patcher_extension as ext

        wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, transformer_options)
        return ext.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, control, transformer_options, **extra)

    def _forward(self, x, timesteps, context, control, transformer_options, **extra):
        return self._call(x, timesteps, context, control, transformer_options, extra)


def private_shell(model_patcher, **replace):
    """A shallow copy of the patcher's BaseModel with the patcher's object patches applied
    (then ``replace``'s attributes, e.g. ``diffusion_model=BandNetwork(...)``).

    The copy shares the network modules but owns its module, parameter and buffer tables and its
    per-loop state (``current_patcher``), so concurrent rank loops do not disturb each other or
    the model other nodes use.
    """
    import comfy.utils

    base = model_patcher.model
    shell = copy.copy(base)
    for table in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(shell, table, dict(getattr(base, table)))
    for name, obj in model_patcher.object_patches.items():
        if "." in name:  # would reach into the shared modules; compatibility refuses these first
            raise UnsupportedError(f"STADI Sampler: object patch {name!r} is not supported; use KSampler")
        comfy.utils.set_attr(shell, name, obj)
    for name, obj in replace.items():
        comfy.utils.set_attr(shell, name, obj)
    return shell
