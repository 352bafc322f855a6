"""Hybridiff's adaptive window on a CFG-branch split: where it opens, steps saved, PSNR.

    python -m stadi_core bench-hybrid [--steps 30] [--models tiny-sd15,tiny-sdxl,tiny-sd3]

Each model runs cfg_split on 2 CPU workers in exact mode twice on one warm pool: without
the window (the reference: it equals the single-device image) and with the model's preset
window (sampling/hybrid_window.py), in which every second step reuses the last output.
Random-weight models do not denoise, so their discrepancy curve is not a trained model's:
read where the window opened and how much it cost, not the image.
"""

from __future__ import annotations

import argparse

from ..api import generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import model_spec_for
from ..report import psnr

PRESET_OF = {"sd3": "sd3", "sdxl": "sdxl", "sd15": "sd15"}


def preset_for(model: str) -> str:
    return next((v for k, v in PRESET_OF.items() if k in model), "sdxl")


def run(args) -> list[dict]:
    cluster = ClusterSpec((DeviceSpec("cpu:0", relative_speed=1.0), DeviceSpec("cpu:1", relative_speed=1.0)),
                          backend="gloo")
    rows = []
    for model in args.models.split(","):
        spec = model_spec_for(model)
        kw = dict(height=args.height, width=args.width, batch=1, steps=args.steps, sampler="euler", cfg=args.cfg,
                  seed=args.seed, mode="exact", strategy="cfg_split")
        if "sd3" in model or "flux" in model:
            kw["scheduler"] = "simple"
        generate(spec, cluster, **dict(kw, steps=2))  # build the model once
        plain = generate(spec, cluster, **kw)
        hybrid = generate(spec, cluster, hybrid_window=preset_for(model), **kw)
        win = hybrid.report.hybrid_window or {}
        evals = [r.evals for r in hybrid.report.ranks]
        rows.append(dict(model=model, preset=preset_for(model), window=win, evals=evals,
                         plain_s=plain.report.denoise_s, hybrid_s=hybrid.report.denoise_s,
                         saved=args.steps - evals[0], psnr=psnr(hybrid.latent, plain.latent)))
    return rows


def table(rows: list[dict], args) -> str:
    out = [f"STADI hybrid window: cfg_split on 2 CPU workers (gloo), exact mode, {args.steps} euler steps, cfg "
           f"{args.cfg:g}, latent {args.height}x{args.width}, random weights",
           "",
           f"{'model':<11} {'preset':<6} {'opened':>6} {'by':<5} {'window':<9} {'evals/rank':>10} {'saved':>5} "
           f"{'plain s':>8} {'window s':>8} {'ratio':>6} {'PSNR dB':>8}"]
    for r in rows:
        w = r["window"]
        span = f"{w['steps'][0]}-{w['steps'][-1]}" if w.get("steps") else "-"
        out.append(f"{r['model']:<11} {r['preset']:<6} {str(w.get('opened_at', '-')):>6} {w.get('reason') or '-':<5} "
                   f"{span:<9} {'/'.join(map(str, r['evals'])):>10} {r['saved']:>5} {r['plain_s']:>8.2f} "
                   f"{r['hybrid_s']:>8.2f} {r['hybrid_s'] / r['plain_s']:>6.2f} {r['psnr']:>8.1f}")
    out.append("window: Hybridiff's criterion (rel-MAE of eps_cond vs eps_uncond, slope over the last L steps; "
               "'cap' = opened at tau_cap); inside it every second step reuses the last network output")
    out.append("PSNR: the window run against the same run without it (which equals the single-device image)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stadi_core bench-hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-sd15,tiny-sdxl,tiny-sd3")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(table(run(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
