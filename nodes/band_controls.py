"""ControlNets that run in the workers, on their bands (step 2 of docs/CONTROLNET.md): the server side.

Step 1 (nodes/control_residuals.py) lets ComfyUI compute every ControlNet on the whole latent in the
server and sends each band its rows of the residuals, every call. Here the ControlNet network runs in
the worker instead, patch-parallel on the band beside the UNet (stadi_core/runtime/worker_controls.py),
so the server keeps only what ComfyUI decides and prepares:

- **which ControlNets apply, per call**: ``get_control``'s own walk of the ``previous_controlnet`` chain,
  each link skipped outside its ``timestep_range`` (which ComfyUI's ``pre_run`` set); the call carries
  (ControlNet, strength, strength type, hint) per active link, innermost first, as ComfyUI merges them;
- **the hint**: ComfyUI's own ``get_control`` runs on a copy of each link whose network is a
  ``_HintCatcher``: it upscales, preprocesses, VAE-encodes, concatenates and broadcasts the hint exactly
  as in a stock run, and the catcher keeps what the network would have been given. Each rank gets its
  pixel rows of a hint once per session, by key;
- **the weights**: once per ControlNet identity through host shared memory (nodes/control_weights.py).

This is installed on the loop's conds in PREPARE_SAMPLING (``worker_side``): each chain that can run in
the workers is replaced by a ``BandControlChain`` (the same object for every cond that shared the chain,
so ComfyUI batches cond and uncond as before). A chain with anything the worker cannot reproduce stays
as ComfyUI's object and goes the step-1 way (``why_not``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from stadi_core.errors import StadiError

from .control_residuals import chain

_TOKENS = itertools.count(1)


@dataclass
class BandControls:
    """What a network call gets as ``control`` when its ControlNets run in the workers.

    ``entries``: (model key, hint key, strength, strength type name, passes ``y``) per active link,
    innermost first; ``models``: model key -> ModelSpec dict; ``hints``: hint key -> the whole hint."""

    entries: list
    models: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)

    def signature(self) -> tuple:
        """Which networks and hints run (not the strengths): a change makes the call fresh."""
        return tuple((e[0], e[1]) for e in self.entries)


class _HintCatcher:
    """Stands in for a ControlNet's network inside ComfyUI's ``get_control``: keeps its inputs, computes nothing."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.kwargs: dict = {}

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return {}


def why_not(link) -> str | None:
    """Why a link of a chain cannot run in the workers (None: it can)."""
    import comfy.cldm.cldm
    import comfy.controlnet

    if type(link) not in (comfy.controlnet.ControlNet, comfy.controlnet.ControlLora):
        return f"{type(link).__name__} (T2I-Adapters and other kinds are computed once in the server)"
    if type(link) is comfy.controlnet.ControlNet and type(link.control_model) is not comfy.cldm.cldm.ControlNet:
        return f"a {type(link.control_model).__name__} network"
    if getattr(link, "global_average_pooling", False):
        return "global average pooling (an image-wide mean of every residual)"
    if getattr(link.control_model, "task_embedding", None) is not None:
        return "a Union ControlNet (an image-wide mean of the hint features)"
    if link.extra_args:
        return f"extra arguments {sorted(link.extra_args)}"
    if set(link.extra_conds) - {"y"}:
        return f"extra conditionings {sorted(set(link.extra_conds) - {'y'})}"
    if link.extra_hooks is not None:
        return "hooks"
    return None


class BandControlChain:
    """One conditioning's ControlNet chain, for ComfyUI's loop: ``get_control`` names what the workers run."""

    def __init__(self, top, model_patcher):
        self.original = top
        self.links = chain(top)[::-1]  # innermost first: get_control computes the previous ControlNet first
        self.model_patcher = model_patcher
        self.previous_controlnet = None  # ComfyUI walks chains for hooks: this one carries none
        self.extra_hooks = None
        self._copies: dict[int, object] = {}
        self._hint_keys: dict[tuple, str] = {}
        self._token = next(_TOKENS)

    # -- what ComfyUI's loop calls on a conditioning's control -------------------------------------------------
    def pre_run(self, model, percent_to_timestep_function):
        self.original.pre_run(model, percent_to_timestep_function)  # timestep ranges; a ControlLora builds its net

    def cleanup(self):
        self._copies.clear()
        self._hint_keys.clear()
        self.original.cleanup()

    def get_models(self):
        return []  # nothing to load in the server: the workers run the networks

    def inference_memory_requirements(self, dtype):
        return 0

    def get_extra_hooks(self):
        return self.original.get_extra_hooks()

    def get_instance_for_device(self, device):
        return self  # newer ComfyUI's multi-GPU batching asks; the chain names networks, it holds none

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if "crossattn_controlnet" in cond:
            raise StadiError("STADI: a ControlNet-specific text conditioning (crossattn_controlnet) reached a "
                             "ControlNet that runs in the workers; set STADI_CONTROLNET=server or use KSampler")
        out = BandControls([])
        for link in self.links:
            if link.timestep_range is not None and (t[0] > link.timestep_range[0] or t[0] < link.timestep_range[1]):
                continue  # ComfyUI's own test in get_control
            hint_key, hint = self._hint(link, x_noisy, t, cond, batched_number, transformer_options)
            from .control_weights import control_spec

            model_key, spec = control_spec(link, self.model_patcher)
            out.models[model_key] = spec
            out.hints[hint_key] = hint
            out.entries.append((model_key, hint_key, float(link.strength), link.strength_type.name,
                                "y" in link.extra_conds))
        return out if out.entries else None

    def _hint(self, link, x_noisy, t, cond, batched_number, transformer_options):
        """The hint ComfyUI gives ``link``'s network for this call, prepared by ComfyUI's ``get_control`` on a
        copy of ``link`` (its hint caches kept per copy, as the link's own are)."""
        ours = self._copies.get(id(link))
        if ours is None:
            ours = copy.copy(link)
            dtype = link.control_model.dtype
            ours.control_model = _HintCatcher(dtype)
            ours.previous_controlnet = None
            ours.timestep_range = None
            ours.cond_hint = None  # 0.3.64's cache
            if isinstance(getattr(link, "cond_hints", None), dict):
                ours.cond_hints = {}  # newer ComfyUI's cache: the copy's own
            self._copies[id(link)] = ours
        ours.get_control(x_noisy, t, cond, batched_number, transformer_options)
        hint = ours.control_model.kwargs["hint"]
        key = (id(link), tuple(hint.shape), int(batched_number))
        if key not in self._hint_keys:
            self._hint_keys[key] = f"h{self._token}.{len(self._hint_keys)}"
        return self._hint_keys[key], hint


def worker_side(conds: dict, model_patcher, adapter) -> tuple[dict, list[str]]:
    """The loop's conds with every ControlNet chain that can run in the workers replaced by a
    ``BandControlChain``, and notes for the chains that stay in the server (step 1) and why."""
    import os

    notes: list[str] = []
    if os.environ.get("STADI_CONTROLNET", "workers") == "server":
        return conds, ["ControlNet: STADI_CONTROLNET=server: computed in the server (step 1)"]
    if not getattr(adapter, "TAKES_CONTROL", False):
        return conds, notes
    cross = any("cross_attn_controlnet" in c for cs in conds.values() for c in cs or [] if isinstance(c, dict))
    proxies: dict[int, BandControlChain | None] = {}
    out = {}
    for name, items in conds.items():
        new = []
        for c in items or []:
            top = c.get("control") if isinstance(c, dict) else None
            if top is None:
                new.append(c)
                continue
            if id(top) not in proxies:
                reasons = [r for r in (why_not(link) for link in chain(top)) if r] or _unshareable(chain(top),
                                                                                              model_patcher)
                if cross:
                    reasons.append("a ControlNet-specific text conditioning")
                proxies[id(top)] = None if reasons else BandControlChain(top, model_patcher)
                if reasons:
                    notes.append(f"ControlNet chain {' <- '.join(type(x).__name__ for x in chain(top))}: computed in "
                                 f"the server (step 1): {'; '.join(reasons)}")
            proxy = proxies[id(top)]
            new.append(c if proxy is None else {**c, "control": proxy})
        out[name] = new
    return out, notes


def _unshareable(links: list, model_patcher) -> list[str]:
    """Share the regular ControlNets' weights now (once per identity); why not, if they cannot be rebuilt.
    A ControlNet-LoRA builds its network at ``pre_run`` and is shared at its first call."""
    import comfy.controlnet

    from stadi_core.errors import UnsupportedError

    from .control_weights import control_spec

    for link in links:
        if type(link) is comfy.controlnet.ControlNet:
            try:
                control_spec(link, model_patcher)
            except UnsupportedError as exc:
                return [str(exc)]
    return []


def hint_rows(hint: torch.Tensor, height: int, start: int, end: int) -> torch.Tensor:
    """A band's rows of a hint: ``hint.shape[2] / height`` pixel rows per latent row (8 for a pixel hint,
    1 for a VAE-encoded one)."""
    ratio, rest = divmod(int(hint.shape[2]), height)
    if rest or ratio < 1:
        raise StadiError(f"STADI: a ControlNet hint of {hint.shape[2]} rows for a {height}-row latent is not a whole "
                         "number of rows per latent row; set STADI_CONTROLNET=server or use KSampler")
    return hint[:, :, start * ratio:end * ratio]


class ControlsOnce:
    """Each rank receives a ControlNet's spec and its rows of a hint once per session; calls name them by key."""

    def __init__(self):
        self.sent: set = set()  # (rank, key)

    def for_rank(self, rank: int, control: BandControls, height: int, start: int, end: int) -> dict:
        """The BandCall fields for ``rank``'s band [start, end) of a ``height``-row call."""
        from stadi_core.models.control_bands import _numpy

        models, hints = {}, {}
        for key, spec in control.models.items():
            if (rank, key) not in self.sent:
                self.sent.add((rank, key))
                models[key] = spec
        for key, hint in control.hints.items():
            if (rank, key) not in self.sent:
                self.sent.add((rank, key))
                hints[key] = _numpy(hint_rows(hint, height, start, end))
        return dict(controls=list(control.entries), control_models=models, control_hints=hints)


def message_bytes(call: dict) -> tuple[int, int]:
    """(bytes sent once: hint rows and ControlNet specs, bytes of this call's entries) of a rank's step-2
    BandCall fields (specs and entries pickled, as they cross)."""
    import pickle

    if not call.get("controls"):
        return 0, 0
    once = sum(a.nbytes for a in call.get("control_hints", {}).values())
    if call.get("control_models"):
        once += len(pickle.dumps(call["control_models"], protocol=pickle.HIGHEST_PROTOCOL))
    return once, len(pickle.dumps(call["controls"], protocol=pickle.HIGHEST_PROTOCOL))


def band_note(records: list) -> list[str]:
    """The run report's note on ControlNets that ran on the bands: calls, bytes sent, and what step 1 would have sent."""
    per_call = [(sum(r.get("control_once_bytes", 0) for r in calls), sum(r.get("control_call_bytes", 0) for r in calls),
                 sum(r.get("control_rows_bytes", 0) for r in calls)) for calls in zip(*records)]
    ran = [c for c in per_call if c[1]]
    if not ran:
        return []
    once = sum(c[0] for c in ran)
    each = sum(c[1] for c in ran) / len(ran)
    rows = sum(c[2] for c in ran)
    return [f"ControlNet: ran on the bands in the workers (patch-parallel beside the UNet) in {len(ran)} of "
            f"{len(per_call)} calls; sent once per session (hint rows, ControlNet specs): {once / 1e6:.2f} MB; "
            f"per call {each:.0f} B (which ControlNets, strengths); step 1 would have sent {rows / 1e6:.1f} MB of "
            f"residual rows ({rows / len(ran) / 1e6:.2f} MB per call)"]
