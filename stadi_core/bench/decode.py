"""Decode benchmark: one latent decoded three ways by a random-weight ComfyUI VAE, measured.

    STADI_COMFYUI_PATH=/path/to/ComfyUI python -m stadi_core bench-decode [--height 64] [--width 64]
        [--overlap 4] [--rows 32,32] [--arch small|sd] [--out docs/bench_decode_cpu.txt] [--json FILE]

Ways: ``full`` (VAE.decode of the whole latent in this process: the reference), ``server bands``
(the Patch Stitch node's server path, decode_bands: band after band in this process, stitched),
``device bands`` (decode_on=devices: every CPU worker of a warm pool decodes its own band, in
parallel; the server stitches). Both band ways take the same bands and overlap, so they must
agree to float rounding (``max |dev - server|``).

The VAE is ComfyUI's own (comfy.sd.VAE) with seeded random weights, so nothing is downloaded:
``--arch sd`` is the SD1.x/SDXL architecture (ch 128), built by ComfyUI's detection from the
state dict as a checkpoint's VAE is; ``--arch small`` (default) the same classes at ch 32
(comfy.sd.VAE's ``config``), 16x cheaper, so 2 CPU cores decode 512 px in seconds.

Columns:
- time: seconds of the decode, warm (VAE built, weights on the workers), best of ``--repeats``;
  the device row's cold time (first call: bake the weights, build the VAE) is printed below.
- PSNR: against the full decode, peak 1 (pixels in [0, 1]).
- seam PSNR: the same, only in the pixel rows within ``overlap`` latent rows of a band boundary.
- seam score: r(image) / r(full decode), where r = the mean |difference between consecutive pixel
  rows| over the row pairs in each seam's cross-fade window (overlap 0: the pair straddling the
  seam), divided by the same mean over every other row pair. 1.0 = across the seams the rows change
  relative to the rest exactly as in the full decode (no seam); a step between bands makes it > 1.
- peak memory per device: growth of the resident set of the process that decoded (sampled every
  2 ms, runtime/decode.py RssPeak): the server process for the server ways, each worker for the
  device way (rank: MiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .. import quality

SMALL_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SD_DDCONFIG = dict(SMALL_DDCONFIG, ch=128)  # what comfy.sd.VAE detects from an SD1.x/SDXL VAE state dict


def _comfy_path(arg: str | None) -> str:
    path = arg or os.environ.get("STADI_COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        raise SystemExit("bench-decode needs ComfyUI: pass --comfyui PATH or set STADI_COMFYUI_PATH")
    return os.path.abspath(path)


def setup_comfy(path: str | None = None) -> str:
    """Put the ComfyUI checkout on sys.path, CPU options set; returns its root."""
    from ..models.comfy_common import prepare_comfy

    comfy = _comfy_path(path)
    if comfy not in sys.path:
        sys.path.insert(0, comfy)
    prepare_comfy({}, cpu=True)
    return comfy


def load_pack():
    """The repository as the node pack ComfyUI imports (its nodes/ are relative imports only)."""
    import importlib.util

    name = "stadi_pack"
    if name in sys.modules:
        return sys.modules[name]
    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_vae_state(ddconfig: dict, seed: int) -> dict:
    """ComfyUI's AutoencoderKL with seeded weights: convs/linears uniform +-1/sqrt(fan_in) (PyTorch's
    default scale; ComfyUI's layers skip their init), GroupNorms at identity."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=ddconfig["z_channels"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules(), key=lambda t: t[0]):
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                w = mod.weight
                bound = 1.0 / math.sqrt(w.shape[1] * (w[0, 0].numel() if w.dim() > 2 else 1))
                w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)
                if mod.bias is not None:
                    mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) * 2 - 1) * bound)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def make_vae(arch: str, seed: int):
    """(comfy.sd.VAE, config for the workers or None): fp32, on the CPU."""
    import comfy.sd

    if arch == "sd":
        return comfy.sd.VAE(sd=random_vae_state(SD_DDCONFIG, seed), device=torch.device("cpu"),
                            dtype=torch.float32), None
    config = {"params": {"ddconfig": dict(SMALL_DDCONFIG), "embed_dim": SMALL_DDCONFIG["z_channels"]}}
    vae = comfy.sd.VAE(sd=random_vae_state(SMALL_DDCONFIG, seed), device=torch.device("cpu"), config=config,
                       dtype=torch.float32)
    return vae, config


def smooth_latent(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Structure at a few scales plus fine noise, like a latent more than white noise is."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 4, max(1, height // 8), max(1, width // 8), generator=gen)
    mid = torch.randn(batch, 4, max(1, height // 2), max(1, width // 2), generator=gen)
    up = lambda t: torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return up(coarse) * 1.5 + up(mid) * 0.5 + 0.2 * torch.randn(batch, 4, height, width, generator=gen)


def seam_rows(rows: list[int], scale: int, overlap_rows: int) -> list[int]:
    """Pixel row pairs (y, y+1), by y, inside each seam's cross-fade window (stitch_decoded's o)."""
    px = [r * scale for r in rows]
    o = (overlap_rows * scale) // 2
    out, seam = set(), 0
    for i in range(len(px) - 1):
        seam += px[i]
        lim = min(o, px[i] if i == 0 else px[i] // 2, px[i + 1] if i + 1 == len(px) - 1 else px[i + 1] // 2)
        out.update(range(seam - max(1, lim), seam + max(0, lim - 1) + 1) if lim > 0 else [seam - 1])
    return sorted(y for y in out if 0 <= y < sum(px) - 1)


def seam_ratio(image: torch.Tensor, pairs: list[int]) -> float:
    """mean |row y+1 - row y| over the seam pairs / the same over every other pair; image (B, H, W, C)."""
    return quality.seam_score(image.permute(0, 3, 1, 2), [y + 1 for y in pairs])


def seam_score(image: torch.Tensor, full: torch.Tensor, pairs: list[int]) -> float:
    """seam_ratio of the stitched image / seam_ratio of the full decode (same pairs): 1 = the seam rows
    change against the rest exactly as in the image without seams; a step at a seam makes it > 1."""
    return seam_ratio(image, pairs) / seam_ratio(full, pairs)


def seam_strip(rows: list[int], scale: int, overlap_rows: int) -> torch.Tensor:
    """Pixel rows within ``max(1, overlap_rows)`` latent rows of a band boundary."""
    h = sum(rows) * scale
    width = max(1, overlap_rows) * scale
    mask = torch.zeros(h, dtype=torch.bool)
    seam = 0
    for r in rows[:-1]:
        seam += r * scale
        mask[max(0, seam - width): seam + width] = True
    return mask


class _Way:
    """One way of decoding: best time over the repeats, the largest memory growth, the last image."""

    def __init__(self, fn, on_device: bool = False):
        self.fn, self.on_device = fn, on_device
        self.seconds, self.memory, self.image, self.stats = math.inf, {}, None, []

    def once(self) -> None:
        from ..runtime.decode import RssPeak

        with RssPeak() as rss, torch.inference_mode():  # ComfyUI runs nodes in inference mode
            t0 = time.perf_counter()
            out = self.fn()
            self.seconds = min(self.seconds, time.perf_counter() - t0)
        if self.on_device:  # (image, DeviceDecode): memory as each worker measured it
            self.image, job = out
            self.stats = job.stats
            for st in job.stats:
                key = f"rank {st['rank']}"
                self.memory[key] = max(self.memory.get(key, 0), st["peak_memory_bytes"])
        else:
            self.image = out
            self.memory["server"] = max(self.memory.get("server", 0), rss.peak - rss.before)


def run(args) -> dict:
    import importlib

    from ..runtime.registry import get_pool

    comfy = setup_comfy(args.comfyui)
    pack = load_pack()
    stitch = importlib.import_module(f"{pack.__name__}.nodes.patch_stitch_node")
    device_decode = importlib.import_module(f"{pack.__name__}.nodes.device_decode")

    H, W, overlap = args.height, args.width, args.overlap
    if args.rows:
        rows = [int(r) for r in args.rows.split(",")]
    else:
        n = args.workers
        rows = [H // n + (1 if i < H % n else 0) for i in range(n)]
    if sum(rows) != H or len(rows) != args.workers:
        raise SystemExit(f"--rows {rows} must be {args.workers} bands summing to --height {H}")
    vae, config = make_vae(args.arch, args.seed)
    latent = smooth_latent(args.batch, H, W, args.seed + 1)
    t0 = time.perf_counter()
    pool = get_pool([f"cpu:{i}" for i in range(args.workers)], "gloo", extra_sys_path=[comfy])
    pool_start_s = time.perf_counter() - t0
    repeats = max(1, args.repeats)
    torch.set_num_threads(args.server_threads or pool.threads)

    with torch.inference_mode():
        vae.decode(latent[:, :, :8, :8])  # first call: ComfyUI's model management, allocator

    def on_devices(ov):
        job = device_decode.DeviceDecode()
        return job.run(pool, vae, latent, rows, ov, config=config), job

    cold = device_decode.DeviceDecode()
    t0 = time.perf_counter()
    cold.run(pool, vae, latent, rows, overlap, config=config)
    cold_db, cold_stats = time.perf_counter() - t0, cold.stats
    ways = {"full": _Way(lambda: vae.decode(latent)),
            "server": _Way(lambda: stitch.decode_bands(vae.decode, latent, rows, overlap)),
            "devices": _Way(lambda: on_devices(overlap), on_device=True),
            "devices0": _Way(lambda: on_devices(0), on_device=True)}
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    for _ in range(repeats):  # interleaved, so a change of the machine's load hits every way alike
        for way in ways.values():
            way.once()
    load += [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    full, t_full, m_full = ways["full"].image, ways["full"].seconds, ways["full"].memory
    sb, t_sb, m_sb = ways["server"].image, ways["server"].seconds, ways["server"].memory
    db, t_db, m_db = ways["devices"].image, ways["devices"].seconds, ways["devices"].memory
    db0, t_db0, m_db0 = ways["devices0"].image, ways["devices0"].seconds, ways["devices0"].memory
    warm_stats = ways["devices"].stats
    scale = full.shape[1] // H
    pairs = seam_rows(rows, scale, overlap)
    pairs0 = seam_rows(rows, scale, 0)
    strip = seam_strip(rows, scale, overlap)
    mib = lambda b: b / 2**20

    def entry(way, image, seconds, memory, ov, seam_pairs):
        return {"way": way, "overlap_rows": ov, "seconds": seconds, "psnr_db": quality.psnr(image, full),
                "seam_psnr_db": quality.psnr(image[:, strip], full[:, strip]),
                "seam_score": seam_score(image, full, seam_pairs), "seam_ratio": seam_ratio(image, seam_pairs),
                "full_seam_ratio": seam_ratio(full, seam_pairs),
                "peak_memory_mib": {k: mib(v) for k, v in memory.items()}}

    entries = [
        entry("full (server)", full, t_full, m_full, None, pairs),
        entry("server bands", sb, t_sb, m_sb, overlap, pairs),
        entry(f"device bands ({args.workers} workers)", db, t_db, m_db, overlap, pairs),
        entry(f"device bands ({args.workers} workers)", db0, t_db0, m_db0, 0, pairs0),
    ]
    max_diff = float((db - sb).abs().max())
    threads = torch.get_num_threads()
    lines = [
        f"bench-decode: latent {args.batch}x4x{H}x{W} -> {full.shape[1]}x{full.shape[2]} px, random-weight ComfyUI VAE "
        f"(arch {args.arch}: {'SD1.x/SDXL, detected from the state dict' if args.arch == 'sd' else 'SD classes at ch 32, from a config'}), "
        f"fp32, bands {rows} latent rows, overlap_rows {overlap}",
        f"server: this process, {threads} torch thread(s); devices: {args.workers} CPU workers, {pool.threads} torch "
        f"thread(s) each; {os.cpu_count()} CPU cores; best of {repeats}, ways interleaved; pool start {pool_start_s:.1f} s; "
        f"load average {' -> '.join(f'{x:.1f}' for x in load)} (other processes share these cores)",
        "",
        f"{'way':<28} {'overlap':>7} {'time s':>8} {'PSNR dB':>8} {'seam PSNR':>9} {'seam score':>10}"
        f"  peak memory per device (MiB, RSS growth)",
    ]
    for e in entries:
        ov = "-" if e["overlap_rows"] is None else str(e["overlap_rows"])
        mem = ", ".join(f"{k} {v:.0f}" for k, v in e["peak_memory_mib"].items())
        lines.append(f"{e['way']:<28} {ov:>7} {e['seconds']:>8.2f} {e['psnr_db']:>8.2f} {e['seam_psnr_db']:>9.2f} "
                     f"{e['seam_score']:>10.3f}  {mem}")
    lines += [
        "",
        f"device bands vs server bands (same bands, overlap {overlap}): max |difference| = {max_diff:.3g}",
        f"device decode, cold (bake the VAE weights, build the VAE on each worker): {cold_db:.2f} s; "
        + ", ".join(f"rank {s['rank']} build {s.get('build_s', 0):.2f} s + decode {s['seconds']:.2f} s"
                    for s in cold_stats),
        "per rank, warm: " + ", ".join(f"rank {s['rank']} {s['decoded_rows']} latent rows decoded "
                                       f"({s['rows']} own) in {s['seconds']:.2f} s" for s in warm_stats),
        "memory: " + (warm_stats[0]["memory"] if warm_stats else "") + "; server rows: the same measure in this process",
        "seam score: r(image) / r(full decode), r = mean |row y+1 - row y| over the row pairs of each seam's "
        "cross-fade window (overlap 0: the pair across the seam) / the same over every other pair; 1 = no seam",
        "PSNR: vs the full decode, peak 1; seam PSNR: only the pixel rows within max(1, overlap) latent rows of a seam",
    ]
    return {"table": "\n".join(lines), "entries": entries, "max_diff_device_vs_server": max_diff, "rows": rows,
            "scale": scale, "cold_device_s": cold_db, "cold_stats": cold_stats, "warm_stats": warm_stats,
            "pool_start_s": pool_start_s, "arch": args.arch, "load_average": load}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stadi_core bench-decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $STADI_COMFYUI_PATH)")
    p.add_argument("--height", type=int, default=64, help="latent rows (image px / 8)")
    p.add_argument("--width", type=int, default=64, help="latent columns")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rows", help="latent rows per worker, e.g. 40,24 (default: equal)")
    p.add_argument("--overlap", type=int, default=4, help="overlap_rows of the Patch Stitch node")
    p.add_argument("--arch", default="small", choices=["small", "sd"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--server-threads", type=int, help="torch threads of the server ways (default: a worker's, "
                   "so each way gets one device's worth of cores per device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--json", help="write the measurements as JSON to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = result["table"]
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    return 0
