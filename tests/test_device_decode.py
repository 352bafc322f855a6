"""Patch Stitch decode_on=devices: each worker decodes its own band, the server stitches.

Without ComfyUI: the node falls back to the server decode (and says so) when the run's pool is
gone or the device decode fails, and a worker's decode failure leaves the pool usable.
With ComfyUI (STADI_COMFYUI_PATH, in a subprocess like every real-ComfyUI test): a random-weight
ComfyUI VAE decoded on 2 CPU workers equals the server's band decode of the same bands, is close to
the full decode (PSNR) without a visible seam (seam score), and the node's devices path gives the
server's image for the SD architecture detected from its state dict on the workers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_support import comfyui_marks
from stadi_pack.nodes import device_decode
from stadi_pack.nodes.patch_stitch_node import DECODE_ON, PatchStitch, decode_bands
from stadi_pack.nodes.types import StadiPatches
from stadi_core.errors import WorkerError
from stadi_core.planner import make_plan
from stadi_core.runtime.decode import VaeSpec
from stadi_core.runtime.messages import DecodeJob
from stadi_core.runtime.registry import get_pool

REPO = Path(__file__).resolve().parent.parent


def _patches(rows, devices):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 4, sum(rows), 6, generator=g)
    plan = make_plan(sum(rows), [1.0] * len(rows), devices=list(devices), steps=4, warmup=1, align=8).to_dict()
    start = 0
    for b, r in zip(plan["bands"], rows):
        b["row_start"], b["rows"] = start, r
        start += r
    return full, StadiPatches(plan=plan, bands=list(torch.split(full, list(rows), dim=2)), report={})


class RowVAE:
    """Not a ComfyUI VAE: each latent row -> 8 pixel rows (the device path cannot send it)."""

    def decode(self, lat):
        return (lat[:, :3] * 0.5).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).movedim(1, -1)


def test_decode_on_is_optional_and_defaults_to_server():
    it = PatchStitch.INPUT_TYPES()
    assert "decode_on" not in it["required"]
    assert it["optional"]["decode_on"][0] == DECODE_ON == ["server", "devices"]
    assert it["optional"]["decode_on"][1]["default"] == "server"


def test_devices_without_a_pool_fall_back_to_the_server_and_say_so(caplog):
    full, patches = _patches((16, 8), ["cuda:6", "cuda:7"])  # no warm pool has these devices
    vae = RowVAE()
    with caplog.at_level(logging.WARNING, logger="stadi"):
        _, _, image = PatchStitch().stitch(patches, 2, vae=vae, decode_on="devices")
    assert torch.equal(image, decode_bands(vae.decode, full, [16, 8], 2))
    assert "no longer running" in caplog.text and "decoded on the server" in caplog.text
    with pytest.raises(ValueError, match="decode_on"):
        PatchStitch().stitch(patches, 2, vae=vae, decode_on="gpu")


def test_decode_rows_follow_the_bands_or_split_evenly():
    assert device_decode.decode_rows([40, 24], 64, 2) == [40, 24]
    assert device_decode.decode_rows([64], 64, 2) == [32, 32]  # a branch split: one band
    assert device_decode.decode_rows([64], 3, 4) == [1, 1, 1]


def test_worker_decode_failure_keeps_the_pool_and_the_node_falls_back(caplog):
    """A decode that fails on the workers (here: weights they cannot map) is reported, the pool stays up,
    and the node decodes on the server instead, with a note."""
    pool = get_pool(["cpu:0", "cpu:1"], "gloo")
    gone = {"pid": os.getpid(), "fd": 1 << 20, "size": 64, "tag": "00" * 16, "entries": [["w", "float32", [4], 64]]}
    spec = VaeSpec(weights=gone, key="x", dtype="float32").to_dict()
    lat = np.zeros((1, 4, 6, 4), np.float32)
    with pytest.raises(WorkerError, match="decoding a band"):
        pool.decode(lambda job_id, rank: DecodeJob(job_id, spec, lat, 4, 0, 2) if rank == 0
                    else DecodeJob(job_id, spec, lat, 4, 2, 0), timeout_s=120)
    assert pool.alive()

    full, patches = _patches((16, 8), ["cpu:0", "cpu:1"])
    vae = RowVAE()  # found the pool, but this object cannot be sent
    with caplog.at_level(logging.WARNING, logger="stadi"):
        _, _, image = PatchStitch().stitch(patches, 2, vae=vae, decode_on="devices")
    assert torch.equal(image, decode_bands(vae.decode, full, [16, 8], 2))
    assert "decode_on=devices failed" in caplog.text
    assert pool.alive()


# ---------------------------------------------------------------- with ComfyUI (subprocess)
_SCRIPT = r"""
import json, sys, torch
from stadi_core.bench import decode as bench
out = {}
r = bench.run(bench.build_parser().parse_args(["--height", "16", "--width", "16", "--overlap", "4",
                                                 "--repeats", "1"]))
r.pop("table")
out["small"] = r

# the node itself, on the pool the bench used (found by the plan's devices), with the SD architecture
# detected from the state dict on the workers as a checkpoint's VAE is on the server
import importlib, logging
from stadi_core.runtime.registry import get_pool
class Notes(logging.Handler):
    lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())
logging.getLogger("stadi").addHandler(Notes())
logging.getLogger("stadi").setLevel(logging.INFO)
comfy = bench.setup_comfy()
pool = get_pool(["cpu:0", "cpu:1"], "gloo", extra_sys_path=[comfy])  # warm already: the bench's
pack = bench.load_pack()
node = importlib.import_module(pack.__name__ + ".nodes.patch_stitch_node")
types = importlib.import_module(pack.__name__ + ".nodes.types")
from stadi_core.planner import make_plan
vae, _ = bench.make_vae("sd", 0)
lat = bench.smooth_latent(1, 12, 8, 5)
rows = [8, 4]
plan = make_plan(12, [1.0, 1.0], devices=["cpu:0", "cpu:1"], steps=4, warmup=1, align=4).to_dict()
start = 0
for b, r in zip(plan["bands"], rows):
    b["row_start"], b["rows"] = start, r
    start += r
patches = types.StadiPatches(plan=plan, bands=list(torch.split(lat, rows, dim=2)), report={})
with torch.inference_mode():
    _, _, server = node.PatchStitch().stitch(patches, 2, vae=vae, decode_on="server")
    _, pic, devices = node.PatchStitch().stitch(patches, 2, vae=vae, decode_on="devices")
out["node"] = {"max_diff": float((server - devices).abs().max()), "shape": list(devices.shape),
               "picture": list(pic.shape), "log": Notes.lines}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def comfy_results():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads(line[0][len("RESULT "):])


def _entry(result, way, overlap):
    return next(e for e in result["entries"] if e["way"].startswith(way) and e["overlap_rows"] == overlap)


def _comfy(test):
    for mark in comfyui_marks():
        test = mark(test)
    return test


@_comfy
def test_device_decode_matches_server_bands_and_full_decode(comfy_results):
    """bench-decode's measurements (SD's decoder classes at ch 32, random weights, 2 CPU workers)."""
    overlap = 4
    r = comfy_results["small"]
    assert r["max_diff_device_vs_server"] < 1e-4  # same bands, same VAE: float rounding only
    dev = _entry(r, "device bands", overlap)
    srv = _entry(r, "server bands", overlap)
    assert abs(dev["psnr_db"] - srv["psnr_db"]) < 0.01
    assert dev["psnr_db"] > 18.0  # random weights; the mid-block attention and GroupNorms see only the band
    assert 0.8 < dev["seam_score"] < 1.25  # no visible seam
    no_overlap = _entry(r, "device bands", 0)
    assert no_overlap["seam_score"] > dev["seam_score"]  # the score does see a plain concatenation's step
    assert no_overlap["seam_score"] > 1.5
    assert all(s["peak_memory_bytes"] >= 0 and s["seconds"] > 0 for s in r["warm_stats"])
    assert len(r["warm_stats"]) == 2 and r["cold_stats"][0]["built"]


@_comfy
def test_node_decode_on_devices_equals_server(comfy_results):
    """The node's devices path (pool found by the plan's devices; the SD architecture detected on the
    workers) gives the server path's image: the same bands decoded elsewhere."""
    node = comfy_results["node"]
    assert any("decoded on the devices" in line and "cpu:1 4 rows" in line for line in node["log"]), node["log"]
    assert node["shape"] == [1, 96, 64, 3]
    assert node["max_diff"] < 1e-4
