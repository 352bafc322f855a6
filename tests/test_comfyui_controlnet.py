"""ControlNets and T2I-Adapters in bands, in the real ComfyUI (STADI_COMFYUI_PATH).

Tiny random-weight ControlNets built from ComfyUI's own ControlNet class and loaded by the stock
ControlNetLoader (comfy_controlnet_models.py): SD1.5 and SDXL formats, a ControlNet-LoRA and an
SDXL T2I-Adapter. ComfyUI computes every residual in the server (strength, start/end, chains,
per-cond ControlNets as stock); each band call carries its rows, the worker's UNet adds them.

Every exact comparison is against the stock sampler with the same ControlNet, relative to the
latent's magnitude (the stock path's own float floor is 2-4e-6); every case also checks that the
ControlNet changes the stock result by far more than the tolerance, so a dropped or misplaced
residual cannot pass.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from comfy_controlnet_models import write_tiny_control
from comfy_dit_models import write_tiny_model
from comfy_support import ComfyExecutionError, ComfyServer, comfyui_marks, dit_api_workflow, load_latent_file, \
    require_comfyui, sd15_api_workflow

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
CONTROLS = {"cn-sd15": "stadi_cn_sd15.safetensors", "clora-sd15": "stadi_clora_sd15.safetensors",
            "cn-sdxl": "stadi_cn_sdxl.safetensors", "t2i-sdxl": "stadi_t2i_sdxl.safetensors"}
DIT = {"sdxl": "stadi_tiny_sdxl.safetensors", "sd3": "stadi_tiny_sd3.safetensors",
       "clip-l": "stadi_tiny_clip_l.safetensors", "clip-g": "stadi_tiny_clip_g.safetensors"}
REL_TOL = 5e-6
EFFECT = 1e-3  # the ControlNet must move the stock latent by more than this (relative): 200x the tolerance
TWO = ("cpu*2", "cpu:0=2, cpu:1=3")
THREE = ("cpu*3", "cpu:0=1, cpu:1=2, cpu:2=3")
W, H = 128, 320  # a 40-row latent: uneven bands on both clusters (SD1.5: [16, 24] and [8, 16, 16])
HINT = "stadi_hint.png"
BAND_HINT = "stadi_band_hint.png"


@pytest.fixture(scope="module")
def server(tiny_comfy_models, tmp_path_factory):
    ckpt, lora = tiny_comfy_models
    comfy = require_comfyui()
    folder = tmp_path_factory.mktemp("control-models")
    controls = [write_tiny_control(kind, folder / name, comfy=comfy) for kind, name in CONTROLS.items()]
    dits = [write_tiny_model(kind, folder / name, comfy=comfy) for kind, name in DIT.items()]
    with ComfyServer(comfy, custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], loras=[lora],
                     controlnets=controls, diffusion_models=dits[:2], text_encoders=dits[2:]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        _write_hints(srv)
        yield srv


def _write_hints(srv) -> None:
    """A seeded random picture, and one that is black outside the pixel rows of the last band of THREE."""
    from PIL import Image

    rng = np.random.default_rng(5)
    pic = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(pic).save(srv.input_dir / HINT)
    band = np.zeros_like(pic)
    band[BAND_ROWS[0] * 8:BAND_ROWS[1] * 8] = pic[BAND_ROWS[0] * 8:BAND_ROWS[1] * 8]
    Image.fromarray(band).save(srv.input_dir / BAND_HINT)


BAND_ROWS = (24, 40)  # the latent rows of THREE's last SD1.5 band at H = 320 px (asserted from the plan below)


def _cluster(devices_speeds) -> dict:
    devices, speeds = devices_speeds
    return {"class_type": "STADIClusterProfile", "inputs": {"devices": devices, "backend": "gloo", "measure": False,
                                                            "speeds": speeds, "exclude": "", "emulate_slowdown": ""}}


def _parallel(wf: dict, cluster=TWO, mode: str = "exact", warmup: int = 2, strategy: str = "bands") -> dict:
    """The same workflow with a STADI Parallel Model between the model and the sampler "6"."""
    wf = copy.deepcopy(wf)
    wf["50"] = _cluster(cluster)
    wf["51"] = {"class_type": "STADIParallelModel", "inputs": {
        "model": wf["6"]["inputs"]["model"], "mode": mode, "warmup_steps": warmup, "cluster": ["50", 0],
        "strategy": strategy}}
    wf["6"]["inputs"]["model"] = ["51", 0]
    return wf


def _apply(wf: dict, node: str, control: str, *, strength=0.7, start=0.2, end=0.8, hint=HINT,
           positive_only: bool = False) -> dict:
    """ControlNetLoader + LoadImage + ControlNetApplyAdvanced on the sampler's conditionings (chained
    onto a ControlNet already there); ``positive_only``: the sampler keeps its own negative."""
    wf = copy.deepcopy(wf)
    s = wf["6"]["inputs"]
    wf[f"{node}0"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLS[control]}}
    wf[f"{node}1"] = {"class_type": "LoadImage", "inputs": {"image": hint}}
    wf[f"{node}2"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": s["positive"], "negative": s["negative"], "control_net": [f"{node}0", 0],
        "image": [f"{node}1", 0], "strength": strength, "start_percent": start, "end_percent": end}}
    s["positive"] = [f"{node}2", 0]
    if not positive_only:
        s["negative"] = [f"{node}2", 1]
    return wf


def _sd15(prefix: str, lora: bool = False, **kw) -> dict:
    for k, v in dict(seed=3, steps=5, cfg=4.0, width=W, height=H).items():
        kw.setdefault(k, v)
    return sd15_api_workflow(CKPT, lora_name=LORA if lora else None, save_image=False, filename_prefix=prefix, **kw)


def _sdxl(prefix: str, **kw) -> dict:
    wf = dit_api_workflow(DIT["sdxl"], DIT["clip-l"], flux=False, shift=None, scheduler="karras", seed=7, steps=4,
                          cfg=3.0, width=W, height=H, filename_prefix=prefix, **kw)
    wf["2"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": DIT["clip-l"], "clip_name2": DIT["clip-g"],
                                                         "type": "sdxl"}}
    wf["5"]["class_type"] = "EmptyLatentImage"
    return wf


def _run(server, wf, timeout=900):
    entry = server.run(wf, timeout=timeout)
    files = server.output_files(entry, "7", "latents")
    assert files, f"no latent saved: {entry.get('outputs')}"
    return load_latent_file(files[0]), entry


def _latent(server, wf, timeout=900) -> torch.Tensor:
    return _run(server, wf, timeout)[0]


def _stadi_run(server, wf, timeout=900) -> tuple[torch.Tensor, list[str]]:
    """The latent of a STADI run and the run report's ControlNet notes (logged by the server: the STADI
    Parallel Model has no UI output of its own)."""
    before = len(server.log_text())
    out = _latent(server, wf, timeout)
    notes = [line.split("STADI ", 1)[1] for line in server.log_text()[before:].splitlines()
             if "STADI ControlNet" in line]
    print(notes)
    return out, notes


def _assert_on_bands(notes: list[str], calls: str | None = None) -> None:
    """The ControlNets ran in the workers, on the bands (step 2), and no residual crossed to the ranks."""
    assert any("ran on the bands in the workers" in n for n in notes), notes
    assert not any("computed in the server" in n for n in notes), notes
    if calls is not None:
        assert any(f"in {calls} calls" in n for n in notes), notes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


def _assert_exact(out, ref, plain, what: str) -> None:
    """``out`` (STADI) equals ``ref`` (stock with the ControlNet), which the ControlNet moved away from ``plain``."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    rel, effect = _rel(out, ref), _rel(plain, ref)
    print(f"{what}: max |STADI - stock| relative {rel:.2g}; the ControlNet moves stock by {effect:.2g}")
    assert effect > EFFECT, f"{what}: the ControlNet barely changes the image ({effect:.3g}): the test proves nothing"
    assert rel <= REL_TOL, f"{what}: relative {rel:.3g}"


def _error_text(entry) -> str:
    """The exception messages of a failed prompt (ComfyUI's execution_error status messages)."""
    msgs = (entry.get("status") or {}).get("messages") or []
    return " | ".join(str(m[1].get("exception_message", "")) for m in msgs if m and m[0] == "execution_error")


def _rows(entry) -> list[int]:
    return [b["rows"] for b in entry["outputs"]["6"].get("stadi_plan", [{}])[0].get("bands", [])]


# -- SD1.5: exact mode equals KSampler with the same ControlNets -----------------------------------------------------

CASES = {
    # strength 0.7, applied from 20 % to 80 % of the schedule
    "range_2w": dict(cluster=TWO, controls=[("cn-sd15", {})]),
    "range_3w": dict(cluster=THREE, controls=[("cn-sd15", {})]),
    # a ControlNet chained onto another (previous_controlnet): a ControlNet-LoRA, which copies the
    # UNet's weights (here with a LoRA on the model) at pre_run, over the full ControlNet
    "chained_controllora_lora_3w": dict(cluster=THREE, lora=True,
                                        controls=[("cn-sd15", {}), ("clora-sd15", dict(strength=0.5, start=0.0,
                                                                                       end=1.0))]),
    # positive only: cond and uncond go to the network apart, one with residuals, one without
    "positive_only_2w": dict(cluster=TWO, controls=[("cn-sd15", dict(positive_only=True, start=0.0))]),
    "lora_2w": dict(cluster=TWO, lora=True, controls=[("cn-sd15", dict(strength=1.0, start=0.0, end=1.0))]),
    "batch2_3w": dict(cluster=THREE, batch_size=2, controls=[("cn-sd15", {})]),
    # CFG branches on different workers (cond rows on one, uncond rows on the other): each unit gets its
    # branch's entries of the residuals
    "cfg_split_2w": dict(cluster=TWO, strategy="cfg_split", controls=[("cn-sd15", {})], server=True),
    # two full ControlNets chained, with their own strengths and ranges (one on 0.0-0.6, one on 0.4-1.0)
    "chained_two_controlnets_3w": dict(cluster=THREE, controls=[("cn-sd15", dict(strength=0.8, start=0.0, end=0.6)),
                                                                ("cn-sd15", dict(strength=0.5, start=0.4, end=1.0,
                                                                                 hint=BAND_HINT))]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_mode_with_controlnets_equals_ksampler(server, case):
    spec = CASES[case]
    plain = _sd15(f"plain_{case}", lora=spec.get("lora", False), batch_size=spec.get("batch_size", 1))
    wf = plain
    for i, (control, kw) in enumerate(spec["controls"]):
        wf = _apply(wf, f"6{i}", control, **kw)
    ref = _latent(server, wf)
    out, notes = _stadi_run(server, _parallel(wf, spec["cluster"], strategy=spec.get("strategy", "bands")))
    _assert_exact(out, ref, _latent(server, plain), f"{case} ({spec['cluster'][1]})")
    if spec.get("server"):  # a CFG-branch arrangement keeps step 1: the server computes, the units get rows
        assert any("computed in the server" in n for n in notes), notes
    else:
        _assert_on_bands(notes)


def _stadi_sampler(wf: dict, cluster, **inputs) -> dict:
    """The workflow with its KSampler replaced by the STADI Sampler (same inputs) on ``cluster``."""
    wf = copy.deepcopy(wf)
    wf["6"]["class_type"] = "STADISampler"
    wf["6"]["inputs"].update(dict(mode="exact", warmup_steps=1, strides="off", cluster=["50", 0], strategy="bands"),
                             **inputs)
    wf["50"] = _cluster(cluster)
    return wf


def test_a_hint_that_lives_in_one_band_reaches_that_band(server):
    """The hint is black outside the last band's pixel rows, so that band's residual rows differ from every other
    band's: a residual cut from the wrong rows (or a band given another band's rows) changes the image."""
    wf = _apply(_sd15("bandhint"), "60", "cn-sd15", strength=1.0, start=0.0, end=1.0, hint=BAND_HINT)
    full = _apply(_sd15("fullhint"), "60", "cn-sd15", strength=1.0, start=0.0, end=1.0, hint=HINT)
    ref = _latent(server, wf)
    out, entry = _run(server, _stadi_sampler(wf, THREE))
    rows = _rows(entry)
    starts = np.cumsum([0] + rows)
    assert (starts[-2], starts[-1]) == BAND_ROWS, f"bands {rows}: the hint no longer covers exactly the last band"
    notes = [n for n in entry["outputs"]["6"]["stadi_plan"][0]["notes"] if n.startswith("ControlNet")]
    print(notes)
    _assert_on_bands(notes, "5 of 5")  # 5 euler steps, cond and uncond in one call each
    # the whole-picture hint gives a different image: the band's rows are what the ControlNet saw
    _assert_exact(out, ref, _latent(server, full), f"hint in the last band only, bands {rows}")


# -- the STADI Sampler: strided loops refuse a ControlNet, strides off runs it ------------------------------------

def test_strided_stadi_sampler_refuses_controlnet_and_strides_off_equals_ksampler(server):
    plain = _sd15("strided")
    wf = _apply(plain, "60", "cn-sd15")
    stadi = _stadi_sampler(wf, ("cpu*2", "cpu:0=1, cpu:1=0.3"), mode="displaced", strides="auto")
    with pytest.raises(ComfyExecutionError) as err:
        server.run(stadi, timeout=600)
    text = _error_text(err.value.entry)
    assert "ControlNet" in text and "set strides off" in text, text
    stadi["6"]["inputs"].update(strides="off", mode="exact")  # the fix the message names
    out, notes = _stadi_run(server, stadi)
    _assert_exact(out, _latent(server, wf), _latent(server, plain), "STADI Sampler, strides off")
    _assert_on_bands(notes)


# -- displaced mode: approximate, reported as PSNR against stock -------------------------------------------------

def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    peak = (ref.max() - ref.min()).item()
    mse = (a.double() - ref.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.mark.parametrize("start,end,strength", [(0.0, 1.0, 1.0), (0.25, 0.75, 2.0)], ids=["whole_run", "mid_run"])
def test_displaced_mode_with_a_controlnet_stays_closer_than_dropping_it(server, start, end, strength):
    """Displaced mode with the ControlNet on the bands; in the second case it starts after warmup and ends
    before the last step, so the calls where it comes and goes must be fresh (its layers have no stored
    context before), and the displaced calls between them reuse its own."""
    plain = _sd15(f"displaced{start}", steps=8)
    wf = _apply(plain, "60", "cn-sd15", strength=strength, start=start, end=end)
    ref = _latent(server, wf)
    out, notes = _stadi_run(server, _parallel(wf, TWO, mode="displaced", warmup=2))
    _assert_on_bands(notes)
    stock_plain = _latent(server, plain)
    p_displaced, p_dropped = _psnr(out, ref), _psnr(stock_plain, ref)
    # the displaced error of the same run without the ControlNet, for scale: the ControlNet adds none
    out_plain = _latent(server, _parallel(plain, TWO, mode="displaced", warmup=2))
    print(f"displaced, 2 workers, 8 steps (2 warmup), ControlNet {strength} on {start}-{end}: PSNR vs stock with "
          f"the ControlNet {p_displaced:.1f} dB; stock without the ControlNet {p_dropped:.1f} dB; displaced without "
          f"it vs its own stock {_psnr(out_plain, stock_plain):.1f} dB")
    assert p_displaced > p_dropped + 10, (p_displaced, p_dropped)


# -- SDXL: ControlNet and T2I-Adapter ----------------------------------------------------------------------------

@pytest.mark.parametrize("control,cluster", [("cn-sdxl", TWO), ("t2i-sdxl", THREE)], ids=["controlnet_2w", "t2i_3w"])
def test_sdxl_controlnet_and_t2i_adapter_equal_ksampler(server, control, cluster):
    plain = _sdxl(f"sdxl_{control}")
    kw = dict(strength=0.7, start=0.0, end=1.0) if control.startswith("t2i") else {}
    wf = _apply(plain, "60", control, **kw)
    ref = _latent(server, wf)
    out, notes = _stadi_run(server, _parallel(wf, cluster))
    _assert_exact(out, ref, _latent(server, plain), f"SDXL {control} ({cluster[1]})")
    if control.startswith("t2i"):  # T2I-Adapters stay in the server: features computed once per run, rows per call
        assert any("computed in the server" in n for n in notes), notes
    else:
        _assert_on_bands(notes)


# -- families whose ControlNets do not run in bands ------------------------------------------------------------------

def test_a_controlnet_on_an_sd3_model_is_refused_naming_the_model(server):
    wf = dit_api_workflow(DIT["sd3"], DIT["clip-l"], flux=False, shift=3.0, cfg=2.0, width=W, height=H,
                          filename_prefix="sd3cn")
    wf = _parallel(_apply(wf, "60", "cn-sd15"), TWO)
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=600)
    text = _error_text(err.value.entry)
    assert "ControlNet" in text and "SD3 model" in text and "use KSampler" in text, text


# -- the shipped example workflow, with the tiny files in place of the real ones --------------------------------------

def test_shipped_controlnet_workflow_runs_and_equals_ksampler_in_exact_mode(server):
    import json
    from pathlib import Path

    api = json.loads((Path(__file__).resolve().parent.parent / "workflows" / "api" /
                      "stadi_sd15_controlnet.json").read_text())
    api["1"]["inputs"]["ckpt_name"] = CKPT
    api["19"]["inputs"]["control_net_name"] = CONTROLS["cn-sd15"]
    api["17"]["inputs"]["image"] = HINT
    api["5"]["inputs"].update(width=W, height=H)
    api["6"]["inputs"].update(steps=4, mode="exact", strategy="bands", seed=11)
    api["7"]["inputs"].update(devices=TWO[0], speeds=TWO[1], backend="gloo", measure=False)
    api["30"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/shipped_cn"}}
    entry = server.run(api, timeout=900)
    _assert_on_bands([n for n in entry["outputs"]["6"]["stadi_plan"][0]["notes"] if n.startswith("ControlNet")])
    assert [b["rows"] for b in entry["outputs"]["6"]["stadi_plan"][0]["bands"]] == [16, 24]
    assert server.output_files(entry, "9"), "the workflow's Save Image saved nothing"
    out = load_latent_file(server.output_files(entry, "30", "latents")[0])

    ref = {k: v for k, v in copy.deepcopy(api).items() if k not in ("7", "10", "11", "12")}  # KSampler has no patches
    ref["6"] = {"class_type": "KSampler", "inputs": {k: v for k, v in ref["6"]["inputs"].items() if k in (
        "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
        "denoise")}}
    ref["30"]["inputs"]["filename_prefix"] = "latents/shipped_cn_ref"
    plain = copy.deepcopy(ref)
    plain["6"]["inputs"].update(positive=["3", 0], negative=["4", 0])
    for nid in ("17", "19", "20"):
        plain.pop(nid)
    plain["30"]["inputs"]["filename_prefix"] = "latents/shipped_plain"

    def latent(wf):
        return load_latent_file(server.output_files(server.run(wf, timeout=900), "30", "latents")[0])

    _assert_exact(out, latent(ref), latent(plain), "workflows/api/stadi_sd15_controlnet.json (tiny files)")
