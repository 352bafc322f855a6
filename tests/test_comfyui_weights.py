"""Real ComfyUI: the workers compute with the server's shared weights and apply LoRA patches themselves.

- A LoRA change (another strength: a new patch set on the same base model) is applied by the warm
  workers: exact mode still equals stock KSampler at the new strength, no weights are reloaded from
  anywhere but the server's memory, and only the patches are published (the server's log says so).
- ComfyUI options that change the math (--fast, --deterministic, --force-channels-last) reach the
  workers: the run equals KSampler on a server started with them, and the report names them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_support import ComfyServer, comfyui_marks, load_latent_file, require_comfyui, sd15_api_workflow  # noqa: E402

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REL_TOL = 5e-6  # the guide's bound: stock batch-1 vs batch-2 already differs by ~3e-6 relative


def _stadi(strength: float, **kw) -> dict:
    wf = sd15_api_workflow(CKPT, lora_name=LORA, lora_strength=strength, sampler_class="STADISampler",
                           sampler_extra_inputs={"mode": "exact", "warmup_steps": 1, "strides": "off",
                                                 "cluster": ["10", 0]}, save_image=False, **kw)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": "cpu*2", "backend": "gloo", "measure": False, "speeds": "cpu:0=1, cpu:1=2", "exclude": "",
        "emulate_slowdown": ""}}
    return wf


def _compare(server, strength: float, prefix: str) -> tuple[float, dict]:
    common = dict(seed=5, steps=3, cfg=4.0, width=128, height=192, sampler_name="dpmpp_2m")
    ref_entry = server.run(sd15_api_workflow(CKPT, lora_name=LORA, lora_strength=strength, save_image=False,
                                             filename_prefix=f"ref_{prefix}", **common))
    ref = load_latent_file(server.output_files(ref_entry, "7", "latents")[0])
    entry = server.run(_stadi(strength, filename_prefix=f"stadi_{prefix}", **common), timeout=600)
    out = load_latent_file(server.output_files(entry, "7", "latents")[0])
    rel = (out - ref).abs().max().item() / ref.abs().max().item()
    return rel, entry["outputs"]["6"]["stadi_plan"][0]


@pytest.fixture(scope="module")
def model_files(tiny_comfy_models):
    return tiny_comfy_models


def test_a_lora_change_is_applied_by_the_warm_workers_from_the_patches_alone(model_files):
    ckpt, lora = model_files
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt],
                     loras=[lora]) as server:
        rel_a, plan_a = _compare(server, 1.0, "a")
        log_a = server.log_path.read_text(errors="replace")
        rel_b, plan_b = _compare(server, 0.4, "b")
        log_b = server.log_path.read_text(errors="replace")[len(log_a):]
    print(f"exact vs KSampler, relative: LoRA 1.0 {rel_a:.2g}, after the change to 0.4 {rel_b:.2g}")
    assert rel_a <= REL_TOL and rel_b <= REL_TOL
    assert "weights loaded by ranks [0, 1]" in plan_a["notes"]
    assert re.search(r"base weights shared with the workers", log_a)
    # the change: the same base pages, a new patch set only (published as patches, a few MB at most)
    assert "base weights shared" not in log_b
    patched = re.findall(r"(\d+) patched weights shared with the workers \(([\d.]+) MB\)", log_b)
    assert len(patched) == 1 and int(patched[0][0]) > 0 and float(patched[0][1]) < 5.0, patched


def test_math_options_reach_the_workers(model_files):
    ckpt, lora = model_files
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], loras=[lora],
                     extra_args=["--fast", "--deterministic", "--force-channels-last"]) as server:
        rel, plan = _compare(server, 1.0, "opts")
    print(f"exact vs KSampler with --fast --deterministic --force-channels-last: relative {rel:.2g}")
    assert rel <= REL_TOL
    note = next(n for n in plan["notes"] if n.startswith("ComfyUI options the workers run with"))
    for option in ("--fast", "--deterministic", "--force-channels-last"):
        assert option in note, note
