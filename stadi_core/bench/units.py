"""Work-units benchmark: one device, bands and CFG-branch splits on 2 CPU workers, measured in one run.

    python -m stadi_core bench-units [--model sd15] [--height 24] [--width 32] [--steps 6] [--cfg 5] [--repeats 3]

Every configuration generates the same image (seed, sampler, CFG) on warm pools; the
slow worker is EMULATED (its compute padded to a budget with a sleep, as bench-balance does).
Printed with the pair baseline of this machine: two independent single-thread matmul
processes, each timed against one alone, so the parallel ratios can be read against what
two cores deliver here (on the 2-core CI machine each runs at ~0.76 of one alone).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch

from ..api import generate, reference_generate
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import model_spec_for
from ..replan import REPLAN_ENV
from ..report import measured_capabilities, psnr
from . import common


def _matmul_loop(seconds_out, n: int = 1024, reps: int = 20) -> None:
    torch.set_num_threads(1)
    a = torch.randn(n, n)
    t0 = time.perf_counter()
    for _ in range(reps):
        a = torch.tanh(a @ a / n)
    seconds_out.put(time.perf_counter() - t0)


def pair_baseline() -> float:
    """Throughput of each of two busy single-thread processes relative to one alone."""
    ctx = mp.get_context("spawn")

    def run(k: int) -> float:
        q = ctx.Queue()
        procs = [ctx.Process(target=_matmul_loop, args=(q,)) for _ in range(k)]
        for p in procs:
            p.start()
        times = [q.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        return sum(times) / len(times)

    run(1)  # warm the page cache / interpreter start
    alone = min(run(1) for _ in range(3))
    pair = min(run(2) for _ in range(3))
    return alone / pair


def _cluster(slow: float, speeds=None) -> ClusterSpec:
    speeds = speeds or (None, None)
    return ClusterSpec((DeviceSpec("cpu:0", relative_speed=speeds[0]),
                        DeviceSpec("cpu:1", relative_speed=speeds[1], slowdown=slow)), backend="gloo")


def _configurations(args, spec, kw, record_first):
    """(group, name, mode, generate kwargs) of every row, in the order they run. The plans are
    fixed in the first round: elastic bands take the speeds measured on equal bands, the
    re-planned split those measured on the uneven split itself (``record_first`` runs a row
    of the first round and returns its result)."""
    one = ClusterSpec((DeviceSpec("cpu:0"),), backend="gloo")
    disp = dict(mode="displaced", warmup=args.warmup, strides="off")
    singles = [("single device (1 worker, 1 thread)", dict(threads_per_worker=1))]
    if not args.slow_only:
        singles.append(("whole CPU in one worker (2 threads)", {}))
    rows = []
    for name, pool_kw in singles:
        generate(spec, one, warmup=1, **pool_kw, **dict(kw, steps=1))  # build the model in this pool once
        rows.append(("both", name, "exact", dict(cluster=one, strategy="bands", mode="exact", **pool_kw)))
        record_first(*rows[-1])
    for slow in ((2.0,) if args.slow_only else (1.0, 2.0)):
        group = "equal" if slow == 1.0 else "cpu:1 2x slower"
        equal = _cluster(slow, (1.0, 1.0))
        generate(spec, equal, strategy="bands", **dict(kw, steps=1), **disp)  # warm this pool
        eq = (group, "equal bands", "displaced", dict(cluster=equal, strategy="bands", **disp))
        measured = _cluster(slow).with_capabilities(measured_capabilities(record_first(*eq).report))
        rows.append(eq)
        more = [(group, "elastic bands", "displaced", dict(cluster=measured, strategy="bands", **disp)),
                (group, "cfg_split", "exact", dict(cluster=measured, strategy="cfg_split", mode="exact")),
                (group, "uneven branch split", "displaced", dict(cluster=measured, strategy="cfg_split+bands", **disp))]
        for r in more:
            res = record_first(*r)
        rows += more
        # ... re-planned from its own unit times: a band of a branch costs more per row than a whole
        # branch (halos, context), which speeds measured on equal bands do not show
        replanned = _cluster(slow).with_capabilities(measured_capabilities(res.report))
        rows.append((group, "uneven split, re-planned", "displaced",
                     dict(cluster=replanned, strategy="cfg_split+bands", **disp)))
        record_first(*rows[-1])
    return rows


def run(args) -> tuple[list[dict], tuple[float, float]]:
    """Every configuration ``args.repeats`` times, interleaved (round after round of all rows), so
    a slow spell of this shared machine lands on every row alike; the table takes medians."""
    spec = model_spec_for(args.model)
    kw = dict(height=args.height, width=args.width, batch=1, steps=args.steps, sampler="euler", cfg=args.cfg,
              seed=args.seed)
    with common.env_settings({REPLAN_ENV: "off"}):  # every row is the plan it names: no in-run re-planning
        pair = pair_baseline()
        torch.set_num_threads(1)
        ref = reference_generate(spec, **kw)
        results: dict[tuple, dict] = {}

        def record(group, name, mode, gen_kw):
            gen_kw = dict(gen_kw)
            res = generate(spec, gen_kw.pop("cluster"), **kw, **gen_kw)
            row = results.setdefault((group, name), dict(group=group, name=name, mode=mode, times=[], report=res.report,
                                                         psnr=psnr(res.latent, ref)))
            row["times"].append(res.report.denoise_s)
            return res

        configs = _configurations(args, spec, kw, record)
        for _ in range(args.repeats - 1):
            for c in configs:
                record(*c)
        pair_after = pair_baseline()
    rows = list(results.values())
    single = statistics.median(rows[0]["times"])
    for r in rows:
        r["s"] = statistics.median(r["times"])
        r["vs_single"] = r["s"] / single
    return rows, (pair, pair_after)


def table(rows: list[dict], pairs: tuple[float, float], args) -> str:
    pair = min(pairs)
    n = len(rows[0]["times"])
    out = [f"STADI work-units benchmark: {args.model} UNet, random weights, latent {args.height}x{args.width} "
           f"({args.height * 8}x{args.width * 8} px), batch 1, {args.steps} euler steps, cfg {args.cfg:g}, displaced "
           f"warmup {args.warmup}; "
           "2 CPU workers of 1 thread each (gloo); the slow worker is EMULATED (compute padded with a sleep); "
           "in-run re-planning off (each row keeps the plan it names)",
           f"pair baseline on this machine: two busy single-thread matmul processes each run at {pairs[0]:.2f} (before) "
           f"and {pairs[1]:.2f} (after) of one alone (ideal 2-way ratio here: {1 / (2 * pair):.2f}x of one device)",
           f"{n} interleaved round{'s' if n > 1 else ''}: every row once per round; denoise s is the median, "
           "range the fastest and slowest round",
           "",
           f"{'workers':<16} {'configuration':<36} {'mode':<9} {'work per rank':<34} {'denoise s':>9} "
           f"{'range':>15} {'vs single':>9} {'vs equal':>8} {'PSNR dB':>8}"]
    equal_s = {}
    for r in rows:
        if r["name"] == "equal bands":
            equal_s[r["group"]] = r["s"]
    for r in rows:
        plan = r["report"].plan
        if plan.get("groups"):
            work = "; ".join(f"{'+'.join(g['branches'])}: " + "/".join(f"r{k}:{n}" for k, n in zip(g["ranks"], g["rows"]))
                             for g in plan["groups"])
        else:
            work = "rows " + "/".join(str(b["rows"]) for b in plan["bands"])
        eq = equal_s.get(r["group"])
        vs_eq = f"{r['s'] / eq:>8.2f}" if eq else f"{'':>8}"
        spread = f"{min(r['times']):.1f}-{max(r['times']):.1f}"
        out.append(f"{r['group']:<16} {r['name']:<36} {r['mode']:<9} {work:<34} {r['s']:>9.2f} {spread:>15} "
                   f"{r['vs_single']:>9.2f} {vs_eq} {r['psnr']:>8.1f}")
    by = {(r["group"], r["name"]): r for r in rows}
    slow = "cpu:1 2x slower"

    def gains(name):
        split, other = by[(slow, "cfg_split")]["times"], by[(slow, name)]["times"]
        per_round = [1 - o / c for o, c in zip(other, split)]
        return 1 - by[(slow, name)]["s"] / by[(slow, "cfg_split")]["s"], per_round

    out.append("")
    if ("equal", "cfg_split") in by:
        eq_split = by[("equal", "cfg_split")]["s"]
        out.append(f"equal workers: cfg_split = {eq_split / rows[0]['s']:.2f}x the single device "
                   "(goal <= 0.80); each worker does exactly half the single device's work with no exchange, so this "
                   f"UNet's own pair efficiency here is {0.5 * rows[0]['s'] / eq_split:.2f}")
    for name, label in (("uneven branch split", "the uneven branch split"),
                        ("uneven split, re-planned", "re-planned from its own unit times")):
        g, per_round = gains(name)
        out.append(f"cpu:1 2x slower: {label} is {100 * abs(g):.0f}% {'faster' if g >= 0 else 'slower'} than plain "
                   "cfg_split (medians; goal >= 20% faster); "
                   "per round: " + ", ".join(f"{100 * x:.0f}%" for x in per_round))
    out.append("denoise s = makespan of the ranks' denoising loops on warm pools; vs single = / the 1-thread single "
               "device; PSNR vs the single-process image (inf = identical; displaced bands deviate, exact splits do not)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = common.parser("bench-units", __doc__, model="sd15", height=24, width=32, steps=6, warmup=1)
    p.add_argument("--slow-only", action="store_true", help="only the single device and the 2x-slower-worker rows")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every row, interleaved; the table takes medians")
    return common.emit(p, argv, lambda args: table(*run(args), args))

if __name__ == "__main__":
    raise SystemExit(main())
