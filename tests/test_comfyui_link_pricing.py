"""The ComfyUI path's planner with a device that joined from another machine (nodes/link_pricing.py
``plan_choice``, what Deployment.plan calls), without ComfyUI or a second machine: the lobby holds the link
as if measured at join, the bytes a call sends are counted on a real model (exchange_probe.py; the count of
the ComfyUI UNet itself, against a real ComfyUI run's transport, is in test_comfyui_remote.py; the count of
ComfyUI's DiTs, against their layer inventory, is the comfyui-marked test here).

Speeds are rows/s of one both-branch call, as Deployment.measure gives them: 400 and 300 (a fast and a
slower device; unequal, so that bands, cut by speed, beat the CFG-branch split on compute alone)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_support import require_comfyui
from stadi_core.context_bytes import Inventory, Layer, legacy_exchange

from stadi_core.exchange_probe import measure_exchange
from stadi_core.models.spec import model_spec_for
from stadi_core.runtime.lobby import Lobby
from stadi_core.runtime.messages import LinkInfo
from stadi_pack.nodes import link_pricing

REMOTE = "10.77.0.2"
NAMES = ["cpu:0", f"{REMOTE}/cpu:1"]
SPEEDS = [400.0, 300.0]
PLAN = dict(strategy="auto", branches=True, align=8, steps=20, warmup=2, mode="displaced", strides="off",
            sampler="euler", ragged=True, context=None)


@pytest.fixture(scope="module")
def exchange():
    """tiny-sd15 at a 64 x 64 latent with CFG: about 1 MB + 0.16 MB per band row and call, 85 all-gathers."""
    return measure_exchange(model_spec_for("tiny-sd15"), height=64, width=64, batch=1, cfg=5.0, align=8)


@pytest.fixture
def lobby():
    lob = Lobby("127.0.0.1:0", "a-token")
    yield lob
    lob.close()


def _linked(lobby, gbps: float):
    lobby.links[REMOTE] = LinkInfo(REMOTE, gbps, 50e-6, gbps, gbps, 8 << 20)
    return lobby


def test_a_slow_link_moves_the_plan_to_the_cfg_branch_split(lobby, exchange):
    """0.01 GB/s (80 Mbit/s): bands would send ~11 MB per call across it; the branch split only its output."""
    unpriced = link_pricing.plan_choice(64, NAMES, SPEEDS, **PLAN)
    priced = link_pricing.plan_choice(64, NAMES, SPEEDS, links=(_linked(lobby, 0.01), exchange), **PLAN)
    print(unpriced.table(), priced.table(), sep="\n")
    assert unpriced.candidates[0].name == "bands"
    assert priced.candidates[0].name == "cfg_split"
    times = {c.name: c.predicted_s for c in priced.candidates}
    assert times["bands"] > 5 * times["cfg_split"]  # the link, not compute, decided
    note = link_pricing.priced_note(priced, NAMES, SPEEDS, exchange)
    assert note.startswith("plan priced with the links to other machines, predicted per step: cfg_split ")
    assert "bands " in note and "single cpu:0 " in note and "85 all-gathers" in note


def test_a_fast_link_picks_what_compute_alone_picks(lobby, exchange):
    unpriced = link_pricing.plan_choice(64, NAMES, SPEEDS, **PLAN)
    priced = link_pricing.plan_choice(64, NAMES, SPEEDS, links=(_linked(lobby, 25.0), exchange), **PLAN)
    assert priced.plan.strategy == unpriced.plan.strategy == "bands"
    assert priced.plan.rows == unpriced.plan.rows
    assert priced.candidates[0].predicted_s > unpriced.candidates[0].predicted_s  # the exchange is priced


def test_devices_of_one_machine_are_not_link_priced(lobby, exchange):
    _linked(lobby, 0.01)
    local = link_pricing.plan_choice(64, ["cpu:0", "cuda:0"], SPEEDS, links=(lobby, exchange), **PLAN)
    assert local.candidates[0].name == "bands"


# -- the count on ComfyUI's own DiTs, in a subprocess with the checkout importable ---------------------------
_DIT_COUNT = r"""
import json, sys
sys.path[:0] = [sys.argv[1]]
import comfy.options, comfy.cli_args
comfy.cli_args.args.cpu = True  # a CPU server: ComfyUI picks sub-quadratic attention, which asks for free memory
import comfy.model_detection, comfy.utils
from stadi_core.exchange_probe import measure_exchange
from stadi_core.models.spec import ModelSpec

classes = {"comfy-mmdit": "comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper",
           "comfy-flux": "comfy.ldm.flux.model:Flux"}
out = {}
for family, path in json.loads(sys.argv[2]).items():
    mc = comfy.model_detection.model_config_from_unet(dict(comfy.utils.load_torch_file(path)), "")
    config = {k: v for k, v in mc.unet_config.items() if k != "dtype"}
    spec = ModelSpec(family=family, config=config, extra={"model_class": classes[family]})  # no weights: meta
    cost = measure_exchange(spec, height=24, width=16, batch=1, cfg=1.0 if family == "comfy-flux" else 5.0, align=2)
    out[family] = {"per_row": cost.bytes_per_row, "fixed": cost.bytes_fixed, "messages": cost.messages,
                   "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, list))}}
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.comfyui
def test_dit_bytes_counted_on_the_meta_device_equal_their_layer_inventory(kind, tmp_path):
    """ComfyUI's MMDiT and Flux counted on the meta device through the override hook (sub-quadratic attention
    would raise KeyError 'active_bytes.all.current' there) against context_bytes.py's inventory of their
    image-token K/V: SD3 2 joint + 1 dual attention of width 128 with CFG, Flux 1 double + 1 single of 3072."""
    from comfy_dit_models import write_tiny_model

    comfy = require_comfyui()
    family = {"sd3": "comfy-mmdit", "flux": "comfy-flux"}[kind]
    path = write_tiny_model(kind, tmp_path / f"tiny_{kind}.safetensors", comfy=comfy)
    proc = subprocess.run([sys.executable, "-c", _DIT_COUNT, str(comfy), json.dumps({family: str(path)})],
                          capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])[family]
    config = got["config"]
    if kind == "sd3":
        width, sites, batch = 64 * config["depth"], config["depth"] + len(config["x_block_self_attn_layers"]), 2
    else:
        width, sites, batch = config["hidden_size"], config["depth"] + config["depth_single_blocks"], 1
    expected = legacy_exchange(Inventory(kind, (Layer("kv", width, 2, sites),), out_channels=16), 16, batch, 4)
    print(kind, got, expected)
    assert got["per_row"] == expected["bytes_per_row"] and got["fixed"] == expected["bytes_fixed"] == 0
    assert got["messages"] == sites
