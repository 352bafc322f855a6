"""The STADI nodes inside a real ComfyUI server (fetched checkout; STADI_COMFYUI_PATH).

Two CPU workers with uneven bands; the tiny SD1.5 checkpoint and LoRA from comfy_support.
Skipped with a reason when no ComfyUI checkout is configured.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import gone
from comfy_support import (
    ComfyExecutionError,
    ComfyServer,
    comfyui_marks,
    load_latent_file,
    require_comfyui,
    sd15_api_workflow,
    write_tiny_sd15_checkpoint,
)

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
INPAINT_CKPT = "stadi_tiny_sd15_inpaint.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_files(tiny_comfy_models):
    return tiny_comfy_models


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory):
    """The tiny SD1.5 UNet with 9 input channels: ComfyUI makes it an inpainting model (c_concat)."""
    return write_tiny_sd15_checkpoint(tmp_path_factory.mktemp("inpaint") / INPAINT_CKPT, seed=1,
                                      comfy=require_comfyui(), in_channels=9)


@pytest.fixture(scope="module")
def server(model_files, inpaint_checkpoint):
    ckpt, lora = model_files
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt, inpaint_checkpoint],
                     loras=[lora]) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _stadi_workflow(sampler: str, mode: str = "exact", speeds: str = "cpu:0=2, cpu:1=3", **kw) -> dict:
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_name=sampler, sampler_class="STADISampler",
                           sampler_extra_inputs={"mode": mode, "warmup_steps": 2, "strides": "auto",
                                                 "cluster": ["10", 0]}, save_image=False, **kw)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": "cpu*2", "backend": "gloo", "measure": False, "speeds": speeds, "exclude": "",
        "emulate_slowdown": ""}}
    return wf


def _latent(server, entry, node="7") -> torch.Tensor:
    files = server.output_files(entry, node, "latents")
    assert files, f"no latent saved: {entry.get('outputs')}"
    return load_latent_file(files[0])


def test_object_info_lists_nodes_and_sampler_inputs_extend_ksampler(server):
    info = server.object_info()
    for node in ("STADIClusterProfile", "STADISampler", "STADIPatchStitch"):
        assert node in info, f"{node} missing; log:\n{server.log_tail()}"
    ks = info["KSampler"]["input"]["required"]
    st = info["STADISampler"]["input"]["required"]
    assert list(st)[: len(ks)] == list(ks)
    for name, spec in ks.items():
        assert st[name] == spec, f"input {name} differs from KSampler's"
    assert info["STADISampler"]["input"]["optional"]["cluster"][0] == "STADI_CLUSTER"
    assert info["STADISampler"]["output"] == ["LATENT", "STADI_PATCHES"]


# The tiny checkpoint's random weights do not denoise: its latents reach |x| ~ 300, where
# float32 spacing is 3e-5, so an absolute bound of 1e-4 would be ~3 ulps. The bound is
# relative instead (2e-6 ~ 16 ulps); a wrong halo, norm or attention span gives ~1e-2.
REL_TOL = 2e-6


@pytest.mark.parametrize("sampler,cfg", [("euler", 1.0), ("dpmpp_2m", 2.0), ("euler_ancestral", 2.0)])
def test_exact_mode_equals_stock_ksampler_with_lora(server, sampler, cfg):
    common = dict(seed=11, steps=4, cfg=cfg, width=128, height=192, filename_prefix=f"ref_{sampler}")
    ref = _latent(server, server.run(sd15_api_workflow(CKPT, lora_name=LORA, sampler_name=sampler,
                                                       save_image=False, **common)))
    common["filename_prefix"] = f"stadi_{sampler}"
    entry = server.run(_stadi_workflow(sampler, **common), timeout=600)
    out = _latent(server, entry)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rows = [b["rows"] for b in plan["bands"]]
    assert rows == [8, 16], rows  # uneven bands from speeds 2:3 on a 24-row latent
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{sampler} cfg {cfg}: rows {rows}, max |STADI exact - KSampler| = {diff:.3g} "
          f"(|ref| max {scale:.3g}, relative {diff / scale:.2g})")
    assert diff <= REL_TOL * scale


def test_batch_of_two_with_denoise_below_one_equals_ksampler(server):
    common = dict(seed=5, steps=4, cfg=2.0, width=128, height=192, batch_size=2, denoise=0.6, filename_prefix="refb")
    ref = _latent(server, server.run(sd15_api_workflow(CKPT, lora_name=LORA, sampler_name="euler", save_image=False,
                                                       **common)))
    common["filename_prefix"] = "stadib"
    out = _latent(server, server.run(_stadi_workflow("euler", **common), timeout=600))
    assert out.shape == ref.shape and out.shape[0] == 2
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()


def test_inpainting_model_with_a_feathered_mask_equals_ksampler(server):
    """An inpainting UNet gets mask + masked image concatenated onto x (c_concat) and samples with a
    noise mask: both reach the bands sliced like the latent."""
    def inpaint(wf):
        wf["1"]["inputs"]["ckpt_name"] = INPAINT_CKPT
        wf["20"] = {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 192, "batch_size": 1,
                                                            "color": 0x806040}}
        wf["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 192}}
        wf["22"] = {"class_type": "FeatherMask", "inputs": {"mask": ["21", 0], "left": 0, "top": 64, "right": 48,
                                                             "bottom": 0}}
        wf["23"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "pixels": ["20", 0], "mask": ["22", 0],
            "noise_mask": True}}
        wf["6"]["inputs"].update(positive=["23", 0], negative=["23", 1], latent_image=["23", 2])
        return wf

    common = dict(seed=4, steps=4, cfg=2.0, width=128, height=192)
    ref = _latent(server, server.run(inpaint(sd15_api_workflow(CKPT, sampler_name="euler", save_image=False,
                                                               filename_prefix="inp_ref", **common))))
    wf = inpaint(_stadi_workflow("euler", filename_prefix="inp_stadi", **common))
    del wf["2"]  # no LoRA on the inpainting model
    wf["3"]["inputs"]["clip"] = wf["4"]["inputs"]["clip"] = ["1", 1]
    wf["6"]["inputs"]["model"] = ["1", 0]
    out = _latent(server, server.run(wf, timeout=600))
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= REL_TOL * ref.abs().max().item()


def test_attention_patch_is_refused_with_a_message(server):
    wf = _stadi_workflow("euler", steps=2, filename_prefix="pag")
    wf["11"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": wf["6"]["inputs"]["model"], "scale": 3.0}}
    wf["6"]["inputs"]["model"] = ["11", 0]
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=300)
    assert "Perturbed Attention Guidance" in str(err.value.entry) or "patches the model" in str(err.value.entry)
    assert torch.isfinite(_latent(server, server.run(_stadi_workflow("euler", steps=2, filename_prefix="afterpag"))))\
        .all()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "workflows" / "api").glob("*.json")
                                        if '"CheckpointLoaderSimple"' in p.read_text()
                                        and '"ControlNetLoader"' not in p.read_text()))
def test_every_shipped_api_workflow_completes(server, name):
    """Each checkpoint-based API workflow as shipped, with this test's tiny model files and a small
    size (the SD3/Flux ones run in test_comfyui_dit.py, the ControlNet one with its tiny ControlNet and
    hint image in test_comfyui_controlnet.py)."""
    wf = json.loads((REPO / "workflows" / "api" / name).read_text())
    for node in wf.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CKPT
        elif kind == "LoraLoader":
            inputs["lora_name"] = LORA
        elif kind == "EmptyLatentImage":
            inputs.update(width=128, height=128)
        elif kind == "STADISampler":
            inputs["steps"] = 3
        elif kind == "STADIClusterProfile":
            inputs["devices"] = "cpu*2"  # "auto" too on a machine without GPU; explicit keeps it fast
    entry = server.run(wf, timeout=600)
    images = [out for out in entry["outputs"].values() if out.get("images")]
    assert images, f"{name} produced no images: {entry['outputs']}"


def test_displaced_mode_with_strides_runs_and_reports(server):
    entry = server.run(_stadi_workflow("euler", mode="displaced", speeds="cpu:0=1, cpu:1=0.5", steps=6,
                                       filename_prefix="disp"), timeout=600)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    assert [b["stride"] for b in plan["bands"]] == [1, 2]
    assert plan["bands"][1]["evals"] < plan["bands"][0]["evals"]
    assert torch.isfinite(_latent(server, entry)).all()


def test_light_context_runs_in_comfyui_sends_fewer_bytes_and_exact_refuses_it(server):
    """The node's context input reaches the workers: the plan says which ran, the transport's byte
    counts drop, and exact mode refuses a light context with the fix named."""
    sent, latents = {}, {}
    for context in ("full", "partial:0.3+delta"):
        wf = _stadi_workflow("euler", mode="displaced", speeds="cpu:0=1, cpu:1=1", steps=5,
                             filename_prefix="ctx" + context.replace(":", "").replace("+", ""))
        wf["6"]["inputs"].update(strides="off", strategy="bands", context=context)
        entry = server.run(wf, timeout=600)
        plan = entry["outputs"]["6"]["stadi_plan"][0]
        assert (plan["context"] or {}).get("exchange", "raw") == ("delta" if "delta" in context else "raw")
        sent[context] = max(b["sent_bytes"] for b in plan["bands"])
        latents[context] = _latent(server, entry)
        assert torch.isfinite(latents[context]).all()
    # the 2 warmup steps send full context either way; the 3 displaced ones ~0.1x of it
    assert 0 < sent["partial:0.3+delta"] < 0.7 * sent["full"], sent
    assert not torch.equal(latents["full"], latents["partial:0.3+delta"])  # it really ran the light exchange
    wf = _stadi_workflow("euler", steps=2, filename_prefix="ctxexact")
    wf["6"]["inputs"]["context"] = "fp8"
    with pytest.raises(ComfyExecutionError) as err:
        server.run(wf, timeout=300)
    assert "only applies to mode 'displaced'" in str(err.value.entry)


def test_interrupt_ends_the_prompt_and_the_next_one_succeeds(server):
    wf = _stadi_workflow("euler", steps=40, filename_prefix="long")
    with server.listen() as ws:
        pid = server.queue(wf)
        deadline = time.monotonic() + 120
        while not ws.of_type("progress", pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ws.of_type("progress", pid), "no progress before the interrupt"
        server.interrupt()
        with pytest.raises(ComfyExecutionError):
            server.wait(pid, timeout=60)
    entry = server.run(_stadi_workflow("euler", steps=3, filename_prefix="after"), timeout=300)
    assert torch.isfinite(_latent(server, entry)).all()


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            status = (d / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if b"stadi_core.runtime.worker" in cmd and ppid == parent:
            pids.append(int(d.name))
    return pids


def test_no_worker_survives_a_killed_server(model_files):
    ckpt, lora = model_files
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt],
                     loras=[lora]) as srv:
        srv.run(_stadi_workflow("euler", steps=2, filename_prefix="k"), timeout=300)
        workers = _worker_pids(srv.pid)
        assert len(workers) == 2, workers
        os.kill(srv.pid, signal.SIGKILL)  # the server only: its workers must notice on their own
        deadline = time.monotonic() + 20
        while not all(gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(p) for p in workers), "a worker outlived the ComfyUI server"
