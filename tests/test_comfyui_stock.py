"""Stock ComfyUI runs the tiny SD1.5 checkpoint + LoRA through its HTTP API (no custom nodes).

This is the baseline the STADI integration tests build on: if it fails, the harness or the
ComfyUI checkout is broken, not the node pack. Needs STADI_COMFYUI_PATH; skipped otherwise.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_support import (  # noqa: E402
    ComfyServer,
    comfyui_path,
    load_latent_file,
    require_comfyui,
    sd15_api_workflow,
)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(comfyui_path() is None, reason="set STADI_COMFYUI_PATH to a ComfyUI checkout to run the real-ComfyUI tests"),
]

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"


@pytest.fixture(scope="module")
def model_files(tiny_comfy_models):
    return tiny_comfy_models


@pytest.fixture(scope="module")
def server(model_files):
    ckpt, lora = model_files
    with ComfyServer(require_comfyui(), checkpoints=[ckpt], loras=[lora]) as srv:
        yield srv


def test_server_lists_models_and_nodes(server):
    info = server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]
    assert CKPT in info["input"]["required"]["ckpt_name"][0]
    lora_info = server.object_info("LoraLoader")["LoraLoader"]
    assert LORA in lora_info["input"]["required"]["lora_name"][0]
    ks = server.object_info("KSampler")["KSampler"]["input"]["required"]
    assert "euler" in ks["sampler_name"][0] and "normal" in ks["scheduler"][0]


def test_txt2img_with_lora_saves_finite_latent_and_image(server):
    import torch
    from PIL import Image

    prompt = sd15_api_workflow(CKPT, lora_name=LORA, seed=1, steps=4, width=128, height=128,
                               sampler_name="euler", scheduler="normal")
    t0 = time.monotonic()
    entry = server.run(prompt, timeout=300)
    elapsed = time.monotonic() - t0

    (latent_path,) = server.output_files(entry, "7", "latents")
    latent = load_latent_file(latent_path)
    assert tuple(latent.shape) == (1, 4, 16, 16)
    assert torch.isfinite(latent).all()
    assert latent.abs().max() > 0

    (image_path,) = server.output_files(entry, "9", "images")
    with Image.open(image_path) as im:
        assert im.size == (128, 128)
    log = server.log_text()
    assert "lora key not loaded" not in log and "clip missing" not in log, log
    print(f"stock txt2img 128x128, 4 euler steps, with LoRA: {elapsed:.1f}s (incl. model load)")


def test_same_seed_is_deterministic_and_lora_changes_result(server):
    import torch

    def run(**kw):
        entry = server.run(sd15_api_workflow(CKPT, seed=5, steps=2, save_image=False, **kw), timeout=300)
        return load_latent_file(server.output_files(entry, "7", "latents")[0])

    a = run(lora_name=LORA, filename_prefix="a")
    c = run(filename_prefix="c")
    # ComfyUI's classic cache keeps one result per node id, so after c the sampler runs again.
    b = run(lora_name=LORA, filename_prefix="b")
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3, "the LoRA had no effect"


def test_websocket_reports_progress_and_executed(server):
    prompt = sd15_api_workflow(CKPT, seed=11, steps=3, save_image=False, filename_prefix="ws")
    with server.listen() as ws:
        pid = server.queue(prompt)
        server.wait(pid, timeout=300)
        deadline = time.monotonic() + 10
        while not ws.of_type("executed", pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        progress = [m["data"] for m in ws.of_type("progress", pid) if m["data"].get("node") == "6"]
        executed = ws.of_type("executed", pid)
    assert [p["value"] for p in progress][-1] == 3 and progress[-1]["max"] == 3
    assert any(m["data"]["node"] == "7" and "latents" in m["data"]["output"] for m in executed)
