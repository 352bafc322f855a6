"""Host memory of a STADI run in the real ComfyUI: the server, the pack's files, each worker, bytes sent.

A full-size SD1.5 checkpoint (the real 0.86 B-parameter UNet, random weights, written once by the
test helpers) runs through a ComfyUI server with 2 CPU workers: a baseline prompt that only loads
the checkpoint (what ComfyUI itself holds), then the STADI Sampler with a LoRA, then the same with
the LoRA at another strength (a LoRA change). While each prompt runs, a thread samples the server's
and every worker's memory. Everything is printed as multiples of the network's size as ComfyUI holds
it (fp32 on a CPU):

- server: peak RSS during the prompt above the baseline's;
- files: bytes the pack left in /dev/shm and the temp dir (new entries since before the server started);
- worker RSS: peak resident set (the server's shared pages a worker reads count here too);
- worker private: peak private memory (Private_Clean + Private_Dirty of smaps_rollup): what the worker
  holds on its own;
- sent: what the server produced for the workers during the prompt: bytes written by the server
  process (/proc/PID/io wchar: control socket and any weight files), plus shared memory it published
  for them (the pack logs each publication).

``--pack DIR`` runs another checkout of the pack (e.g. a worktree of an older commit) for a before/after
table. Needs a ComfyUI checkout (``--comfyui`` or STADI_COMFYUI_PATH) and this repository's tests/
(the server harness). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CKPT = "stadi_full_sd15.safetensors"
LORA = "stadi_full_sd15_lora.safetensors"
_PUBLISHED = re.compile(r"STADI: .*shared with the workers \(([\d.]+) MB")


def _harness():
    tests = REPO / "tests"
    if not (tests / "comfy_support.py").exists():
        raise SystemExit("bench-memory needs the repository's tests/comfy_support.py (run it from a source checkout)")
    sys.path.insert(0, str(tests))
    import comfy_support

    return comfy_support


def _kb(path: str, keys: tuple) -> int:
    total = 0
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    total += int(rest.split()[0])
    except OSError:
        return 0
    return total * 1024


def rss(pid: int) -> int:
    return _kb(f"/proc/{pid}/status", ("VmRSS",))


def private(pid: int) -> int:
    return _kb(f"/proc/{pid}/smaps_rollup", ("Private_Clean", "Private_Dirty"))


def written(pid: int) -> int:
    return _kb(f"/proc/{pid}/io", ("wchar",)) // 1024  # io lists bytes, not kB


def worker_pids(server_pid: int) -> list[int]:
    """The server's children that run a STADI worker."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"stadi_core.runtime.worker" in cmd:
            pids.append(int(entry))
    return sorted(pids)


class Peaks:
    """Peak memory of the server and its workers while the block runs, sampled by a thread."""

    def __init__(self, server_pid: int, interval_s: float = 0.1):
        self.server_pid, self.interval_s = server_pid, interval_s
        self.server = 0
        self.worker_rss: dict[int, int] = {}
        self.worker_private: dict[int, int] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.server = max(self.server, rss(self.server_pid))
        for pid in worker_pids(self.server_pid):
            self.worker_rss[pid] = max(self.worker_rss.get(pid, 0), rss(pid))
            self.worker_private[pid] = max(self.worker_private.get(pid, 0), private(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "Peaks":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


_NOT_THE_PACK = ("stadi-comfy-", "stadi-test-cache")  # the test harness's server roots and model cache


def pack_files(before: set) -> tuple[int, list[str]]:
    """(bytes, names) of what appeared since ``before``: anything new in /dev/shm (it is RAM), and in
    the temp dir whatever carries the pack's name (other processes share the temp dir)."""
    total, names = 0, []
    for entry in sorted(_entries() - before):
        path = Path(entry)
        if str(path.parent) != "/dev/shm" and ("stadi" not in path.name or path.name.startswith(_NOT_THE_PACK)):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        total += size
        names.append(f"{entry} ({size / 2**20:,.0f} MiB)")
    return total, names


def _entries() -> set:
    dirs = [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
    return {os.path.join(d, name) for d in dirs for name in os.listdir(d)}


def _published_mb(log: Path, offset: int) -> tuple[float, int]:
    text = log.read_text(errors="replace")
    return sum(float(m) for m in _PUBLISHED.findall(text[offset:])), len(text)


def _lora_targets() -> list[str]:
    """Every attention projection of the real SD1.5 UNet (a typical LoRA's targets)."""
    blocks = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + \
             [f"output_blocks.{i}.1" for i in range(3, 12)]
    return [f"{b}.transformer_blocks.0.{a}.{p}" for b in blocks for a in ("attn1", "attn2")
            for p in ("to_q", "to_k", "to_v", "to_out.0")]


def _workflow(cs, *, lora_strength: float | None, size: int, steps: int) -> dict:
    if lora_strength is None:  # ComfyUI's own baseline: the checkpoint loaded, nothing sampled
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
                "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
                "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
                "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}
    wf = cs.sd15_api_workflow(CKPT, lora_name=LORA, lora_strength=lora_strength, width=size, height=size,
                              steps=steps, cfg=5.0, sampler_class="STADISampler", save_image=False,
                              sampler_extra_inputs={"mode": "exact", "warmup_steps": 1, "strides": "off",
                                                    "cluster": ["10", 0]})
    wf["10"] = {"class_type": "STADIClusterProfile", "inputs": {
        "devices": "cpu*2", "backend": "gloo", "measure": False, "speeds": "", "exclude": "", "emulate_slowdown": ""}}
    return wf


def run(args) -> str:
    cs = _harness()
    comfy = Path(args.comfyui or os.environ.get("STADI_COMFYUI_PATH") or "")
    if not (comfy / "main.py").exists():
        raise SystemExit("set --comfyui or STADI_COMFYUI_PATH to a ComfyUI checkout")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = cs.write_full_sd15_checkpoint(work / CKPT, comfy=comfy)
    lora = work / LORA
    if not lora.exists():
        cs.write_tiny_lora(lora, ckpt, rank=16, targets=_lora_targets())
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))
    network = params * 4  # fp32: how ComfyUI holds an SD1.5 UNet on a CPU
    root = work / "server"
    shutil.rmtree(root, ignore_errors=True)  # a fresh server folder: its custom_nodes link names --pack
    before = _entries() | {str(work)}
    pack = Path(args.pack).resolve() if args.pack else REPO
    rows = []
    with cs.ComfyServer(comfy, custom_nodes={"comfyui-stadi": pack}, checkpoints=[ckpt], loras=[lora],
                        root=root) as srv:
        log_offset = 0
        srv.run(_workflow(cs, lora_strength=None, size=args.size, steps=args.steps), timeout=1800)
        baseline = rss(srv.pid)
        _, log_offset = _published_mb(srv.log_path, log_offset)
        for label, strength in (("first STADI prompt (LoRA 0.8)", 0.8), ("after a LoRA change (0.6)", 0.6),
                                ("same LoRA again (warm)", 0.6)):
            w0 = written(srv.pid)
            with Peaks(srv.pid) as peaks:
                srv.run(_workflow(cs, lora_strength=strength, size=args.size, steps=args.steps), timeout=1800)
            sent_socket = written(srv.pid) - w0
            published, log_offset = _published_mb(srv.log_path, log_offset)
            files, names = pack_files(before)
            rows.append(dict(label=label, server=peaks.server - baseline, files=files, file_names=names,
                             worker_rss=sorted(peaks.worker_rss.values()),
                             worker_private=sorted(peaks.worker_private.values()),
                             sent=sent_socket + int(published * 1e6)))
    return _table(rows, network, baseline, pack, args)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _table(rows: list, network: int, baseline: int, pack: Path, args) -> str:
    x = lambda b: f"{b / network:.2f}x"  # noqa: E731
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [f"bench-memory: full SD1.5 UNet ({network / 4 / 1e9:.3f} B params, network = {mb(network)} in fp32), "
             f"2 CPU workers, exact, {args.size}x{args.size} px, {args.steps} steps; pack {pack}",
             f"ComfyUI baseline (checkpoint loaded, nothing sampled): server RSS {mb(baseline)}",
             "", "| prompt | server above baseline | pack files | server + files | worker peak RSS | "
             "worker peak private | sent to workers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        w_rss = " / ".join(x(b) for b in r["worker_rss"]) or "-"
        w_priv = " / ".join(x(b) for b in r["worker_private"]) or "-"
        lines.append(f"| {r['label']} | {x(r['server'])} ({mb(r['server'])}) | {x(r['files'])} ({mb(r['files'])}) | "
                     f"{x(r['server'] + r['files'])} | {w_rss} | {w_priv} | {x(r['sent'])} ({mb(r['sent'])}) |")
    lines += ["", "pack files after the last prompt: " + (", ".join(rows[-1]["file_names"]) or "none")]
    lines += ["", "Goals (issue #16): server + files <= 0.30x; worker private <= 0.50x; a LoRA change sends < 0.05x."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stadi_core bench-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $STADI_COMFYUI_PATH)")
    p.add_argument("--pack", help="the pack checkout the server loads (default: this repository)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "stadi-bench-memory"),
                   help="where the checkpoint, LoRA and server folder go")
    p.add_argument("--size", type=int, default=128, help="image size in px (square; SD1.5 bands are 8 latent rows = 64 px)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", help="also write the table to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
