"""Shared test setup: CPU-only workers, one warm pool per device set for the whole session."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # helpers such as comfy_support

import pack_loader  # noqa: E402,F401  - the repository as the node pack ``stadi_pack`` (its ComfyUI layer: stadi_pack.nodes)

# Bands that move mid-run follow measured times, so on a busy machine two displaced runs (or a plan's shape)
# could differ by timing alone. The suite is deterministic with re-planning off; the tests of re-planning
# turn it on themselves (test_resumable_run.py, test_comfyui_replan.py). ComfyUI servers inherit this.
os.environ.setdefault("STADI_REPLAN", "off")


@pytest.fixture(scope="session", autouse=True)
def _stop_worker_pools():
    yield
    from stadi_core.runtime.registry import shutdown_pools

    shutdown_pools()


TINY_CKPT = "stadi_tiny_sd15.safetensors"
TINY_LORA = "stadi_tiny_lora.safetensors"


@pytest.fixture(scope="session")
def tiny_comfy_models(tmp_path_factory):
    """(checkpoint, LoRA) paths: the tiny SD1.5 checkpoint ComfyUI detects, built once per session."""
    from comfy_support import require_comfyui, write_tiny_lora, write_tiny_sd15_checkpoint

    comfy = require_comfyui()
    folder = tmp_path_factory.mktemp("models")
    ckpt = write_tiny_sd15_checkpoint(folder / TINY_CKPT, seed=0, comfy=comfy)
    return ckpt, write_tiny_lora(folder / TINY_LORA, ckpt, seed=0)
