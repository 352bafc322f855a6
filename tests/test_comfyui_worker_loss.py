"""Real ComfyUI, 3 CPU workers: a worker SIGKILLed mid-prompt (the test-only STADI_TEST_KILL_FILE hook: the
worker on that device kills itself at that step) does not fail the prompt.

- Lockstep (exact STADI Sampler; STADI Parallel Model under KSampler): the server's sampler loop holds the
  state, the failed network call goes to the survivors, and the latent equals stock KSampler's.
- Per-rank loops (displaced with strides): the loops go on, every call from the failed one on joined into
  one lockstep call on the survivors (nodes/joined_calls.py); the report names the loss. With every step
  a warmup step (synchronous context) the strided loops are exact, and so is their continuation: the
  latent equals KSampler's.
The next prompt works either way.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_support import ComfyServer, comfyui_marks, load_latent_file, require_comfyui, sd15_api_workflow  # noqa: E402

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REL_TOL = 5e-6
THREE = {"class_type": "STADIClusterProfile", "inputs": {
    "devices": "cpu*3", "backend": "gloo", "measure": False, "speeds": "cpu:0=1, cpu:1=1, cpu:2=1", "exclude": "",
    "emulate_slowdown": ""}}
COMMON = dict(seed=3, steps=5, cfg=3.0, width=128, height=192, sampler_name="dpmpp_2m")


@pytest.fixture(scope="module")
def trigger(tmp_path_factory):
    return tmp_path_factory.mktemp("kill") / "kill"


@pytest.fixture(scope="module")
def server(tiny_comfy_models, trigger):
    import os

    ckpt, lora = tiny_comfy_models
    env = dict(os.environ, STADI_TEST_KILL_FILE=str(trigger))  # workers inherit the server's environment
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], loras=[lora],
                     env=env) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _latent(server, entry, node="7"):
    return load_latent_file(server.output_files(entry, node, "latents")[0])


@pytest.fixture(scope="module")
def stock(server):
    return _latent(server, server.run(sd15_api_workflow(CKPT, lora_name=LORA, save_image=False,
                                                        filename_prefix="stock", **COMMON)))


def _stadi(prefix: str, seed: int = COMMON["seed"], **extra) -> dict:
    inputs = {"mode": "exact", "warmup_steps": 1, "strides": "off", "strategy": "bands", "cluster": ["10", 0]}
    inputs.update(extra)
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_class="STADISampler", sampler_extra_inputs=inputs,
                           save_image=False, filename_prefix=prefix, **dict(COMMON, seed=seed))
    wf["10"] = copy.deepcopy(THREE)
    return wf


def _parallel_model(prefix: str) -> dict:
    wf = sd15_api_workflow(CKPT, lora_name=LORA, save_image=False, filename_prefix=prefix, **COMMON)
    wf["50"] = copy.deepcopy(THREE)
    wf["51"] = {"class_type": "STADIParallelModel", "inputs": {
        "model": wf["6"]["inputs"]["model"], "mode": "exact", "warmup_steps": 1, "cluster": ["50", 0],
        "strategy": "bands"}}
    wf["6"]["inputs"]["model"] = ["51", 0]
    return wf


def _armed(trigger, device: str, step: int) -> None:
    trigger.write_text(f"{device} {step}")


def _fired(trigger) -> bool:
    return not trigger.exists() and any(trigger.parent.glob("kill.*.fired"))


def _relative(out, ref) -> float:
    return (out - ref).abs().max().item() / ref.abs().max().item()


def test_stadi_sampler_exact_finishes_on_the_survivors_with_ksamplers_latent(server, trigger, stock):
    _armed(trigger, "cpu:1", 2)
    entry = server.run(_stadi("lost_sampler"), timeout=600)
    assert _fired(trigger)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rel = _relative(_latent(server, entry), stock)
    print(f"STADI Sampler, cpu:1 killed at step 2: relative diff vs KSampler {rel:.2g}; notes {plan['notes']}")
    assert rel <= REL_TOL
    assert [b["device"] for b in plan["bands"]] == ["cpu:0", "cpu:2"]
    assert any(n.startswith("cpu:1 lost at step 2 (was killed by SIGKILL); its rows") and "went on from that call" in n
               for n in plan["notes"]), plan["notes"]
    # the next prompt (another seed: ComfyUI would serve the same inputs from its cache) has every device again
    again = server.run(_stadi("after_loss", seed=4), timeout=600)
    assert [b["device"] for b in again["outputs"]["6"]["stadi_plan"][0]["bands"]] == ["cpu:0", "cpu:1", "cpu:2"]


def test_parallel_model_under_ksampler_finishes_on_the_survivors(server, trigger, stock):
    for f in trigger.parent.glob("kill.*.fired"):
        f.unlink()
    _armed(trigger, "cpu:2", 3)
    log_before = len(server.log_path.read_text(errors="replace"))
    entry = server.run(_parallel_model("lost_parallel"), timeout=600)
    assert _fired(trigger)
    rel = _relative(_latent(server, entry), stock)
    log = server.log_path.read_text(errors="replace")[log_before:]
    print(f"Parallel Model, cpu:2 killed at step 3: relative diff vs KSampler {rel:.2g}")
    assert rel <= REL_TOL
    assert "cpu:2 lost at step 3 (was killed by SIGKILL)" in log
    wf = _parallel_model("after_loss_pm")
    wf["6"]["inputs"]["seed"] = 4  # not served from ComfyUI's cache
    import torch

    assert torch.isfinite(_latent(server, server.run(wf, timeout=600))).all()


def _strided(prefix: str, **extra) -> dict:
    wf = _stadi(prefix, mode="displaced", strides="auto", **extra)
    wf["10"]["inputs"]["speeds"] = "cpu:0=1, cpu:1=1, cpu:2=0.4"  # cpu:2 gets stride 3
    return wf


def test_strided_loops_go_on_joined_after_a_loss_and_stay_exact(server, trigger, stock):
    for f in trigger.parent.glob("kill.*.fired"):
        f.unlink()
    _armed(trigger, "cpu:1", 2)
    entry = server.run(_strided("lost_joined", warmup_steps=COMMON["steps"]), timeout=600)
    assert _fired(trigger)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rel = _relative(_latent(server, entry), stock)
    print(f"strided loops (all warmup), cpu:1 killed at step 2: relative diff vs KSampler {rel:.2g}; "
          f"notes {plan['notes']}")
    assert rel <= REL_TOL
    assert [b["device"] for b in plan["bands"]] == ["cpu:0", "cpu:2"]
    assert any(n.startswith("cpu:1 lost at step 2 (was killed by SIGKILL)") and "went on from that call" in n
               for n in plan["notes"]), plan["notes"]
    assert any(n.startswith("per-rank loops until step 2, then every call joined") for n in plan["notes"]), \
        plan["notes"]


def test_displaced_with_strides_goes_on_on_the_survivors_and_names_the_lost_rank(server, trigger):
    for f in trigger.parent.glob("kill.*.fired"):
        f.unlink()
    _armed(trigger, "cpu:0", 2)
    entry = server.run(_strided("lost_strided"), timeout=600)
    assert _fired(trigger)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    print(f"displaced + strides, cpu:0 killed at step 2: bands {plan['bands']}; notes {plan['notes']}")
    assert "cpu:0" not in [b["device"] for b in plan["bands"]]
    assert any(n.startswith("cpu:0 lost") and "went on from that call on the survivors" in n
               for n in plan["notes"]), plan["notes"]
    import torch

    assert torch.isfinite(_latent(server, entry)).all()
