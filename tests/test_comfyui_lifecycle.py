"""The STADI workers' memory is given back in a real ComfyUI server (fetched checkout; STADI_COMFYUI_PATH).

Issue #16 item 2: a server stopped with SIGTERM (systemd, docker) or SIGKILL leaves no worker and no
file of the pack in /dev/shm or the temp dir; ``POST /free {"unload_models": true}`` (the frontend's
"Unload models") stops the warm workers and the next prompt starts new ones; 50 prompts of varied
sizes and samplers through /prompt all succeed and the memory of server + workers does not grow.

Processes and memory are read from /proc (Linux): a worker is a child of the server running
``stadi_core.runtime.worker``. One ComfyUI server at a time: the signal tests start and end their own
before the module's shared server starts.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from comfy_support import ComfyServer, comfyui_marks, load_latent_file, require_comfyui, sd15_api_workflow
from helpers import gone

pytestmark = comfyui_marks()

CKPT = "stadi_tiny_sd15.safetensors"
LORA = "stadi_tiny_lora.safetensors"
SHM = Path("/dev/shm")
WORKER_MODULE = b"stadi_core.runtime.worker"
DEADLINE_S = 30.0


# -- processes and files, from /proc ---------------------------------------------------------------
def _status(pid: int) -> dict:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _status(int(d.name)).get("PPid", "").strip() == str(pid):
            out.append(int(d.name))
    return out


def _worker_pids(server_pid: int) -> list[int]:
    """The server's live children that run a STADI worker."""
    pids = []
    for pid in _children(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if WORKER_MODULE in cmd.replace(b"\0", b" ") and not gone(pid):
            pids.append(pid)
    return sorted(pids)


def _rss_bytes(pid: int) -> int:
    field = _status(pid).get("VmRSS", "0 kB").split()
    return int(field[0]) * 1024 if field else 0


def _tree_rss(server_pid: int) -> tuple[int, str]:
    """(RSS of the server + every descendant, "pid: MB" per process). Pages shared between them (the
    weights workers map from the server) count once per process, as RSS does."""
    todo, seen = [server_pid], []
    while todo:
        pid = todo.pop()
        seen.append((pid, _rss_bytes(pid)))
        todo.extend(_children(pid))
    return sum(r for _, r in seen), ", ".join(f"{p}: {r / 2**20:.0f} MB" for p, r in seen)


def _stadi_names() -> set[str]:
    """Paths in /dev/shm and the temp dir (top level) whose names mention stadi."""
    names = set()
    for base in {SHM, Path(tempfile.gettempdir())}:
        if base.is_dir():
            names.update(str(p) for p in base.iterdir() if "stadi" in p.name.lower())
    return names


def _pids_in(name: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d{2,}", Path(name).name)]


def _pack_leftovers(before: set[str], ours: set[int], srv: ComfyServer) -> list[str]:
    """New stadi names since ``before``, less what is not this server's: the test harness's own server
    root (``stadi-comfy-*``, made by comfy_support) and files named after a live process that is not
    ours (other test runs on this machine)."""
    out = []
    for name in sorted(_stadi_names() - before):
        if Path(name) == srv.root or Path(name).name.startswith("stadi-comfy-"):
            continue
        pids = _pids_in(name)
        if pids and not set(pids) & ours and any(not gone(p) for p in pids):
            continue
        out.append(name)
    return out


def _until(cond, timeout: float = DEADLINE_S, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return bool(cond())


# -- workflows -------------------------------------------------------------------------------------
def _cluster() -> dict:
    return {"class_type": "STADIClusterProfile", "inputs": {"devices": "cpu*2", "backend": "gloo", "measure": False,
                                                            "speeds": "cpu:0=2, cpu:1=3", "exclude": "",
                                                            "emulate_slowdown": ""}}


def _stadi_sampler(seed: int, sampler: str = "euler", width: int = 64, height: int = 128, steps: int = 2,
                   prefix: str = "life") -> dict:
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_name=sampler, sampler_class="STADISampler", seed=seed,
                           steps=steps, cfg=4.0, width=width, height=height, save_image=False, filename_prefix=prefix,
                           sampler_extra_inputs={"mode": "exact", "warmup_steps": 1, "strides": "off",
                                                 "cluster": ["10", 0]})
    wf["10"] = _cluster()
    return wf


def _parallel_model(seed: int, sampler: str = "euler", width: int = 64, height: int = 128, steps: int = 2,
                    prefix: str = "life") -> dict:
    """Stock KSampler on a STADI Parallel Model."""
    wf = sd15_api_workflow(CKPT, lora_name=LORA, sampler_name=sampler, seed=seed, steps=steps, cfg=4.0,
                           width=width, height=height, save_image=False, filename_prefix=prefix)
    wf["10"] = _cluster()
    wf["11"] = {"class_type": "STADIParallelModel", "inputs": {"model": wf["6"]["inputs"]["model"], "mode": "exact",
                                                               "warmup_steps": 1, "cluster": ["10", 0],
                                                               "strategy": "bands"}}
    wf["6"]["inputs"]["model"] = ["11", 0]
    return wf


def _run_ok(srv: ComfyServer, wf: dict, timeout: float = 300.0) -> torch.Tensor:
    entry = srv.run(wf, timeout=timeout)
    files = srv.output_files(entry, "7", "latents")
    assert files, f"no latent saved: {entry.get('outputs')}"
    latent = load_latent_file(files[0])
    assert torch.isfinite(latent).all()
    return latent


def _server(models) -> ComfyServer:
    ckpt, lora = models
    return ComfyServer(require_comfyui(), custom_nodes=ComfyServer.stadi_pack(), checkpoints=[ckpt], loras=[lora])


# -- 1. a stopped server leaves nothing behind ----------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_server_leaves_no_worker_and_no_file(tiny_comfy_models, sig):
    before = _stadi_names()
    with _server(tiny_comfy_models) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        _run_ok(srv, _stadi_sampler(seed=1, prefix="sig"))
        workers = _worker_pids(srv.pid)
        assert len(workers) == 2, f"expected 2 STADI workers under the server, found {workers}"
        during = sorted(_stadi_names() - before)
        print(f"\n{sig.name}: server {srv.pid}, workers {workers}; pack names while running: {during}")
        os.kill(srv.pid, sig)  # the server process only, as docker does; systemd would signal the group
        assert _until(lambda: srv.proc.poll() is not None, DEADLINE_S), f"the server ignored {sig.name}"
        left = [p for p in workers if not gone(p)]
        assert _until(lambda: all(gone(p) for p in workers)), \
            f"workers {left} still run {DEADLINE_S:.0f} s after {sig.name} stopped the server"
        ours = {srv.pid, *workers}
        leftovers = _pack_leftovers(before, ours, srv)
        # checked before the harness's cleanup (its stop() kills the process group, its exit removes the root)
        assert not leftovers, (f"after {sig.name} of the server these files of the pack remain in /dev/shm or "
                               f"{tempfile.gettempdir()}: {leftovers}")


# -- 2. POST /free and the 50 prompts share one server ----------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_comfy_models):
    with _server(tiny_comfy_models) as srv:
        assert not srv.custom_node_import_failures(), srv.log_tail()
        yield srv


def _reported_pids(srv: ComfyServer) -> list[int]:
    return sorted(w["pid"] for p in srv._get("/stadi/workers") for w in p["workers"])


@pytest.mark.parametrize("route, body", [
    ("/free", {"unload_models": True}),
    ("/api/free", {"unload_models": True, "free_memory": True}),  # what the frontend's buttons send
], ids=["free-unload_models", "api-free-both"])
def test_free_stops_the_workers_and_the_next_prompt_starts_new_ones(server, route, body):
    seed = 100 + len(route)
    _run_ok(server, _stadi_sampler(seed=seed, prefix="free"))
    workers = _worker_pids(server.pid)
    assert len(workers) == 2, workers
    assert _reported_pids(server) == workers  # GET /stadi/workers says the same as /proc
    t0 = time.monotonic()
    server._request("POST", route, body)
    assert _until(lambda: all(gone(p) for p in workers) and not _worker_pids(server.pid)), \
        f"POST {route} {body}: workers {[p for p in workers if not gone(p)]} still run after {DEADLINE_S:.0f} s"
    print(f"\nPOST {route} {body}: workers {workers} gone after {time.monotonic() - t0:.2f} s")
    assert _reported_pids(server) == []
    _run_ok(server, _stadi_sampler(seed=seed + 1, prefix="after_free"))  # a new seed: not a cached result
    fresh = _worker_pids(server.pid)
    assert len(fresh) == 2 and not set(fresh) & set(workers), (workers, fresh)


def test_free_without_unload_leaves_the_workers_warm(server):
    _run_ok(server, _stadi_sampler(seed=7, prefix="keep"))
    workers = _worker_pids(server.pid)
    server._request("POST", "/free", {"unload_models": False, "free_memory": False})
    time.sleep(1.0)
    assert _worker_pids(server.pid) == workers


# -- 3. fifty prompts: all succeed, memory stays flat --------------------------------------------
SAMPLERS = ["euler", "dpmpp_2m", "ddim", "euler_ancestral", "heun", "dpmpp_2m_sde", "lms", "uni_pc"]
WIDTHS = [64, 128, 192]
HEIGHTS = [128, 192]  # two bands of SD1.5's 8 latent rows need 128 px at least


def test_fifty_prompts_of_varied_sizes_and_samplers_keep_memory_flat(server):
    rss = {}
    t0 = time.monotonic()
    for i in range(50):
        make = _stadi_sampler if i % 2 == 0 else _parallel_model
        w, h = WIDTHS[i % 3], HEIGHTS[(i // 3) % 2]
        sampler = SAMPLERS[i % len(SAMPLERS)]
        try:
            latent = _run_ok(server, make(seed=1000 + i, sampler=sampler, width=w, height=h, prefix=f"p{i}"))
        except Exception as exc:
            raise AssertionError(f"prompt {i + 1} ({make.__name__}, {sampler}, {w}x{h}) failed: {exc}") from None
        assert latent.shape[-2:] == (h // 8, w // 8)
        if i + 1 in (5, 50):
            rss[i + 1] = _tree_rss(server.pid)
            print(f"\nafter prompt {i + 1}: server + workers RSS {rss[i + 1][0] / 2**20:.1f} MB "
                  f"({rss[i + 1][1]}), {time.monotonic() - t0:.0f} s")
    (fifth, _), (last, _) = rss[5], rss[50]
    print(f"RSS after the 5th: {fifth / 2**20:.1f} MB, after the 50th: {last / 2**20:.1f} MB "
          f"(ratio {last / fifth:.3f}); 50 prompts in {time.monotonic() - t0:.0f} s")
    assert last <= 1.10 * fifth, (f"server + workers grew from {fifth / 2**20:.1f} MB after the 5th prompt to "
                                  f"{last / 2**20:.1f} MB after the 50th (> 10 %): something is kept per prompt")
