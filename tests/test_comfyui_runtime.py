"""Issue #16 item 3 in a real ComfyUI server (STADI_COMFYUI_PATH): a worker whose main thread hangs
(heartbeats still flowing) ends the prompt within the call deadline with an error naming the rank;
an Interrupt while it hangs ends the prompt within 2 s; the next prompt succeeds on a fresh pool.

The server runs with the test-only ``STADI_TEST_STALL_FILE`` (workers inherit it): while that file
exists, the listed rank hangs at the start of its next band call, and ``<file>.stalled`` records
when. ``STADI_CALL_DEADLINE_S`` is small so the stuck error comes quickly.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from comfy_support import (
    ComfyServer,
    comfyui_marks,
    load_latent_file,
    require_comfyui,
    sd15_api_workflow,
)

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
DEADLINE_S = 6
SHAPES = {"lockstep": ("off", "cpu:0=1, cpu:1=1"), "strided": ("auto", "cpu:0=1, cpu:1=0.3")}


@pytest.fixture(scope="module")
def stall_file(tmp_path_factory):
    return tmp_path_factory.mktemp("stall") / "stall"


@pytest.fixture(scope="module")
def server(tiny_comfy_models, stall_file):
    ckpt, _ = tiny_comfy_models
    env = dict(os.environ, STADI_TEST_STALL_FILE=str(stall_file), STADI_CALL_DEADLINE_S=str(DEADLINE_S))
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], env=env) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


@pytest.fixture
def stall(stall_file):
    """arm(rank) makes that rank hang in its next band call; always disarmed afterwards."""
    marker = stall_file.with_name(stall_file.name + ".stalled")

    def arm(rank: int):
        marker.unlink(missing_ok=True)
        stall_file.write_text(str(rank))
        return marker

    yield arm
    stall_file.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)


def _workflow(shape: str, prefix: str, steps: int = 4) -> dict:
    strides, speeds = SHAPES[shape]
    wf = sd15_api_workflow(CKPT, sampler_class="STADISampler", save_image=False, filename_prefix=prefix, steps=steps,
                           width=128, height=192, sampler_extra_inputs={
                               "mode": "displaced", "warmup_steps": 1, "strides": strides, "cluster": ["10", 0]})
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": "cpu*2", "backend": "gloo", "measure": False, "speeds": speeds, "exclude": "",
        "emulate_slowdown": ""}}
    return wf


def _wait_end(server, pid: str, timeout: float) -> tuple[dict, float]:
    """(history entry, unix time it was first seen): polled every 50 ms, to time the prompt's end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.history(pid)
        if entry is not None and entry.get("status") is not None:
            return entry, time.time()
        assert server.alive(), server.log_tail()
        time.sleep(0.05)
    raise AssertionError(f"prompt {pid} did not end within {timeout:.0f} s:\n{server.log_tail()}")


def _wait_file(path, timeout: float, server) -> float:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no worker hung within {timeout:.0f} s:\n{server.log_tail()}"
        time.sleep(0.05)
    time.sleep(0.05)  # the line is written right after the file appears
    return float(path.read_text().split()[1])


def _next_prompt_succeeds(server, shape: str, prefix: str) -> None:
    entry = server.run(_workflow(shape, prefix, steps=3), timeout=600)
    latent = load_latent_file(server.output_files(entry, "7", "latents")[0])
    assert torch.isfinite(latent).all()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_stuck_worker_ends_the_prompt_within_the_deadline_naming_the_rank(server, stall, shape):
    marker = stall(1)
    pid = server.queue(_workflow(shape, f"stuck{shape}"))
    hung_at = _wait_file(marker, 600, server)
    entry, ended = _wait_end(server, pid, 120)
    took = ended - hung_at
    text = str(entry["status"])
    print(f"{shape}: stuck worker error {took:.1f} s after rank 1 hung (deadline {DEADLINE_S} s)")
    assert entry["status"]["status_str"] == "error", text
    assert "worker rank 1 (cpu:1) made no progress" in text and "evaluating a band" in text, text[-3000:]
    assert DEADLINE_S <= took < DEADLINE_S + 4, took
    marker.with_name(marker.name.removesuffix(".stalled")).unlink()  # disarm
    _next_prompt_succeeds(server, shape, f"afterstuck{shape}")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_interrupt_ends_a_prompt_with_a_stuck_worker_within_2s(server, stall, shape):
    marker = stall(1)
    pid = server.queue(_workflow(shape, f"int{shape}"))
    _wait_file(marker, 600, server)
    time.sleep(1.0)  # well inside the hung call
    t0 = time.time()
    server.interrupt()
    entry, ended = _wait_end(server, pid, 60)
    took = ended - t0
    print(f"{shape}: interrupt ended the prompt in {took:.2f} s")
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert "execution_interrupted" in str(entry["status"]["messages"]), entry["status"]
    assert took < 2.0, took
    marker.with_name(marker.name.removesuffix(".stalled")).unlink()  # disarm
    _next_prompt_succeeds(server, shape, f"afterint{shape}")
