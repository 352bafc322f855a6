"""What the server refuses about ControlNets before a run (nodes/control_residuals.py), without ComfyUI."""

from __future__ import annotations

import types

import pytest

from stadi_core.errors import UnsupportedError
from stadi_core.models import comfy_flux, comfy_unet
from stadi_pack.nodes.control_residuals import chain, check_controls, controls_in, load_controls


class ControlNet:  # named like ComfyUI's: the messages name the classes
    def __init__(self, previous=None, extra_hooks=None):
        self.previous_controlnet, self.extra_hooks = previous, extra_hooks


class T2IAdapter(ControlNet):
    pass


def test_controls_are_found_in_both_conditioning_shapes_once_each():
    first = ControlNet()
    second = T2IAdapter(previous=first)
    pairs = [[None, {"control": second}], [None, {}]]  # a CONDITIONING list
    converted = [{"control": second}, {"control": first}]  # a guider's conds
    assert controls_in(pairs, converted) == [second, first]
    assert chain(second) == [second, first]


def test_strided_loops_refuse_naming_the_fix():
    with pytest.raises(UnsupportedError, match="set strides off") as err:
        check_controls([T2IAdapter(previous=ControlNet())], "SDXL", comfy_unet, lockstep=False)
    assert "ControlNet, T2IAdapter" in str(err.value)


def test_families_without_control_refuse_naming_the_model():
    with pytest.raises(UnsupportedError, match="with the Flux model .* use KSampler"):
        check_controls([ControlNet()], "Flux", comfy_flux, lockstep=True)


def test_controlnet_hooks_are_refused_and_plain_chains_pass():
    with pytest.raises(UnsupportedError, match="hooks"):
        check_controls([ControlNet(previous=ControlNet(extra_hooks=object()))], "BaseModel", comfy_unet, lockstep=True)
    check_controls([ControlNet(previous=ControlNet())], "BaseModel", comfy_unet, lockstep=True)
    check_controls([], "Flux", comfy_flux, lockstep=False)  # nothing to refuse without a ControlNet


def test_nothing_is_loaded_without_a_controlnet():
    patcher = types.SimpleNamespace(model_dtype=lambda: None)
    assert load_controls(patcher, {"positive": [{}], "negative": [{}]}) == []  # no ComfyUI import needed


def test_a_call_with_residuals_is_refused_where_nothing_would_send_them_on():
    """The last guard: a per-rank loop (strides) never forwards residuals, so a call that carries them fails
    instead of silently computing the band without its ControlNet."""
    import torch

    from stadi_pack.nodes.deployment import call_inputs

    control = {"output": [torch.zeros(1, 4, 8, 8)]}
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 768)
    with pytest.raises(UnsupportedError, match="set strides off"):
        call_inputs(comfy_unet, x, t, ctx, control, {}, {})
    with pytest.raises(UnsupportedError, match="comfy-flux model"):
        call_inputs(comfy_flux, x, t, ctx, control, {}, {}, takes_control=True)
    _, cond = call_inputs(comfy_unet, x, t, ctx, control, {}, {}, takes_control=True)
    assert set(cond) == {"context"}  # the residuals travel beside the conditioning, per band


def test_band_network_gives_a_controlnet_lora_the_weights_and_a_parent_nothing():
    """ControlLora.pre_run calls ``diffusion_model.state_dict()`` on the loop's shell: it gets the weights the
    server computes with; a parent module's state_dict (which recurses with keywords) sees no weights, as before."""
    import torch

    from stadi_pack.nodes.band_network import BandNetwork

    real = torch.nn.Linear(2, 2)
    weights = {"weight": torch.ones(2, 2)}
    band = BandNetwork(real, lambda *a: None, state=lambda: weights)
    assert band.state_dict() is weights
    parent = torch.nn.Module()
    parent.diffusion_model = band
    assert dict(parent.state_dict()) == {}
    assert dict(BandNetwork(real, lambda *a: None).state_dict()) == {}


def test_the_report_says_what_the_residuals_cost():
    import numpy as np

    from stadi_pack.nodes.control_residuals import call_control_bytes, control_note

    band = {"control": {"output": [np.zeros((2, 4, 8, 8), np.float32), None]}}
    assert call_control_bytes(band) == 2 * 4 * 8 * 8 * 4
    records = [[dict(control_bytes=1_000_000), dict(control_bytes=0)],  # rank 0: two calls, the first with residuals
               [dict(control_bytes=3_000_000), dict(control_bytes=0)]]
    (note,) = control_note(records)
    assert "1 of 2 calls" in note and "4.0 MB in all" in note and "4.00 MB per call" in note
    assert control_note([[dict(control_bytes=0)]]) == []
