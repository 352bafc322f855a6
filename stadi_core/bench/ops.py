"""What a band forward costs in operations: aten ops per network call, stock vs patch-parallel.

    python -m stadi_core bench-ops [--models sd15,sdxl] [--latent 32] [--out DIR]

On a fast GPU a UNet step is launch-bound, so the number of operators a band forward issues
is the cost that matters there, and it is countable on a CPU. Counted with the torch
profiler: every ``aten::`` event whose parents are not ``aten::`` events (the ops the Python
code issues; their own internal calls are the kernels' business). The stock network runs
on the band's shape, the patch-parallel copy as rank 0 of two equal bands in each phase:
``exact`` (every layer exchanges fresh context), ``refresh`` (displaced sync step) and
``stale`` (displaced steady state). Full-size SD1.5/SDXL configs, random weights; the op
count does not depend on the spatial size, so a small latent keeps it quick.

The exchange itself is a loopback here (one process plays both bands: the other band's
context is a copy of ours), and its own copies are excluded from the count: this counts
the layers' compute, and the exchanges are listed per call beside it.
"""

from __future__ import annotations

import argparse
import os
from multiprocessing.reduction import ForkingPickler

import numpy as np

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..models.spec import build_model, model_spec_for
from ..parallel import BandContext, Phase, make_patch_parallel

_LOOPBACK = "stadi::loopback_exchange"


class LoopbackContext(BandContext):
    """Rank 0 of an equal two-band layout whose neighbour sends what we send (no second process)."""

    def __init__(self, rows):
        super().__init__(rows, rank=0)
        self.exchanges = 0

    def _all_gather(self, key, local, dim, sizes, async_op, kind="kv"):
        with record_function(_LOOPBACK):
            wire = self._wire(key, local, dim, max(sizes))
            send = wire.load(local.detach(), dim)
            for r in wire.recv:
                r.copy_(send)
        self.exchanges += 1
        return wire.recv, None

    def _send_pieces(self, sends, recvs, kind):
        for (_, buf), (_, tensor) in zip(recvs, sends):  # the neighbour sends what we send
            buf.copy_(tensor.view(-1)[: buf.numel()].view(buf.shape) if buf.shape != tensor.shape else tensor)
        return None


# ops that only make a view, allocate, or return their input: no kernel runs
_NO_KERNEL = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "slice", "select", "narrow", "transpose",
    "t", "permute", "unsqueeze", "squeeze", "expand", "expand_as", "chunk", "split", "split_with_sizes", "unbind",
    "detach", "alias", "lift_fresh", "empty", "empty_strided", "empty_like", "resize_", "to", "contiguous",
    "result_type", "view_as", "flatten", "unflatten", "movedim", "size", "stride", "is_nonzero", "item",
    "_local_scalar_dense", "dim", "numel", "clone_meta")}


def count_ops(fn) -> tuple[int, int]:
    """(ops issued, kernels run) by ``fn()``, outside the loopback exchange.

    Ops issued: top-level ``aten::`` events (what the Python code calls). Kernels: leaf
    ``aten::`` events that compute (views, allocations and no-op casts excluded)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [ev for ev in prof.events() if not _in_loopback(ev)]
    has_child = {id(ev.cpu_parent) for ev in events if ev.cpu_parent is not None and ev.name.startswith("aten::")}
    issued = kernels = 0
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        issued += parent is None
        kernels += id(ev) not in has_child and ev.name not in _NO_KERNEL
    return issued, kernels


def _in_loopback(ev) -> bool:
    parent = ev
    while parent is not None:
        if parent.name == _LOOPBACK:
            return True
        parent = parent.cpu_parent
    return False


def _inputs(spec, model, rows: int, width: int):
    from ..models.spec import batched_conditioning, make_conditioning

    cond = batched_conditioning(make_conditioning(spec, model, 1, 0), 5.0, "cpu", torch.float32)
    x = torch.randn(2, spec.adapter.latent_channels(model), rows, width)
    t = torch.full((2,), 500.0)
    return x, t, cond


def measure(model_name: str, latent: int) -> dict:
    """{"stock": n, "exact": n, "refresh": n, "stale": n, "exchanges": {...}} for one model."""
    spec = model_spec_for(model_name)
    stock = build_model(spec)
    forward = spec.adapter.forward
    rows = latent // 2
    x, t, cond = _inputs(spec, stock, rows, latent)
    out = {}
    with torch.inference_mode():
        forward(stock, x, t, cond)  # lazy init outside the count
        out["stock"] = count_ops(lambda: forward(stock, x, t, cond))
        band = stock  # patched in place: the stock counts are taken
        ctx = LoopbackContext([rows, rows])
        make_patch_parallel(band, ctx, spec.adapter.patch_attention)
        exchanges = {}
        for phase in (Phase.FRESH, Phase.REFRESH, Phase.STALE):
            def call():
                ctx.begin_call(phase, 0, latent)
                forward(band, x, t, cond)
                ctx.end_call()
            call()  # fills the stored context (FRESH) / warms the path
            before = ctx.exchanges
            name = {"fresh": "exact"}.get(phase.value, phase.value)
            out[name] = count_ops(call)
            exchanges[name] = ctx.exchanges - before
        out["exchanges"] = exchanges
    return out


def table(results: dict, latent: int) -> str:
    lines = [f"aten ops per network call (torch profiler; CFG batch 2, band = half of a {latent}x{latent} latent, "
             "rank 0 of 2; the exchanges' own ops excluded, their number listed)",
             "issued = top-level ops the Python code calls; kernels = leaf ops that compute (no views/allocations)",
             f"{'model':>6} {'count':>7} {'stock':>6} {'exact':>6} {'x':>5} {'refresh':>7} {'x':>5} {'stale':>6} "
             f"{'x':>5}   exchanges exact/refresh/stale"]
    for name, r in results.items():
        e = r["exchanges"]
        for i, what in enumerate(("issued", "kernels")):
            s = r["stock"][i]
            lines.append(f"{name:>6} {what:>7} {s:>6} {r['exact'][i]:>6} {r['exact'][i] / s:>5.2f} "
                         f"{r['refresh'][i]:>7} {r['refresh'][i] / s:>5.2f} {r['stale'][i]:>6} "
                         f"{r['stale'][i] / s:>5.2f}   {e['exact']}/{e['refresh']}/{e['stale']}")
    lines.append("goal (issue #17): displaced steady state (stale) <= 1.15x stock")
    return "\n".join(lines)


def call_bytes(height: int = 128, width: int = 128, ranks: int = 2, tokens: int = 77, context_dim: int = 2048,
               pooled: int = 2816) -> list[tuple[str, int]]:
    """Bytes of one rank's band call and output over the control channel (SDXL 1024² shapes by default).

    Pickled as multiprocessing's connections pickle them. Before: the conditioning travelled
    with every call; now a session sends it once and later calls name it by digest."""
    from ..runtime.messages import BandCall, BandOutput
    from ..runtime.session_conds import ConditioningOnce, digest

    x = np.zeros((2, 4, height // ranks, width), np.float32)  # CFG batch 2, this rank's rows
    ts = np.full((2,), 500.0, np.float32)
    cond = {"context": np.zeros((2, tokens, context_dim), np.float32), "y": np.zeros((2, pooled), np.float32)}
    key = digest(cond)
    sent = ConditioningOnce()

    def size(msg) -> int:
        return len(ForkingPickler.dumps(msg))

    return [
        ("band call, conditioning in every call (before)", size(BandCall(1, 2, 3, "refresh", x, ts, cond))),
        ("band call, first of a session", size(BandCall(1, 2, 3, "refresh", x, ts, sent.lean(0, cond, key),
                                                        cond_key=key))),
        ("band call, every later call", size(BandCall(1, 2, 3, "refresh", x, ts, sent.lean(0, cond, key),
                                                      cond_key=key))),
        ("band output (this rank's rows)", size(BandOutput(1, 2, 0, x.copy(), 0.0, 0.0))),
    ]


def bytes_table(rows: list[tuple[str, int]], steps: int = 20) -> str:
    before, first, later, out = (n for _, n in rows)
    lines = ["bytes per band call over the control channel, one rank of 2, SDXL 1024² shapes (latent 128x128, "
             "CFG batch 2, context 2x77x2048 + y 2x2816 float32)", f"{'message':<48} {'bytes':>10}"]
    lines += [f"{name:<48} {n:>10,}" for name, n in rows]
    lines.append(f"a {steps}-step run, calls in: before {steps * before / 2**20:.1f} MiB, now "
                 f"{(first + (steps - 1) * later) / 2**20:.1f} MiB ({(first + (steps - 1) * later) / (steps * before):.2f}x)"
                 f"; outputs back: {steps * out / 2**20:.1f} MiB (only this rank's rows, unchanged)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stadi_core bench-ops", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--latent", type=int, default=32, help="latent side (the band is half of it)")
    p.add_argument("--out", default=None, help="also write the table to DIR/bench_ops.txt")
    args = p.parse_args(argv)
    results = {m: measure(m, args.latent) for m in args.models.split(",") if m}
    text = (table(results, args.latent) + "\n\n" if results else "") + bytes_table(call_bytes())
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_ops.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
