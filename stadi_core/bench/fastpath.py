"""The band fast path on this CPU: one worker vs two workers on displaced bands, measured in one run.

    python -m stadi_core bench-fastpath [--model sd15] [--height 64] [--width 64] [--steps 3] [--cfg 5]

Issue #17's run: full SD1.5 at 512 px, 3 steps, cfg 5, displaced bands on 2 CPU workers
against one worker with the whole CPU. Printed beside the machine's pair baselines: two
independent busy processes (matmul, as the other benches print), and the same UNet work
done by one 2-thread process vs two 1-thread processes (here, one worker's 2-thread run vs
the cfg_split run, where each worker runs half the work with nothing exchanged), which is
the bound any 2-worker split meets on this machine.
"""

from __future__ import annotations

import torch

from ..api import generate, reference_generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import model_spec_for
from ..report import psnr
from . import common
from .units import pair_baseline


def run(args) -> tuple[list[dict], float]:
    spec = model_spec_for(args.model)
    kw = dict(height=args.height, width=args.width, batch=1, steps=args.steps, sampler="euler", cfg=args.cfg,
              seed=args.seed)
    pair = pair_baseline()
    torch.set_num_threads(1)
    ref = reference_generate(spec, **kw)
    one = ClusterSpec((DeviceSpec("cpu:0"),), backend="gloo")
    two = ClusterSpec((DeviceSpec("cpu:0", relative_speed=1.0), DeviceSpec("cpu:1", relative_speed=1.0)),
                      backend="gloo")
    configs = [
        ("one worker, whole CPU (2 threads)", one, dict(strategy="bands", mode="exact", warmup=1)),
        ("one worker, 1 thread", one, dict(strategy="bands", mode="exact", warmup=1, threads_per_worker=1)),
        ("2 workers, displaced bands", two, dict(strategy="bands", mode="displaced", warmup=args.warmup,
                                                  strides="off")),
        ("2 workers, exact bands", two, dict(strategy="bands", mode="exact", warmup=1, strides="off")),
        ("2 workers, cfg_split", two, dict(strategy="cfg_split", mode="exact", warmup=1)),
    ]
    rows = []
    for name, cluster, opts in configs:
        generate(spec, cluster, **dict(kw, steps=1), **dict(opts, warmup=1))  # build the model in this pool, warm it
        res = generate(spec, cluster, **kw, **opts)
        rep = res.report
        rows.append(dict(name=name, s=max(r.wall_s for r in rep.ranks), report=rep, psnr=psnr(res.latent, ref)))
    return rows, pair


def table(rows: list[dict], pair: float, args) -> str:
    one = rows[0]["s"]
    out = [f"band fast path: {args.model} UNet, random weights, latent {args.height}x{args.width} "
           f"({args.height * 8}x{args.width * 8} px), batch 1, {args.steps} euler steps, cfg {args.cfg:g}, "
           f"displaced warmup {args.warmup}; workers are separate processes (gloo)",
           f"pair baseline (matmul): two busy single-thread processes each run at {pair:.2f} of one alone",
           "",
           f"{'configuration':<36} {'denoise s':>9} {'vs one worker':>13} {'busy s per rank':>18} "
           f"{'comm s per rank':>16} {'PSNR dB':>8}"]
    for r in rows:
        ranks = r["report"].ranks
        busy = "/".join(f"{x.busy_s:.1f}" for x in ranks)
        comm = "/".join(f"{x.comm_s:.1f}" for x in ranks)
        out.append(f"{r['name']:<36} {r['s']:>9.2f} {r['s'] / one:>13.2f} {busy:>18} {comm:>16} {r['psnr']:>8.1f}")
    by = {r["name"]: r["s"] for r in rows}
    split = by["2 workers, cfg_split"]
    out += ["",
            f"UNet pair bound: cfg_split gives each worker exactly half the work and exchanges nothing, so "
            f"{split / one:.2f}x is what two 1-thread workers deliver here against one 2-thread worker "
            f"(1 thread alone: {by['one worker, 1 thread'] / one:.2f}x)",
            f"displaced bands: {by['2 workers, displaced bands'] / one:.2f}x one worker (goal <= 0.85x); "
            f"{by['2 workers, displaced bands'] / split:.2f}x the pair bound",
            "denoise s = the slowest rank's denoising loop on a warm pool; PSNR vs the single-process image"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.parser("bench-fastpath", __doc__, model="sd15", height=64, width=64, steps=3, warmup=1)
    return common.emit(p, argv, lambda args: table(*run(args), args))

if __name__ == "__main__":
    raise SystemExit(main())
