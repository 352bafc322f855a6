"""What one synchronous network call of a model sends, counted on the model itself.

The planner prices links with the bytes each rank contributes to one call's exchanges
(cost_model.ExchangeCost: ``bytes_fixed + bytes_per_row x rows``, ``messages`` all-gathers). For the
model a run actually uses, they are counted here, not assumed: the model is made patch-parallel with
a one-process stand-in for the top band of an equal two-band layout (its neighbour sends what it
sends), one synchronous call runs, and every all-gather is counted exactly as the transport counts it
(parallel/links.py). Two band heights give the per-row and the fixed part (K/V grows with the band;
halos and GroupNorm statistics do not). It runs on the meta device (no memory, no compute; a second or
so even for SDXL) and on the CPU if a model's forward cannot run on meta.

A family whose adapter has ``meta_network(spec)`` (the ComfyUI families: models/comfy_common.py) is
counted on that network only: it runs inside the ComfyUI server, where building the worker's network
would set the server's ComfyUI options and map its weights, and its attention is routed past ComfyUI's
memory-sized ones through ComfyUI's own override hook.

The count is of synchronous calls (exact mode, warmup): full raw context. Light context options
(partial, fp8, delta) send less; a plain byte count prices them all as full (cost_model docstring).
"""

from __future__ import annotations

import logging

import torch

from .cost_model import ExchangeCost
from .errors import StadiError
from .parallel import BandContext, Phase, make_patch_parallel

_log = logging.getLogger("stadi")


class _CountingLoopback(BandContext):
    """Rank 0 of a two-band layout without a second process: received = sent; bytes counted."""

    def _all_gather(self, key, local, dim, sizes, async_op, kind="kv"):
        wire = self._wire(key, local, dim, max(sizes))
        send = wire.load(local.detach(), dim)
        self.stats.exchanges += 1
        self.link.count(send.numel() * send.element_size() * (self.world_size - 1), kind)
        for r in wire.recv:
            r.copy_(send)
        return wire.recv, None

    def _send_pieces(self, sends, recvs, kind):
        for peer_buf, (_, tensor) in zip(recvs, sends):
            self.link.count(tensor.numel() * tensor.element_size(), kind)
            buf = peer_buf[1]
            buf.copy_(tensor.reshape(-1)[: buf.numel()].view(buf.shape) if buf.shape != tensor.shape else tensor)
        return None


def _network(spec, device: str):
    from .models.spec import build_model

    meta_network = getattr(spec.adapter, "meta_network", None)
    return meta_network(spec) if meta_network is not None else build_model(spec, device)


def _count(spec, model_device: str, rows: int, width: int, batch: int, cfg: float) -> tuple[int, int]:
    """(bytes, all-gathers) the top band of [rows, rows] sends in one synchronous call."""
    from .models.spec import batched_conditioning, input_dtype, make_conditioning

    model = _network(spec, model_device)
    dtype = input_dtype(model)
    cond = batched_conditioning(make_conditioning(spec, model, batch, 0), cfg, model_device, dtype)
    n = batch * (1 if cfg == 1.0 else 2)
    ctx = _CountingLoopback([rows, rows], rank=0)
    make_patch_parallel(model, ctx, spec.adapter.patch_attention)
    x = torch.zeros(n, spec.adapter.latent_channels(model), rows, width, device=model_device, dtype=dtype)
    t = torch.full((n,), 500.0, device=model_device)
    with torch.inference_mode():
        ctx.begin_call(Phase.FRESH, 0, width)
        spec.adapter.forward(model, x, t, cond)
        stats = ctx.end_call()
    return sum(stats.sent.values()), stats.exchanges


def measure_exchange(spec, *, height: int, width: int, batch: int = 1, cfg: float = 5.0,
                     align: int = 8) -> ExchangeCost:
    """Bytes one rank contributes per synchronous call, per latent row of its band and fixed, for
    ``spec`` at ``width`` columns (``height`` only bounds the band sizes tried). Two band heights at least
    one alignment unit apart are always counted, even for a latent of under four units: one height alone
    cannot tell the per-row part from the fixed one."""
    from .models.spec import input_dtype

    rows = max(2 * align, (height // 2) // align * align)
    small = rows - align
    last: Exception | None = None
    for device in ("meta",) if hasattr(spec.adapter, "meta_network") else ("meta", "cpu"):
        try:
            big_b, messages = _count(spec, device, rows, width, batch, cfg)
            small_b = _count(spec, device, small, width, batch, cfg)[0]
            break
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:  # an op without a meta kernel
            last = exc
    else:
        raise StadiError(f"could not count the context bytes of {spec.config}: {last}")
    per_row = (big_b - small_b) / (rows - small)
    fixed = max(0.0, big_b - per_row * rows)
    model = _network(spec, "meta")
    dtype_bytes = torch.empty((), dtype=input_dtype(model)).element_size()
    out_row = spec.adapter.latent_channels(model) * width * batch * (1 if cfg == 1.0 else 2) * dtype_bytes
    return ExchangeCost(bytes_per_row=per_row, bytes_fixed=fixed, messages=messages, output_bytes_per_row=out_row)
