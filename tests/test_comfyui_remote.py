"""A real ComfyUI server with a worker on another machine: the second host made on this one (a network
namespace over a veth shaped to 1 Gbit/s, stadi_core/bench/netns.py), joined with
``python -m stadi_core worker --join``; the server listens because STADI_LISTEN and STADI_TOKEN are in its
environment. Exact mode with one local and one remote CPU worker equals stock KSampler; the weights reach
the remote worker by copy (it cannot map the server's memory files), a LoRA included. The plan is priced
with the link (nodes/link_pricing.py): the bytes a call sends, counted on a meta copy of the server's
network, equal what the run's transport counted, and the report says what each arrangement was predicted
to take.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_support import ComfyServer, comfyui_marks, load_latent_file, require_comfyui, sd15_api_workflow  # noqa: E402

from stadi_core.bench.netns import Unavailable, make_two_hosts  # noqa: E402

pytestmark = comfyui_marks() + [pytest.mark.netns]

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
REL_TOL = 5e-6
BYTES_TOL = 1e-6  # the count on the meta device is exact (the note rounds it to whole bytes)
TOKEN = "comfy-remote-token"
COMMON = dict(seed=3, steps=5, cfg=3.0, width=128, height=192, sampler_name="dpmpp_2m")
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def hosts():
    require_comfyui()
    try:
        h = make_two_hosts("c")
    except Unavailable as exc:
        pytest.skip(f"no second host: {exc}")
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(tiny_comfy_models, hosts):
    ckpt, lora = tiny_comfy_models
    with socket.socket() as s:
        s.bind((hosts.coordinator_ip, 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STADI_LISTEN=f"{hosts.coordinator_ip}:{port}", STADI_TOKEN=TOKEN)
    with ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], loras=[lora],
                     env=env) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        srv.stadi_address = env["STADI_LISTEN"]
        yield srv


@pytest.fixture(scope="module")
def remote(server, hosts, tmp_path_factory):
    log = tmp_path_factory.mktemp("remote") / "remote.log"
    cmd = hosts.remote_cmd([sys.executable, "-m", "stadi_core", "worker", "--join", server.stadi_address,
                            "--devices", "cpu:1", "--threads", "1"])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO, STADI_TOKEN=TOKEN), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    hosts.procs.append(proc)
    deadline = time.monotonic() + 120
    while "joined" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    assert "joined" in log.read_text(), log.read_text()
    return f"{hosts.remote_ip}/cpu:1", log


def _latent(server, entry, node="7"):
    return load_latent_file(server.output_files(entry, node, "latents")[0])


def _relative(out, ref) -> float:
    return (out - ref).abs().max().item() / ref.abs().max().item()


def _exact_bands_workflow(name: str, prefix: str) -> dict:
    """The STADI Sampler, exact bands with a LoRA, on cpu:0 and the joined device ``name``, at equal
    speeds: both devices keep a band whatever this shared host's load does to a measurement."""
    inputs = {"mode": "exact", "warmup_steps": 1, "strides": "off", "strategy": "bands", "cluster": ["10", 0]}
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_class="STADISampler", sampler_extra_inputs=inputs,
                           save_image=False, filename_prefix=prefix, **COMMON)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": f"cpu:0, {name}", "backend": "gloo", "measure": False, "speeds": f"cpu:0=1, {name}=1",
        "exclude": "", "emulate_slowdown": ""}}
    return wf


def test_remote_worker_in_comfyui_exact_equals_ksampler(server, remote):
    name, log = remote
    stock = _latent(server, server.run(sd15_api_workflow(CKPT, lora_name=LORA, save_image=False,
                                                         filename_prefix="stock", **COMMON)))
    wf = _exact_bands_workflow(name, "remote")
    entry = server.run(copy.deepcopy(wf), timeout=600)
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rel = _relative(_latent(server, entry), stock)
    print(f"ComfyUI, cpu:0 + {name}: relative diff vs KSampler {rel:.2g}; bands "
          f"{[(b['device'], b['rows']) for b in plan['bands']]}")
    print("\n".join(plan["notes"]))
    assert [b["device"] for b in plan["bands"]] == ["cpu:0", name]
    assert rel <= REL_TOL
    assert any(n.startswith("link coordinator") and name.split("/")[0] in n for n in plan["notes"]), plan["notes"]
    panel = entry["outputs"]["10"]["stadi_devices"][0]["devices"]  # the cluster node's panel: with its link
    joined = [d for d in panel if d["name"] == name]
    assert joined and joined[0]["source"] == "joined" and joined[0]["link"] and joined[0]["in_cluster"], panel
    print(f"panel: {joined[0]['label']}, {joined[0]['memory_total_mb']} MB, link {joined[0]['link']}")
    # manual speeds: the links are not priced, and the report says what crosses them all the same: the bytes
    # counted on a meta copy of the server's network, here against what the run's transport counted
    unpriced = [n for n in plan["notes"] if n.startswith(f"links to {name.split('/')[0]} not priced: manual speeds")]
    assert unpriced, plan["notes"]
    fixed, per_row = _counted_bytes(unpriced[0])
    rows = max(b["rows"] for b in plan["bands"])  # all-gathers are padded to the largest band
    for band in plan["bands"]:
        per_call = band["sent_bytes"] / band["evals"]
        print(f"{band['device']}: {band['rows']} rows, sent {per_call:.0f} B per call; counted on the meta device "
              f"{fixed:.0f} + {per_row:.0f} x {rows} = {fixed + per_row * rows:.0f} B")
        assert per_call == pytest.approx(fixed + per_row * rows, rel=BYTES_TOL)


def _priced_note(notes: list[str]) -> str:
    found = [n for n in notes if n.startswith("plan priced with the links to other machines")]
    assert found, notes
    return found[0]


def _counted_bytes(note: str) -> tuple[float, float]:
    """(fixed, per row) bytes of one synchronous call, per rank, from a report's link note."""
    m = re.search(r"context per synchronous call, per rank: ([\d,]+) B \+ ([\d,]+) B per band row", note)
    assert m, note
    return float(m.group(1).replace(",", "")), float(m.group(2).replace(",", ""))


def test_comfyui_plans_are_priced_with_the_link(server, remote):
    """strategy auto with a remote device: every arrangement priced with the link measured at join, the
    device speeds measured on the model (rows/s) and the counted bytes; the cheapest predicted is run."""
    name, _ = remote
    inputs = {"mode": "exact", "warmup_steps": 1, "strides": "off", "strategy": "auto", "cluster": ["10", 0]}
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_class="STADISampler", sampler_extra_inputs=inputs,
                           save_image=False, filename_prefix="remote_auto", **COMMON)
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": f"cpu:0, {name}", "backend": "gloo", "measure": True, "speeds": "", "exclude": "",
        "emulate_slowdown": ""}}
    plan = server.run(wf, timeout=600)["outputs"]["6"]["stadi_plan"][0]
    note = _priced_note(plan["notes"])
    print(note)
    print("\n".join(n for n in plan["notes"] if n.startswith(("strategy auto", "link coordinator"))))
    predicted = dict(re.findall(r"(single [^ ]+|cfg_split\+bands|cfg_split|bands) ([\d.e+-]+) s", note.split(";")[0]))
    assert {"bands", "cfg_split"} <= set(predicted) and any(k.startswith("single ") for k in predicted), note
    chosen = note.split("predicted per step: ")[1].split(" ")[0]
    assert float(predicted[chosen]) == min(float(t) for t in predicted.values())
    assert plan["strategy"] == ("bands" if chosen.startswith("single") else chosen)
    assert f"{name} " in note and "rows/s" in note
    assert _counted_bytes(note)[1] > 0


def test_a_killed_remote_worker_leaves_the_prompt_to_the_survivor(server, hosts, remote, tmp_path):
    """The remote worker SIGKILLs itself at step 2 (STADI_TEST_KILL_FILE, inert otherwise): the lockstep run
    goes on on cpu:0 from that call, and the latent still equals KSampler's."""
    trigger = tmp_path / "kill"
    trigger.write_text("cpu:2 2")
    log = tmp_path / "remote-killed.log"
    cmd = hosts.remote_cmd([sys.executable, "-m", "stadi_core", "worker", "--join", server.stadi_address,
                            "--devices", "cpu:2", "--threads", "1"])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO, STADI_TOKEN=TOKEN,
                                              STADI_TEST_KILL_FILE=str(trigger)),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    hosts.procs.append(proc)
    name = f"{hosts.remote_ip}/cpu:2"
    stock = _latent(server, server.run(sd15_api_workflow(CKPT, lora_name=LORA, save_image=False,
                                                         filename_prefix="stock2", **COMMON)))
    wf = _exact_bands_workflow(name, "remote_killed")
    deadline = time.monotonic() + 120
    while "joined" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    entry = server.run(wf, timeout=600)
    assert list(tmp_path.glob("kill.*.fired")), f"the remote worker was not killed:\n{log.read_text()}"
    plan = entry["outputs"]["6"]["stadi_plan"][0]
    rel = _relative(_latent(server, entry), stock)
    print(f"ComfyUI, {name} killed at step 2: relative diff vs KSampler {rel:.2g}; notes {plan['notes']}")
    assert [b["device"] for b in plan["bands"]] == ["cpu:0"]
    assert any(n.startswith(f"{name} lost at step 2") for n in plan["notes"]), plan["notes"]
    assert rel <= REL_TOL
