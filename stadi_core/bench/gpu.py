"""GPU benchmarks for one lent GPU (issue: GPU speed path). Prints tables; writes them to --out.

    python -m stadi_core.bench.gpu graphs      # band compute, eager vs CUDA graphs, full/half/quarter
    python -m stadi_core.bench.gpu mps         # 70%/30% CUDA-MPS emulation: 1 worker vs equal vs elastic vs +strides
    python -m stadi_core.bench.gpu all

SDXL architecture with random fp16 weights (nothing is downloaded). The heterogeneous
cluster is EMULATED on one GPU with CUDA MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per
worker; the MPS control daemon is a user-space service, no card setting changes).
Same-GPU workers exchange through CUDA IPC buffers (parallel/ipc_transport.py: the data
stays on the GPU, gloo carries only barriers); the exchange is part of the measured time
and is reported as comm %.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile

from ..api import generate, profile
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import ModelSpec
from ..report import measured_capabilities, psnr


def _spec(model: str) -> ModelSpec:
    return ModelSpec(config=model, dtype="float16")


def bench_graphs(args) -> str:
    spec = _spec(args.model)
    lines = [f"band compute of one network call ({args.model}, random fp16 weights, batch 1 with CFG = 2), "
             "measured alone on one worker: median of 5 after warm-up and capture",
             f"{'image':>6} {'rows':>5} {'eager ms':>9} {'graph ms':>9} {'eager/full':>10} {'graph/full':>10}"]
    for px in args.sizes:
        latent = px // 8
        full = {}
        for rows in (latent, latent // 2, latent // 4):
            times = {}
            for graphs in (False, True):
                cl = profile(spec, ClusterSpec.parse("cuda:0"), rows=rows, width=latent, repeats=5, graphs=graphs)
                times[graphs] = rows / cl.active()[0].capability
            full.setdefault(False, times[False])
            full.setdefault(True, times[True])
            lines.append(f"{px:>6} {rows:>5} {1000 * times[False]:>9.1f} {1000 * times[True]:>9.1f} "
                         f"{times[False] / full[False]:>10.2f} {times[True] / full[True]:>10.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def mps_daemon():
    """Start a private CUDA MPS control daemon for this process and its workers; stop it after."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("nvidia-cuda-mps-control not found: CUDA MPS is needed to emulate unequal GPUs")
    root = tempfile.mkdtemp(prefix="stadi-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log")}
    for d in env.values():
        os.makedirs(d, exist_ok=True)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    subprocess.run([exe, "-d"], check=True, timeout=30)
    try:
        yield env
    finally:
        try:  # quit waits for clients; a slow exit must not lose the measurements
            subprocess.run([exe], input="quit\n", text=True, timeout=60)
        except subprocess.TimeoutExpired:
            print("warning: the MPS control daemon did not quit within 60 s", flush=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_mps(args) -> str:
    from ..runtime.pool import shutdown_pools

    spec = _spec(args.model)
    px = args.mps_size
    latent = px // 8
    kw = dict(height=latent, width=latent, batch=1, steps=args.steps, sampler="euler", cfg=5.0, seed=0,
              warmup=args.warmup, graphs=not args.eager, stall_timeout_s=300)
    pct = args.split
    with mps_daemon():
        generate(spec, ClusterSpec.parse("cuda:0"), mode="displaced", **kw)  # start, build, capture graphs
        single = generate(spec, ClusterSpec.parse("cuda:0"), mode="displaced", **kw)  # world 1: no exchange
        shutdown_pools()
        devs = (DeviceSpec("cuda:0", mps_percent=pct[0]), DeviceSpec("cuda:0.1", mps_percent=pct[1]))
        equal = ClusterSpec(tuple(DeviceSpec(d.name, relative_speed=1.0, mps_percent=d.mps_percent) for d in devs),
                            backend="gloo")
        generate(spec, equal, mode="displaced", strides="off", **dict(kw, steps=args.warmup + 2))  # start, capture
        eq = generate(spec, equal, mode="displaced", strides="off", **kw)
        measured = ClusterSpec(devs, backend="gloo").with_capabilities(measured_capabilities(eq.report))
        runs = [("1 worker, 100% GPU", single), (f"equal bands {pct[0]}/{pct[1]}", eq)]
        for name, strides in (("elastic bands", "off"), ("elastic + strides", "auto")):
            generate(spec, measured, mode="displaced", strides=strides, **dict(kw, steps=args.warmup + 2))
            runs.append((name, generate(spec, measured, mode="displaced", strides=strides, **kw)))
        table = _mps_table(args, runs, single, eq, latent)
        print(table, flush=True)
        shutdown_pools()
    return table


def _mps_table(args, runs, single, eq, latent) -> str:
    px, pct = args.mps_size, args.split
    ref = single.latent
    base = single.report.denoise_s
    equal_s = eq.report.denoise_s
    out = [f"CUDA MPS emulation on one GPU: workers at {pct[0]}% / {pct[1]}% of the SMs (EMULATED heterogeneity); "
           f"{args.model} random fp16 weights, {px}x{px} ({latent}x{latent} latent), {args.steps} euler steps, "
           f"displaced mode, warmup {args.warmup}, CUDA graphs {'off' if args.eager else 'on'}; "
           f"same-GPU exchange through CUDA IPC",
           f"capabilities measured in the equal-band run: " + ", ".join(
               f"{k} {v:.0f} rows/s" for k, v in measured_capabilities(eq.report).items()),
           "",
           f"{'configuration':<20} {'rows':>9} {'strides':>7} {'latency s':>9} {'/equal':>7} {'/1 worker':>9} "
           f"{'r0 idle%':>8} {'r0 comm%':>8} {'r1 idle%':>8} {'r1 comm%':>8} {'PSNR dB':>8}"]
    for name, res in runs:
        rep = res.report
        cells = []
        for r in rep.ranks:
            cells += [f"{r.idle_pct:>8.1f}", f"{100 * r.comm_s / max(r.wall_s, 1e-9):>8.1f}"]
        cells += [" " * 8] * (4 - len(cells))
        out.append(f"{name:<20} {'/'.join(str(r.rows) for r in rep.ranks):>9} "
                   f"{','.join(str(r.stride) for r in rep.ranks):>7} {rep.denoise_s:>9.3f} "
                   f"{rep.denoise_s / equal_s:>7.2f} {rep.denoise_s / base:>9.2f} {' '.join(cells)} "
                   f"{psnr(res.latent, ref):>8.1f}")
    for name, res in runs:
        out.extend(f"note ({name}): {n}" for n in res.report.notes)
    out.append("latency = makespan of the denoising loops on warm workers (graphs captured in a previous run); "
               "PSNR vs the 1-worker image (random weights: judge trends)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stadi_core.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["graphs", "mps", "all"])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--mps-size", type=int, default=2048)
    p.add_argument("--split", type=int, nargs=2, default=[70, 30])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs in the MPS runs")
    p.add_argument("--out", help="append the tables to this file")
    args = p.parse_args(argv)
    for what, fn in (("graphs", bench_graphs), ("mps", bench_mps)):
        if args.what in (what, "all"):
            table = fn(args)
            print(table, flush=True)
            if args.out:  # each table as soon as it exists: a later failure keeps it
                with open(args.out, "a") as f:
                    f.write(table + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
