"""ControlNets that run in the worker, on its band, beside the UNet (step 2 of docs/CONTROLNET.md).

The server decides per call which ControlNets apply and with what strength (nodes/band_controls.py)
and sends each rank, once, the ControlNet's ``ModelSpec`` (weights in host shared memory, as the
UNet's) and its pixel rows of each hint. Here:

- each ControlNet is rebuilt once per weights key (``comfy_common.build_from_spec``) and made
  patch-parallel with the UNet family's layers on the UNet's band context: halo convs (the hint
  block's too: the band is given exactly its pixel rows, its 3x3 convs exchange their halos),
  global GroupNorm moments, whole-image self-attention K/V. Its layer ids start at
  ``first_id(key)``, away from the UNet's, so a ControlNet that runs in some calls only never
  shifts the UNet's exchange keys;
- per call, the active ControlNets run in the order ComfyUI computes them (innermost of the chain
  first) on the band's scaled input, timestep and conditioning (what ``get_control`` gives them: the
  same tensors the UNet gets), and are merged with ComfyUI's own ``ControlBase.control_merge``
  (strength, strength type, sum with the previous ControlNet's), inside the UNet's call: one
  ``begin_call``, so exact mode stays exact and displaced mode is displaced for both networks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import StadiError

ID_BLOCK = 1 << 12  # layer ids per network; ControlNets start at a multiple of it (UNet: 0)


def first_id(key: str) -> int:
    """Where a ControlNet's layer ids start: the same on every rank, apart from the UNet's and other ControlNets'."""
    return ID_BLOCK * (1 + int(key[:4], 16))


class WorkerControls:
    """The worker's ControlNets (kept across sessions, per weights key and band context) and this session's hints."""

    def __init__(self, device):
        self.device = device
        self.nets: dict[str, tuple] = {}  # weights key -> (network, band context it was made parallel on)
        self.used: set = set()  # keys the current session ran
        self.hints: dict[str, torch.Tensor] = {}
        self.residual_bytes = 0  # the last call's band residuals, as step 1 would have sent them (fp32 for bf16)

    def new_session(self) -> None:
        """Hints are per session; ControlNets the last session did not run are dropped (a GPU worker holds
        each one's weights on the device), so memory is bounded by one prompt's ControlNets."""
        self.hints = {}
        self.nets = {k: v for k, v in self.nets.items() if k in self.used}
        self.used = set()

    def receive(self, models: dict, hints: dict, ctx, unet) -> None:
        """Build the ControlNets named for the first time (or on a new band context), store new hint rows."""
        from ..models import comfy_unet
        from ..models.spec import ModelSpec, build_model
        from ..parallel import make_patch_parallel

        for key, spec_dict in (models or {}).items():
            self.used.add(key)
            held = self.nets.get(key)
            if held is not None and held[1] is ctx:
                continue
            base = first_id(key)
            unet_ids = getattr(unet, "_stadi_layer_ids", 0)
            if unet_ids > ID_BLOCK:
                raise StadiError(f"the UNet uses {unet_ids} band layer ids, more than the {ID_BLOCK} kept apart "
                                 "from a ControlNet's; set STADI_CONTROLNET=server")
            net = build_model(ModelSpec.from_dict(spec_dict), self.device)
            counts = make_patch_parallel(net, ctx, comfy_unet.patch_attention, first_id=base)
            if counts["ids"] > ID_BLOCK:
                raise StadiError(f"a ControlNet with {counts['ids']} band layers; set STADI_CONTROLNET=server")
            self.nets = {k: v for k, v in self.nets.items() if v[1] is ctx}  # a new context: the old nets go
            self.nets[key] = (net, ctx)
        for key, rows in (hints or {}).items():
            self.hints[key] = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def prepare(self, call, ctx, unet):
        """For a BandCall: the ``prepare`` step of the band's network call (``runner``), or None when no
        ControlNet runs on the band in this call."""
        entries = getattr(call, "controls", None)
        if not entries:
            return None
        self.receive(call.control_models, call.control_hints, ctx, unet)
        return self.runner(entries)

    def runner(self, entries: list):
        """``(x, t, cond) -> cond`` with ``cond["control"]``: the call's merged residuals for the band's UNet."""
        def run(x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
            merged = None
            for key, hint_key, strength, strength_type, with_y in entries:
                merged = self._one(key, hint_key, strength, strength_type, with_y, x, t, cond, merged)
            self.residual_bytes = sum(r.numel() * max(r.element_size(), 4 if r.dtype == torch.bfloat16 else 0)
                                      for items in (merged or {}).values() for r in items if r is not None)
            return {**cond, "control": merged}

        return run

    def _one(self, key, hint_key, strength, strength_type, with_y, x, t, cond, previous):
        import comfy.controlnet

        from ..models.spec import input_dtype

        if key not in self.nets or hint_key not in self.hints:
            raise StadiError(f"ControlNet {key} or its hint {hint_key} was named before it was sent in this session")
        net = self.nets[key][0]
        dtype = input_dtype(net)
        hint = self.hints[hint_key]
        channels = getattr(net, "in_channels", x.shape[1])
        extra = {}
        if with_y and cond.get("y") is not None:
            extra["y"] = cond["y"].to(dtype)
        residuals = net(x=x[:, :channels].to(dtype), hint=hint.to(dtype), timesteps=t.to(dtype),
                        context=cond["context"].to(dtype), **extra)
        merge = comfy.controlnet.ControlBase()  # ComfyUI's merge: strength, strength type, + the previous one's
        merge.strength = strength
        merge.strength_type = comfy.controlnet.StrengthType[strength_type]
        return merge.control_merge(residuals, previous, output_dtype=None)
