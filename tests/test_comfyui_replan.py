"""Real ComfyUI: a worker that becomes 3x slower mid-run (emulate_slowdown 'cpu:1=3@2') makes the lockstep
run move its bands (in-run re-plan), and exact mode still equals stock KSampler."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_support import ComfyServer, comfyui_marks, load_latent_file, require_comfyui, sd15_api_workflow  # noqa: E402

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"


def test_a_worker_slowed_mid_run_moves_the_bands_and_exact_stays_exact(tiny_comfy_models):
    ckpt, lora = tiny_comfy_models
    common = dict(seed=9, steps=10, cfg=3.0, width=128, height=256, sampler_name="euler", save_image=False)
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_class="STADISampler", filename_prefix="replan",
                           sampler_extra_inputs={"mode": "exact", "warmup_steps": 1, "strides": "off",
                                                 "cluster": ["10", 0]}, **common)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": "cpu*2", "backend": "gloo", "measure": False, "speeds": "", "exclude": "",
        "emulate_slowdown": "cpu:1=3@2"}}
    env = dict(os.environ, STADI_REPLAN="on")  # the suite runs with it off (conftest.py)
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt],
                     loras=[lora], env=env) as server:
        ref = load_latent_file(server.output_files(server.run(sd15_api_workflow(
            CKPT, lora_name=LORA, filename_prefix="stock", **common)), "7", "latents")[0])
        entry = server.run(wf, timeout=600)
        out = load_latent_file(server.output_files(entry, "7", "latents")[0])
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rel = (out - ref).abs().max().item() / ref.abs().max().item()
    replans = [n for n in plan["notes"] if n.startswith("re-planned at step")]
    print(f"rows at the end {[b['rows'] for b in plan['bands']]}; {replans}; relative diff vs KSampler {rel:.2g}")
    assert replans and "rows 16/16 -> 24/8" in replans[0], plan["notes"]
    assert [b["rows"] for b in plan["bands"]] == [24, 8]
    assert rel <= 5e-6
