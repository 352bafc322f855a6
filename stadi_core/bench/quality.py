"""Quality benchmark: every mode against the single-device picture, on the trained tiny-shapes model.

    python -m stadi_core bench-quality [--seeds 16] [--height 64] [--width 32] [--steps 20]
                                       [--out docs/bench_quality_cpu.txt]

For 2 and 3 CPU ranks with uneven bands (manual speeds 1 : 0.6 and 1 : 0.7 : 0.5), each mode
generates the same seeds and captions as one process with the unmodified network; the table
gives PSNR and SSIM against that picture and the seam score (quality.seam_score: boundary-row
gradient over the other rows' gradient, pooled over the seeds; 1.0 = no seam). Two yardsticks
frame the modes: the single-device pictures' own score on each mode's boundary rows (what "no
seam" looks like on those rows) and bands generated with no context at all (what a seam looks like).
"""

from __future__ import annotations

import time

import torch

from ..api import generate, reference_generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models import tiny_shapes
from ..models.spec import model_spec_for
from ..planner import Plan
from ..quality import band_boundaries, psnr, seam_score, ssim
from ..models.tiny_shapes_data import caption_for
from . import common

SPEEDS = {2: (1.0, 0.6), 3: (1.0, 0.7, 0.5)}
MODES = (  # (name, generate() arguments, strides for 2 and 3 ranks)
    ("exact", dict(mode="exact", strides="off")),
    ("displaced, warmup 1", dict(mode="displaced", warmup=1, strides="off")),
    ("displaced, warmup 2", dict(mode="displaced", warmup=2, strides="off")),
    ("displaced, warmup 4", dict(mode="displaced", warmup=4, strides="off")),
    ("displaced + strides", dict(mode="displaced", warmup=2, strides={2: (1, 2), 3: (1, 1, 2)})),
)


def cluster(ranks: int) -> ClusterSpec:
    return ClusterSpec(tuple(DeviceSpec(f"cpu:{i}", relative_speed=s) for i, s in enumerate(SPEEDS[ranks])),
                       backend="gloo")


def pictures(latents: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tiny_shapes.to_rgb(x)[0] for x in latents]


def measure(name: str, pics: list, refs: list, boundaries: list[int], wall: float) -> dict:
    return dict(mode=name, psnr=sum(psnr(p, r) for p, r in zip(pics, refs)) / len(refs),
                min_psnr=min(psnr(p, r) for p, r in zip(pics, refs)),
                ssim=sum(ssim(p, r) for p, r in zip(pics, refs)) / len(refs),
                seam=seam_score(pics, boundaries), ref_seam=seam_score(refs, boundaries), wall=wall)


def run(args) -> list[dict]:
    spec = model_spec_for(args.model)
    seeds = list(range(args.seeds))
    captions = [caption_for(1000 + s) for s in seeds]
    kw = dict(height=args.height, width=args.width, steps=args.steps, sampler=args.sampler, cfg=args.cfg)
    torch.set_num_threads(1)
    refs = pictures([reference_generate(spec, seed=s, prompt=c, **kw) for s, c in zip(seeds, captions)])
    rows = []
    for ranks in (2, 3):
        plan = None
        for name, mode_kw in MODES:
            mode_kw = dict(mode_kw)
            if isinstance(mode_kw["strides"], dict):
                mode_kw["strides"] = mode_kw["strides"][ranks]
            t0, latents = time.perf_counter(), []
            for s, c in zip(seeds, captions):
                res = generate(spec, cluster(ranks), strategy="bands", seed=s, prompt=c, threads_per_worker=1,
                               **kw, **mode_kw)
                latents.append(res.latent)
            run_plan = Plan.from_dict(res.report.plan)
            plan = plan or run_plan
            row = measure(name, pictures(latents), refs, band_boundaries(run_plan), time.perf_counter() - t0)
            row.update(ranks=ranks, bands=[b.rows for b in run_plan.bands], strides=[b.stride for b in run_plan.bands])
            rows.append(row)
        bounds = band_boundaries(plan)
        t0 = time.perf_counter()
        alone = [torch.cat([reference_generate(spec, seed=s, prompt=c, rows=slice(b.row_start, b.row_start + b.rows),
                                               **kw) for b in plan.bands], dim=2) for s, c in zip(seeds, captions)]
        rows.append(dict(measure("bands with no context", pictures(alone), refs, bounds, time.perf_counter() - t0),
                         ranks=ranks, bands=[b.rows for b in plan.bands], strides=["-"]))
    return rows


def table(rows: list[dict], args) -> str:
    out = [f"STADI quality benchmark: trained {args.model}, {args.seeds} seeds and captions, picture "
           f"{args.height}x{args.width} px (twice the training height), {args.steps} {args.sampler} steps, cfg {args.cfg:g}; "
           f"CPU workers (gloo), uneven bands from manual speeds {SPEEDS[2]} and {SPEEDS[3]}",
           "against the single-device picture of the same seed and caption; PSNR/SSIM are means over the seeds "
           "(min PSNR: the worst seed); seam = boundary-row / other-row vertical gradient pooled over the seeds "
           "(1.0 = no seam); 1-dev seam = the single-device pictures' score on the same rows (what no seam looks like "
           "on these rows: a horizon or a shape edge on a boundary row raises it)",
           "",
           f"{'ranks':>5}  {'bands (rows)':<14} {'strides':<9} {'mode':<28} {'PSNR dB':>8} {'min PSNR':>8} "
           f"{'SSIM':>7} {'seam':>6} {'1-dev seam':>10} {'wall s':>7}"]
    for r in rows:
        out.append(f"{r['ranks']:>5}  {'/'.join(map(str, r['bands'])):<14} {','.join(map(str, r['strides'])):<9} "
                   f"{r['mode']:<28} {r['psnr']:>8.2f} {r['min_psnr']:>8.2f} {r['ssim']:>7.4f} {r['seam']:>6.2f} "
                   f"{r['ref_seam']:>10.2f} {r['wall']:>7.1f}")
    out.append("")
    out.append("exact mode is the float-noise floor (PSNR inf = identical); 'bands with no context' (each band "
               "denoised as an image of its own, in one process: its wall time is not comparable) is what a seam looks like")
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.parser("bench-quality", __doc__, model="tiny-shapes", height=64, width=32, steps=20, warmup=2)
    p.set_defaults(cfg=4.0)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--sampler", default="dpmpp_2m")
    return common.emit(p, argv, lambda args: table(run(args), args))
