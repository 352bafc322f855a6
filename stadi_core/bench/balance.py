"""Balance benchmark: equal bands vs elastic bands vs elastic + strides, one emulated slow worker.

    python -m stadi_core bench-balance [--model tiny-sd15|tiny-sdxl|tiny-sd3|tiny-flux] [--slowdown 2]
                                       [--height 64] [--steps 12] [--slowdown-from STEP]

The slow worker is emulated by padding its compute to a budget (real compute, then a
sleep of (X - 1) x its compute time): deterministic, unlike thread throttling. Each
configuration runs on the same warm pool and seed; latency, per-rank busy/idle and the
deviation from the single-process image (PSNR) are printed as a table.

With ``--slowdown-from STEP`` the cluster changes mid-run instead: cpu:1 is at full speed until that
step and ``--slowdown`` times slower from it. The standalone engine runs the same job twice, the plan
made at the start kept (STADI_REPLAN=off) and re-planned in the run (on: the ranks pause at a sync
step and go on with new rows, resumable_run.py), against the ideal for the changed cluster.
"""

from __future__ import annotations


import torch

from ..api import generate, reference_generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import model_spec_for
from ..report import measured_capabilities, psnr
from . import common


def run(args) -> list[dict]:
    spec = model_spec_for(args.model)
    slow = args.slowdown
    base = ClusterSpec((DeviceSpec("cpu:0"), DeviceSpec("cpu:1", slowdown=slow)), backend="gloo")
    kw = dict(height=args.height, width=args.width, batch=1, steps=args.steps, sampler="euler", cfg=args.cfg,
              seed=args.seed, mode="displaced", warmup=args.warmup)
    equal = ClusterSpec(tuple(DeviceSpec(d.name, relative_speed=1.0, slowdown=d.slowdown) for d in base.devices),
                        backend="gloo")
    generate(spec, equal, **dict(kw, steps=2))  # start the pool and build the model once
    torch.set_num_threads(1)
    ref = reference_generate(spec, **{k: v for k, v in kw.items() if k not in ("mode", "warmup")})
    rows = []

    def record(name, res):
        rows.append(dict(name=name, wall=res.report.wall_s, report=res.report, psnr=psnr(res.latent, ref)))
        return res

    first = record("equal bands", generate(spec, equal, strides="off", **kw))
    # STADI plans from measured band times: the equal-band run is the measurement.
    measured = base.with_capabilities(measured_capabilities(first.report))
    caps = [d.capability for d in measured.active()]
    elastic = record("elastic bands", generate(spec, measured, strides="off", **kw))
    # ... and re-plans from the elastic run, where each band was measured at its new size
    remeasured = base.with_capabilities(measured_capabilities(elastic.report))
    record("elastic, re-planned", generate(spec, remeasured, strides="off", **kw))
    record("elastic + strides", generate(spec, measured, strides="auto", **kw))
    for r in rows:
        r["ideal"] = args.steps * args.height / sum(caps)
    return rows, caps


def changing_cluster(args) -> str:
    """Static plan vs in-run re-plan when cpu:1 slows down at ``--slowdown-from`` (standalone engine)."""
    from ..replan import REPLAN_ENV
    from .replan import summarize, table_lines
    from .units import pair_baseline

    spec = model_spec_for(args.model)
    cluster = ClusterSpec((DeviceSpec("cpu:0"), DeviceSpec("cpu:1", slowdown=args.slowdown,
                                                           slowdown_from=args.slowdown_from)), backend="gloo")
    kw = dict(height=args.height, width=args.width, batch=1, steps=args.steps, sampler="euler", cfg=args.cfg,
              seed=args.seed, mode="displaced", warmup=args.warmup, strides="off")
    generate(spec, cluster, **dict(kw, steps=2))  # start the pool and build the model once
    pair = pair_baseline()
    runs = []
    for replan in ("off", "on"):
        with common.env_settings({REPLAN_ENV: replan}):
            res = generate(spec, cluster, **kw)
        runs.append(summarize(f"STADI_REPLAN={replan}", res.report.wall_s, res.report))
    title = (f"bench-balance --slowdown-from {args.slowdown_from}: standalone engine, {args.model} random weights, "
             f"latent {args.height}x{args.width}, {args.steps} euler steps, cfg {args.cfg}, displaced (warmup "
             f"{args.warmup}), 2 CPU workers (gloo), bands; cpu:1 EMULATED {args.slowdown:g}x slower from step "
             f"{args.slowdown_from} (compute padded to budget)")
    return "\n".join(table_lines(title, pair, runs, args.height, args.slowdown_from))


def table(rows, caps, args) -> str:
    eq = rows[0]["wall"]
    out = [f"STADI balance benchmark: 2 CPU workers (gloo), cpu:1 EMULATED {args.slowdown:g}x slower "
           f"(compute padded to budget), {args.model} random weights, latent {args.height}x{args.width}, "
           f"{args.steps} euler steps, displaced mode, warmup {args.warmup}",
           f"capability measured in the equal-band run (band compute with context, per eval): "
           f"cpu:0 {caps[0]:.1f} rows/s, cpu:1 {caps[1]:.1f} rows/s",
           "",
           f"{'configuration':<18} {'rows':>7} {'strides':>7} {'latency s':>9} {'vs equal':>8} {'vs ideal':>8} "
           f"{'r0 comm%':>8} {'r0 idle%':>8} {'r1 comm%':>8} {'r1 idle%':>8} {'PSNR dB':>8}"]
    for r in rows:
        rep = r["report"]
        rws = "/".join(str(x.rows) for x in rep.ranks)
        strides = ",".join(str(x.stride) for x in rep.ranks)
        cells = []
        for x in rep.ranks:
            cells += [f"{100 * x.comm_s / x.wall_s:>8.1f}", f"{x.idle_pct:>8.1f}"]
        out.append(f"{r['name']:<18} {rws:>7} {strides:>7} {r['wall']:>9.2f} {r['wall'] / eq:>8.2f} "
                   f"{r['wall'] / r['ideal']:>8.2f} {' '.join(cells)} {r['psnr']:>8.1f}")
    out.append("idle % = share of the rank's loop not computing (waiting on exchanges or on the other rank); "
               "comm % = share blocked in exchanges")
    out.append("ideal = steps x rows / (sum of measured rows/s): all work spread perfectly, no exchange cost; "
               "PSNR vs the single-process image (random weights: judge trends, not values)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.parser("bench-balance", __doc__, model="tiny-sd15", height=64, width=64, steps=12, warmup=2)
    p.add_argument("--slowdown", type=float, default=2.0)
    p.add_argument("--slowdown-from", type=int, default=None,
                   help="cpu:1 becomes --slowdown times slower at this step: static plan vs in-run re-plan")
    return common.emit(p, argv, lambda args: changing_cluster(args) if args.slowdown_from is not None
                       else table(*run(args), args))

if __name__ == "__main__":
    raise SystemExit(main())
