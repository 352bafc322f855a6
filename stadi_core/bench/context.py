"""Context benchmark: what each way of exchanging displaced context sends, costs and loses.

    python -m stadi_core bench-context [--seeds 8] [--height 64] [--width 32] [--steps 20]
                                       [--link 0.01,100] [--out docs/bench_context_cpu.txt]

On the trained tiny-shapes model, 2 and 3 CPU workers with uneven bands (bench-quality's speeds),
every context mode (parallel/options.py) generates the same seeds and captions as one process:

* bytes per rank per displaced sync step, as the transport counted them (parallel/links.py: an
  all-gather counts its padded payload once per receiving peer), split into attention K/V and
  the rest (conv halos, GroupNorm moments), and the ratio to full displaced;
* PSNR / SSIM / seam score against the single-device picture (bench/quality.py's measures);
* latency and exposed comm % (time blocked in exchanges over the loop) of one seed with every
  transfer also taking as long as on an emulated link (``--link GBPS,LATENCY_US``), so the
  bytes and the overlap matter as they would between two machines; full displaced runs with and
  without overlap.
"""

from __future__ import annotations

import time

import torch

from ..api import generate, reference_generate
from ..models.spec import model_spec_for
from ..models.tiny_shapes_data import caption_for
from ..planner import Plan
from ..quality import band_boundaries
from . import common
from .quality import SPEEDS, cluster, measure, pictures
from .units import pair_baseline

MODES = ("full", "partial:0.5", "partial:0.3", "fp8", "delta", "partial:0.3+delta")
LINK_MODES = ("full,no-overlap",) + MODES


def _steady_bytes(report) -> list[dict]:
    """Per rank: bytes per kind of its displaced sync steps, averaged."""
    out = []
    for steps in report.steps:
        refresh = [s["sent"] for s in steps if s["phase"] == "refresh"]
        kinds = {k for s in refresh for k in s}
        out.append({k: sum(s.get(k, 0) for s in refresh) / max(1, len(refresh)) for k in kinds})
    return out


def run(args) -> tuple[list[dict], list[dict]]:
    spec = model_spec_for(args.model)
    seeds = list(range(args.seeds))
    captions = [caption_for(1000 + s) for s in seeds]
    kw = dict(height=args.height, width=args.width, steps=args.steps, sampler=args.sampler, cfg=args.cfg)
    gen = dict(strategy="bands", mode="displaced", warmup=args.warmup, strides="off", threads_per_worker=1)
    torch.set_num_threads(1)
    refs = pictures([reference_generate(spec, seed=s, prompt=c, **kw) for s, c in zip(seeds, captions)])
    quality, latency = [], []
    args.pair = pair_baseline() if args.link else None  # what two busy processes get of one on this host
    for ranks in (2, 3):
        full_bytes = None
        for context in MODES if seeds else ():  # --seeds 0: the latency table alone
            t0, latents = time.perf_counter(), []
            for s, c in zip(seeds, captions):
                res = generate(spec, cluster(ranks), seed=s, prompt=c, context=context, **gen, **kw)
                latents.append(res.latent)
            plan = Plan.from_dict(res.report.plan)
            sent = _steady_bytes(res.report)
            full_bytes = full_bytes or sent
            row = measure(context, pictures(latents), refs, band_boundaries(plan), time.perf_counter() - t0)
            row.update(ranks=ranks, bands=[b.rows for b in plan.bands], label=plan.context.label(),
                       total=max(sum(b.values()) for b in sent), kv=max(b.get("kv", 0) for b in sent),
                       ratio=max(sum(b.values()) / sum(f.values()) for b, f in zip(sent, full_bytes)),
                       kv_ratio=max(b.get("kv", 0) / max(1, f.get("kv", 0)) for b, f in zip(sent, full_bytes)))
            quality.append(row)
        if args.link:
            for context in LINK_MODES:
                res = generate(spec, cluster(ranks), seed=0, prompt=caption_for(1000), context=context,
                               emulate_link=args.link, **gen, **kw)
                rep = res.report
                latency.append(dict(ranks=ranks, mode=context, denoise=rep.denoise_s,
                                    comm_pct=max(r.comm_pct for r in rep.ranks),
                                    mb=max(r.sent_bytes for r in rep.ranks) / 1e6))
    return quality, latency


def table(quality: list[dict], latency: list[dict], args) -> str:
    out = [f"STADI context benchmark: trained {args.model}, {args.seeds} seeds and captions, {args.height}x{args.width} px, "
           f"{args.steps} {args.sampler} steps, cfg {args.cfg:g}, warmup {args.warmup}; CPU workers (gloo), uneven bands "
           f"from manual speeds {SPEEDS[2]} and {SPEEDS[3]}",
           "bytes: per rank per displaced sync step, counted by the transport (the busiest rank); K/V = attention "
           "keys/values, the rest = conv halos + GroupNorm moments; quality against the single-device picture "
           "(PSNR/SSIM means over the seeds, seam 1.0 = none; 1-dev seam = the single-device pictures on the same rows)",
           "",
           f"{'ranks':>5} {'bands':<9} {'context':<22} {'KB/step':>8} {'x full':>7} {'K/V KB':>7} {'K/V x':>6} "
           f"{'PSNR dB':>8} {'min PSNR':>8} {'SSIM':>7} {'seam':>6} {'1-dev':>6}"]
    if not quality:  # --seeds 0
        out = out[:1]
    for r in quality:
        out.append(f"{r['ranks']:>5} {'/'.join(map(str, r['bands'])):<9} {r['label']:<22} {r['total'] / 1e3:>8.1f} "
                   f"{r['ratio']:>7.3f} {r['kv'] / 1e3:>7.1f} {r['kv_ratio']:>6.3f} {r['psnr']:>8.2f} "
                   f"{r['min_psnr']:>8.2f} {r['ssim']:>7.4f} {r['seam']:>6.2f} {r['ref_seam']:>6.2f}")
    if latency:
        out += [""] * bool(quality) + [f"latency, seed 0, every transfer also paying an emulated link of {args.link} (GB/s, us per message); "
                "comm % = time blocked in exchanges over the loop (the exposed part), busiest rank; ratios "
                "between rows are from this one run",
                f"pair baseline on this machine: two busy single-thread matmul processes each run at {args.pair:.2f} "
                "of one alone",
                f"{'ranks':>5} {'context':<24} {'denoise s':>9} {'comm %':>7} {'MB sent':>8}"]
        for r in latency:
            out.append(f"{r['ranks']:>5} {r['mode']:<24} {r['denoise']:>9.2f} {r['comm_pct']:>7.1f} {r['mb']:>8.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.parser("bench-context", __doc__, model="tiny-shapes", height=64, width=32, steps=20, warmup=2)
    p.set_defaults(cfg=4.0)
    p.add_argument("--seeds", type=int, default=8, help="seeds of the quality table (0: only the latency table)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--link", default="0.01,100", help="emulated link for the latency table ('' to skip)")
    return common.emit(p, argv, lambda args: table(*run(args), args))
