"""A worker joined to a real ComfyUI server over loopback (no second host, no root): its device is a joined
one (``127.0.0.1/cpu:1``), so the server counts what a call sends on a meta-device copy of its network
(nodes/link_pricing.py); that count is checked here against what the run's own transports counted. The same
check across a shaped link, and the link-priced choice, are in test_comfyui_remote.py (network namespace).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_support import ComfyServer, comfyui_marks, require_comfyui, sd15_api_workflow  # noqa: E402

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
TOKEN = "comfy-loopback-token"
REPO = str(Path(__file__).resolve().parents[1])
BYTES_TOL = 1e-6  # the count on the meta device is exact (the note rounds it to whole bytes)


@pytest.fixture(scope="module")
def server(tiny_comfy_models):
    ckpt, _ = tiny_comfy_models
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STADI_LISTEN=f"127.0.0.1:{port}", STADI_TOKEN=TOKEN)
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], env=env) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        srv.stadi_address = env["STADI_LISTEN"]
        yield srv


@pytest.fixture(scope="module")
def joined(server, tmp_path_factory):
    log = tmp_path_factory.mktemp("joined") / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stadi_core", "worker", "--join", server.stadi_address,
                                 "--devices", "cpu:1", "--threads", "1"],
                                env=dict(os.environ, PYTHONPATH=REPO, STADI_TOKEN=TOKEN), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "joined" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "joined" in log.read_text(), log.read_text()
        yield "127.0.0.1/cpu:1"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def test_bytes_counted_for_the_plan_equal_what_the_transport_sent(server, joined):
    """Exact bands on cpu:0 and the joined worker (equal manual speeds keep both in, whatever this shared host's
    load does to a measurement; the links are then not priced, and the report says what crosses them)."""
    inputs = {"mode": "exact", "warmup_steps": 1, "strides": "off", "strategy": "bands", "cluster": ["10", 0]}
    wf = sd15_api_workflow(CKPT, sampler_class="STADISampler", sampler_extra_inputs=inputs, save_image=False,
                           filename_prefix="loopback", seed=3, steps=3, cfg=3.0, width=128, height=192,
                           sampler_name="euler")
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": f"cpu:0, {joined}", "backend": "gloo", "measure": False, "speeds": f"cpu:0=1, {joined}=1",
        "exclude": "", "emulate_slowdown": ""}}
    plan = server.run(wf, timeout=600)["outputs"]["6"]["stadi_plan"][0]
    print("\n".join(plan["notes"]))
    assert [b["device"] for b in plan["bands"]] == ["cpu:0", joined]
    note = next((n for n in plan["notes"] if n.startswith("links to 127.0.0.1 not priced: manual speeds")), None)
    assert note, plan["notes"]
    m = re.search(r"context per synchronous call, per rank: ([\d,]+) B \+ ([\d,]+) B per band row", note)
    fixed, per_row = (float(g.replace(",", "")) for g in m.groups())
    rows = max(b["rows"] for b in plan["bands"])  # all-gathers are padded to the largest band
    for band in plan["bands"]:
        per_call = band["sent_bytes"] / band["evals"]
        print(f"{band['device']}: {band['rows']} rows, sent {per_call:.0f} B per call; counted on the meta device "
              f"{fixed:.0f} + {per_row:.0f} x {rows} = {fixed + per_row * rows:.0f} B")
        assert band["evals"] == 3
        assert per_call == pytest.approx(fixed + per_row * rows, rel=BYTES_TOL)
