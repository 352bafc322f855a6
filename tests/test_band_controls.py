"""The server-side bookkeeping of ControlNets that run on the bands (nodes/band_controls.py), without ComfyUI:
each band gets exactly its pixel rows of a hint, once per session per rank, and the layer ids of a
ControlNet never meet the UNet's. The networks themselves are checked in the real ComfyUI
(tests/test_comfyui_controlnet.py) and by tests/test_controlnet_patch_parallel_probe.py."""

from __future__ import annotations

import pytest
import torch

from stadi_core.errors import StadiError
from stadi_core.runtime.worker_controls import ID_BLOCK, first_id
from stadi_pack.nodes.band_controls import BandControls, ControlsOnce, band_note, hint_rows, message_bytes


def test_a_band_gets_its_pixel_rows_of_the_hint_at_any_ratio():
    hint = torch.arange(2 * 3 * 320 * 4, dtype=torch.float32).reshape(2, 3, 320, 4)  # 40 latent rows, 8 px each
    bands = [(0, 8), (8, 24), (24, 40)]
    parts = [hint_rows(hint, 40, s, e) for s, e in bands]
    assert [p.shape[2] for p in parts] == [64, 128, 128]
    assert torch.equal(torch.cat(parts, dim=2), hint)  # the bands tile the hint, in order
    latent_hint = hint[:, :, :40]  # a VAE-encoded hint: one row per latent row
    assert torch.equal(hint_rows(latent_hint, 40, 8, 24), latent_hint[:, :, 8:24])
    with pytest.raises(StadiError, match="rows per latent row"):
        hint_rows(hint[:, :, :100], 40, 0, 8)


def test_specs_and_hints_go_to_each_rank_once_per_session():
    hint = torch.rand(1, 3, 320, 16)
    control = BandControls([("net", "h1.0", 0.7, "CONSTANT", True)], models={"net": {"spec": 1}}, hints={"h1.0": hint})
    once = ControlsOnce()
    first = once.for_rank(0, control, 40, 0, 16)
    assert first["control_models"] == {"net": {"spec": 1}} and first["control_hints"]["h1.0"].shape == (1, 3, 128, 16)
    again = once.for_rank(0, control, 40, 0, 16)
    assert again["control_models"] == {} and again["control_hints"] == {} and again["controls"] == control.entries
    other = once.for_rank(1, control, 40, 16, 40)  # another rank still gets its own rows
    assert other["control_hints"]["h1.0"].shape == (1, 3, 192, 16)
    once, each = message_bytes(first)
    assert once > 128 * 16 * 3 * 4 and 0 < each < 200
    assert message_bytes(again) == (0, each)


def test_controlnet_layer_ids_start_past_the_unets_and_differ_per_weights():
    assert first_id("0000abcd") == ID_BLOCK  # the UNet's ids are 0 .. ID_BLOCK - 1
    assert first_id("0001abcd") == 2 * ID_BLOCK
    assert first_id("ffff0000") + ID_BLOCK <= 1 << 30  # make_patch_parallel's id range


def test_the_note_counts_what_crossed_and_what_step_1_would_have_sent():
    calls = [dict(control_once_bytes=500_000, control_call_bytes=100, control_rows_bytes=2_000_000),
             dict(control_once_bytes=0, control_call_bytes=100, control_rows_bytes=2_000_000),
             dict(control_once_bytes=0, control_call_bytes=0, control_rows_bytes=0)]  # outside the ControlNet's range
    note = band_note([calls, calls])[0]
    assert "in 2 of 3 calls" in note and "(hint rows, ControlNet specs): 1.00 MB" in note
    assert "per call 200 B" in note and "4.00 MB per call" in note
    assert band_note([[dict(control_bytes=10)]]) == []


def test_a_worker_keeps_the_controlnets_of_the_last_session_only():
    from stadi_core.runtime.worker_controls import WorkerControls

    controls = WorkerControls("cpu")
    ctx = object()
    controls.nets = {"a": (torch.nn.Identity(), ctx), "b": (torch.nn.Identity(), ctx)}
    controls.used = {"a"}  # the session that just ended ran "a" only
    controls.hints = {"h1.0": torch.zeros(1)}
    controls.new_session()
    assert set(controls.nets) == {"a"} and controls.hints == {} and controls.used == set()
    controls.new_session()  # a session without ControlNets: the next one starts with none held
    assert controls.nets == {}
