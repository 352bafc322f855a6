"""Worker side of the Patch Stitch node's device decode: build ComfyUI's VAE once, decode a band.

The server shares the VAE's weights once per VAE in anonymous shared memory (nodes/weights.py,
``shared_vae``) and sends a :class:`VaeSpec` with every :class:`DecodeJob`; the worker
builds ``comfy.sd.VAE`` from that state dict the way ComfyUI's checkpoint loader does
(architecture detected from the state dict's keys, or from ``config`` for a VAE that was built
from one), on its own device and in the server's VAE dtype, and decodes with ``VAE.decode``
itself (ComfyUI's output processing, batch splitting and tiled fall-back on out-of-memory).
One VAE is cached per worker, by the spec's key.

Memory per decode (``DecodeResult.peak_memory_bytes``; ``info["memory"]`` says which):
- CUDA: ``torch.cuda.max_memory_allocated`` during the decode (peak statistics reset first),
  which includes what the device already held (the diffusion model of a warm pool);
  ``info["added_bytes"]`` is that peak minus what was allocated before the decode.
- CPU: growth of the process's resident set (RSS) over the decode, sampled every 2 ms from
  /proc/self/statm (peak during the decode minus RSS before it); on systems without /proc,
  the bytes of the decoded pixels.

Imports nothing from ComfyUI at module level.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UnsupportedError
from .messages import DecodeJob, DecodeResult


@dataclass
class VaeSpec:
    weights: dict  # VAE.first_stage_model's state dict in the server's memory (shared_memory.SharedHandle)
    key: str  # same key <=> same weights
    dtype: str  # the server's VAE dtype (VAE.vae_dtype), e.g. "float32", "bfloat16"
    model_class: str = ""  # module:QualName of the server's first_stage_model; checked after the build
    config: dict | None = None  # comfy.sd.VAE's ``config`` when the server's VAE was built from one
    comfy_args: dict = field(default_factory=dict)  # ComfyUI options that change the computation (attention)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VaeSpec":
        return cls(**d)


_VAES: dict[str, object] = {}  # spec key -> comfy.sd.VAE; one at a time


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_vae(spec: VaeSpec, device):
    """ComfyUI's VAE from the server's shared state dict, on ``device`` in the server's dtype."""
    import torch

    from .shared_memory import SharedHandle, open_tensors

    from ..models.comfy_common import prepare_comfy

    prepare_comfy(spec.comfy_args, cpu=torch.device(device).type == "cpu")
    import comfy.sd

    sd = open_tensors(SharedHandle.from_dict(spec.weights))
    vae = comfy.sd.VAE(sd=sd, device=torch.device(device), config=spec.config, dtype=getattr(torch, spec.dtype))
    if vae.first_stage_model is None:
        raise UnsupportedError("Patch Stitch: the workers could not rebuild this VAE from its weights")
    if spec.model_class and _class_path(vae.first_stage_model) != spec.model_class:
        raise UnsupportedError(f"Patch Stitch: the workers rebuilt this VAE as {_class_path(vae.first_stage_model)}, "
                               f"the server has {spec.model_class}; decode it on the server")
    built = vae.first_stage_model.state_dict()
    missing = sorted(set(built) - set(sd))
    if missing:
        raise UnsupportedError(f"Patch Stitch: the workers' rebuild of this VAE lacks weights {missing[:4]}; "
                               "decode it on the server")
    return vae


def cached_vae(spec: VaeSpec, device) -> tuple[object, float | None]:
    """(VAE, seconds spent building it, or None when it was cached)."""
    vae = _VAES.get(spec.key)
    if vae is not None:
        return vae, None
    _VAES.clear()  # one VAE per worker: the previous one goes first
    t0 = time.perf_counter()
    vae = build_vae(spec, device)
    _VAES[spec.key] = vae
    return vae, time.perf_counter() - t0


class RssPeak:
    """Peak resident set size of this process while the block runs, sampled by a thread."""

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.available = os.path.exists("/proc/self/statm")
        self.before = self.peak = self._rss()
        self._stop = threading.Event()

    def _rss(self) -> int:
        if not self.available:
            return 0
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.PAGE

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "RssPeak":
        self.before = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, name="stadi-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.peak = max(self.peak, self._rss())


def decode(job: DecodeJob, rank: int, device) -> DecodeResult:
    """Decode the job's band (with its overlap rows) on this worker's device."""
    import torch

    spec = VaeSpec.from_dict(job.vae)
    device = torch.device(device)
    latent = np.asarray(job.latent)
    if latent.ndim != 4 or latent.shape[2] != job.top + job.rows + job.bottom:
        raise ValueError(f"band latent of shape {latent.shape} for {job.top} + {job.rows} + {job.bottom} rows")
    vae, build_s = cached_vae(spec, device)
    samples = torch.from_numpy(latent)
    info: dict = {"pid": os.getpid(), "device": str(device), "vae_dtype": spec.dtype, "built": build_s is not None}
    if build_s is not None:
        info["build_s"] = build_s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = vae.decode(samples)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = int(torch.cuda.max_memory_allocated(device))
        info.update(memory="cuda max_memory_allocated (includes what the device held before)",
                    added_bytes=peak - int(before), allocated_before_bytes=int(before))
    else:
        with RssPeak() as rss, torch.inference_mode():
            t0 = time.perf_counter()
            pixels = vae.decode(samples)
            seconds = time.perf_counter() - t0
        out_bytes = pixels.numel() * pixels.element_size()
        if rss.available:
            peak = max(0, rss.peak - rss.before)
            info.update(memory="cpu RSS growth (peak during the decode minus before, sampled every 2 ms)",
                        rss_before_bytes=rss.before)
        else:
            peak = out_bytes
            info.update(memory="cpu bytes of the decoded pixels (no /proc to read RSS from)")
        info["output_bytes"] = out_bytes
    pixels = pixels.float().cpu().contiguous().numpy()
    return DecodeResult(job.job_id, rank, pixels, seconds, peak, info)

