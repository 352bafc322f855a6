"""Patch Stitch's decode on the devices: every worker of the run decodes its own band in parallel.

The server shares the VAE's weights once (weights.shared_vae: its own pages), sends each rank of the run's
warm worker pool its band of the latent with ``overlap_rows`` rows of its neighbours
(band_extensions: the same slices the server's decode_bands takes), the workers build ComfyUI's
VAE from those weights and decode (stadi_core/runtime/decode.py), and the server cross-fades the
pixel bands with the same stitch as the server-side band decode. So for the same bands the image
equals the server's band decode up to float rounding of the device.

Which pool: the one that computed the bands, found among the warm pools by the plan's band
devices (the key Deployment's pool has) or by ``StadiPatches.pool_key``. None reachable, a
latent this path does not take, or a worker failure: ``DeviceDecode.run`` returns no image and
a note saying why, and the node decodes on the server (logged, and the note is drawn).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from stadi_core.runtime.decode import VaeSpec
from stadi_core.runtime.messages import DecodeJob

from .patch_stitch_node import band_extensions, stitch_band_images

log = logging.getLogger("stadi")

DECODE_TIMEOUT_S = 600.0


def vae_spec(vae, config: dict | None = None) -> VaeSpec:
    """What a worker rebuilds ``vae`` (a comfy.sd.VAE) from; ``config`` when it was built from one."""
    import comfy.cli_args

    from stadi_core.models.comfy_common import mirrored_args

    from .weights import shared_vae

    weights, key = shared_vae(vae)
    cls = type(vae.first_stage_model)
    mirrored = mirrored_args(comfy.cli_args.args)
    return VaeSpec(weights=weights, key=key, dtype=str(vae.vae_dtype).split(".")[-1],
                   model_class=f"{cls.__module__}:{cls.__qualname__}", config=config, comfy_args=mirrored)


def plan_devices(plan: dict) -> tuple:
    return tuple(b["device"] for b in plan.get("bands", []))


def find_pool(patches):
    """(warm pool of the run, None) or (None, why not)."""
    from stadi_core.runtime.registry import warm_pools

    if patches.pool_key:
        devices, backend = tuple(patches.pool_key[0]), patches.pool_key[1]
    else:
        devices, backend = plan_devices(patches.plan), None
    if not devices:
        return None, "the patches name no devices"
    for p in warm_pools(devices, backend):
        return p, None
    return None, f"the worker pool of this run ({', '.join(devices)}) is no longer running"


def decode_rows(rows: list[int], height: int, world_size: int) -> list[int]:
    """Latent rows per rank: the run's bands when there is one per rank (sized to each device's
    speed), else (a branch split: one band) rows split evenly over the ranks."""
    if len(rows) == world_size and sum(rows) == height:
        return list(rows)
    n = max(1, min(world_size, height))
    return [height // n + (1 if i < height % n else 0) for i in range(n)]


@dataclass
class DeviceDecode:
    """One decode on the devices; ``stats`` per rank and ``notes`` (why it fell back, or what it cost)."""

    stats: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def run(self, pool, vae, latent: torch.Tensor, rows: list[int], overlap_rows: int, *,
            config: dict | None = None, timeout_s: float = DECODE_TIMEOUT_S) -> torch.Tensor:
        """Decode ``latent`` in bands of ``rows`` (band i on rank i) and stitch; raises on failure."""
        if latent.dim() != 4:
            raise ValueError(f"decode on the devices takes image latents (B, C, H, W), not {tuple(latent.shape)}")
        rows = [int(r) for r in rows]
        if sum(rows) != latent.shape[2] or len(rows) > pool.world_size:
            raise ValueError(f"bands of {rows} rows for a latent of {latent.shape[2]} rows on "
                             f"{pool.world_size} ranks")
        overlap_rows = max(0, int(overlap_rows))
        t0 = time.perf_counter()
        spec = vae_spec(vae, config).to_dict()
        bake_s = time.perf_counter() - t0
        ext = band_extensions(rows, overlap_rows)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        samples = latent.detach().float().cpu() if latent.dtype == torch.bfloat16 else latent.detach().cpu()

        def make_job(job_id: int, rank: int) -> DecodeJob:
            a, b = ext[rank]
            band = samples[:, :, starts[rank] - a: starts[rank] + rows[rank] + b].contiguous().numpy()
            return DecodeJob(job_id, spec, band, rows[rank], a, b)

        results = pool.decode(make_job, range(len(rows)), timeout_s=timeout_s)
        images = [torch.from_numpy(results[r].pixels) for r in range(len(rows))]
        image = stitch_band_images(images, rows, overlap_rows)
        self.wall_s = time.perf_counter() - t0
        self.stats = []
        for r in range(len(rows)):
            res = results[r]
            self.stats.append({**res.info, "rank": r, "device": pool.devices[r], "rows": rows[r],
                               "decoded_rows": rows[r] + sum(ext[r]), "seconds": res.seconds,
                               "peak_memory_bytes": res.peak_memory_bytes})
        per_device = ", ".join(f"{s['device']} {s['rows']} rows {s['seconds']:.2f} s "
                               f"{s['peak_memory_bytes'] / 2**20:.0f} MiB" for s in self.stats)
        built = [st["build_s"] for st in self.stats if st.get("build_s") is not None]
        first = f"; the workers built the VAE first ({max(built):.1f} s, once per VAE)" if built else ""
        self.notes.append(f"decoded on the devices in {self.wall_s:.2f} s (VAE weights {bake_s:.2f} s{first}): "
                          f"{per_device}")
        return image


def try_device_decode(patches, vae, latent: torch.Tensor, rows: list[int], overlap_rows: int):
    """(image or None, DeviceDecode): None with a note when the server has to decode instead."""
    from stadi_core.errors import StadiError

    job = DeviceDecode()
    pool, why = find_pool(patches)
    if pool is None:
        job.notes.append(f"decode_on=devices: {why}; decoded on the server")
        return None, job
    if latent.dim() != 4:
        job.notes.append("decode_on=devices takes image latents; this one was decoded on the server")
        return None, job
    try:
        image = job.run(pool, vae, latent, decode_rows(rows, int(latent.shape[2]), pool.world_size), overlap_rows)
    except Exception as exc:  # the user still gets the image, from the server, and is told why
        if not isinstance(exc, StadiError):  # WorkerError/WorkerTimeout/UnsupportedError say what happened
            log.warning("STADI Patch Stitch: decode on the devices failed", exc_info=True)
        first = (str(exc).splitlines() or [""])[0]
        job.notes.append(f"decode_on=devices failed ({type(exc).__name__}: {first}); decoded on the server")
        return None, job
    return image, job
