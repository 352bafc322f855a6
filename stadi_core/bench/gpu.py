"""GPU benchmarks for one lent GPU (issue: GPU speed path). Prints tables; writes them to --out.

    python -m stadi_core.bench.gpu graphs      # band compute, eager vs CUDA graphs, full/half/quarter
    python -m stadi_core.bench.gpu mps         # 70%/30% CUDA-MPS emulation: 1 worker vs equal vs elastic vs +strides
    python -m stadi_core.bench.gpu all
    python -m stadi_core.bench.gpu diagnose    # which ingredient turns two bands non-finite (transport, MPS, graphs, mode)
    python -m stadi_core.bench.gpu acceptance --out DIR   # issue #17 acceptance: all of it in one <= 8 min call
                                                           # (--device cpu: a < 60 s smoke test on a tiny model)

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
import sys
import tempfile
import time
from dataclasses import dataclass, replace

from ..api import generate, profile
from ..cluster import ClusterSpec, DeviceSpec
from ..models.spec import ModelSpec
from ..report import measured_capabilities, psnr
from ..runtime.registry import shutdown_pools
from . import common


def _spec(model: str, dtype: str = "float16") -> ModelSpec:
    return ModelSpec(config=model, dtype=dtype)


def band_times(spec: ModelSpec, cluster: ClusterSpec, device: str, px: int, fractions=(1, 2, 4),
               graph_modes=(False, True), repeats: int = 5):
    """Yield ``(rows, graphs, seconds)`` of one network call on ``device``'s band of latent/f rows.

    A generator, so a caller with a deadline can stop between measurements (a 2048² CUDA-graph
    capture is seconds). ``cluster`` may hold more devices than ``device``: they measure at once.
    """
    latent = px // 8
    for f in fractions:
        rows = latent // f
        for graphs in graph_modes:
            cl = profile(spec, cluster, rows=rows, width=latent, repeats=repeats, graphs=graphs)
            yield rows, graphs, rows / {d.name: d.capability for d in cl.active()}[device]


def bench_graphs(args) -> str:
    spec = _spec(args.model)
    lines = [f"band compute of one network call ({args.model}, random fp16 weights, batch 1 with CFG = 2), "
             "measured alone on one worker: median of 5 after warm-up and capture",
             f"{'image':>6} {'rows':>5} {'eager ms':>9} {'graph ms':>9} {'eager/full':>10} {'graph/full':>10}"]
    for px in args.sizes:
        times = {}
        for rows, graphs, sec in band_times(spec, ClusterSpec.parse("cuda:0"), "cuda:0", px):
            times[rows, graphs] = sec
        full = max(times)[0]
        for rows in sorted({r for r, _ in times}, reverse=True):
            lines.append(f"{px:>6} {rows:>5} {1000 * times[rows, False]:>9.1f} {1000 * times[rows, True]:>9.1f} "
                         f"{times[rows, False] / times[full, False]:>10.2f} {times[rows, True] / times[full, True]:>10.2f}")
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
    with common.env_settings(env):
        subprocess.run([exe, "-d"], check=True, timeout=30)
        try:
            yield env
        finally:
            try:  # quit waits for clients; a slow exit must not lose the measurements
                subprocess.run([exe], input="quit\n", text=True, timeout=60)
            except subprocess.TimeoutExpired:
                print("warning: the MPS control daemon did not quit within 60 s", flush=True)


def bench_mps(args) -> str:
    spec = _spec(args.model, args.dtype)
    latent = args.mps_size // 8
    kw = dict(height=latent, width=latent, batch=1, steps=args.steps, sampler="euler", cfg=5.0, seed=0,
              warmup=args.warmup, graphs=not args.eager, stall_timeout_s=300)
    with mps_daemon():
        try:
            runs = list(split_runs(spec, kw, split_devices("cuda", args.split),
                                   full=("1 worker, 100% GPU", "cuda:0", {})))
        finally:
            shutdown_pools()  # before the MPS daemon quits
    table = _mps_table(args, runs, runs[0][1], runs[1][1], latent)
    print(table, flush=True)
    return table


def split_devices(device: str, pct) -> tuple[DeviceSpec, DeviceSpec]:
    """Two workers on one device at ``pct`` shares: CUDA MPS thread percentages on a GPU; on a CPU
    the engine's padded-compute ``slowdown`` (100/pct each), the emulation bench-balance uses."""
    if device == "cuda":
        return DeviceSpec("cuda:0", mps_percent=pct[0]), DeviceSpec("cuda:0.1", mps_percent=pct[1])
    return DeviceSpec("cpu:0", slowdown=100 / pct[0]), DeviceSpec("cpu:1", slowdown=100 / pct[1])


def split_runs(spec, kw: dict, devs, full: tuple[str, str, dict]):
    """Yield ``(name, result or failure line)``: one worker on the whole device, then equal bands,
    elastic bands and elastic + strides on ``devs`` (see ``split_devices``).

    ``full`` = (row name, cluster, extra generate options) of the one-worker reference. A generator,
    so a caller can stop at the first non-finite row or a deadline. Elastic bands are planned from
    the speeds the equal-band run measured (from the shares when that run failed).
    """
    name, cluster, opts = full
    generate(spec, cluster, mode="displaced", **dict(kw, **opts))  # start, build, capture graphs
    yield name, generate(spec, cluster, mode="displaced", **dict(kw, **opts))  # world 1: no exchange
    pct = [d.mps_percent or round(100 / d.slowdown) for d in devs]
    equal = ClusterSpec(tuple(replace(d, relative_speed=1.0) for d in devs), backend="gloo")
    eq = _attempt(lambda: _warm_then_run(spec, equal, kw, strides="off"))
    yield f"equal bands {pct[0]}/{pct[1]}", eq
    if isinstance(eq, str):  # no measured speeds: plan from the shares instead
        measured = ClusterSpec(tuple(replace(d, relative_speed=float(p)) for d, p in zip(devs, pct)), backend="gloo")
    else:
        measured = ClusterSpec(tuple(devs), backend="gloo").with_capabilities(measured_capabilities(eq.report))
    for name, strides in (("elastic bands", "off"), ("elastic + strides", "auto")):
        yield name, _attempt(lambda: _warm_then_run(spec, measured, kw, strides=strides))


def _warm_then_run(spec, cluster, kw: dict, **opts):
    """A short run first (start the pool, build, capture CUDA graphs), then the measured one."""
    run = dict(kw, mode="displaced")
    run.update(opts)
    generate(spec, cluster, **dict(run, steps=run["warmup"] + 2))
    return generate(spec, cluster, **run)


def _attempt(run):
    """``run()``'s result, or the first line of the deliberate error that stopped it (the table goes on)."""
    from ..errors import StadiError

    try:
        return run()
    except StadiError as exc:
        shutdown_pools()
        return str(exc).splitlines()[0][:400]


def _mps_table(args, runs, single, eq, latent, emulation: str | None = None) -> str:
    """The split comparison; ``emulation`` describes a non-MPS one (the CPU smoke test's slowdown)."""
    from ..runtime.pool import same_gpu_exchange

    px, pct = args.mps_size, args.split
    ref = single.latent
    base = single.report.denoise_s
    equal_s = None if isinstance(eq, str) else eq.report.denoise_s
    speeds = ("(the equal-band run failed: elastic bands planned from the MPS shares)" if equal_s is None else
              ", ".join(f"{k} {v:.0f} rows/s" for k, v in measured_capabilities(eq.report).items()))
    emulation = emulation or (f"CUDA MPS emulation on one GPU: workers at {pct[0]}% / {pct[1]}% of the SMs "
                              f"(EMULATED heterogeneity); same-GPU exchange: {same_gpu_exchange()}")
    out = [f"{emulation}; {args.model} random {args.dtype} weights, {px}x{px} ({latent}x{latent} latent), "
           f"{args.steps} euler steps, displaced mode, warmup {args.warmup}, "
           f"CUDA graphs {'off' if args.eager else 'on'}",
           f"capabilities measured in the equal-band run: {speeds}",
           "",
           f"{'configuration':<20} {'rows':>9} {'strides':>7} {'latency s':>9} {'/equal':>7} {'/1 worker':>9} "
           f"{'r0 idle%':>8} {'r0 comm%':>8} {'r1 idle%':>8} {'r1 comm%':>8} {'PSNR dB':>8}"]
    for name, res in runs:
        if isinstance(res, str):
            out.append(f"{name:<20} FAILED: {res}")
            continue
        rep = res.report
        cells = []
        for r in rep.ranks:
            cells += [f"{r.idle_pct:>8.1f}", f"{100 * r.comm_s / max(r.wall_s, 1e-9):>8.1f}"]
        cells += [" " * 8] * (4 - len(cells))
        vs_equal = f"{rep.denoise_s / equal_s:>7.2f}" if equal_s else f"{'-':>7}"
        out.append(f"{name:<20} {'/'.join(str(r.rows) for r in rep.ranks):>9} "
                   f"{','.join(str(r.stride) for r in rep.ranks):>7} {rep.denoise_s:>9.3f} "
                   f"{vs_equal} {rep.denoise_s / base:>9.2f} {' '.join(cells)} "
                   f"{psnr(res.latent, ref):>8.1f}")
    for name, res in runs:
        if not isinstance(res, str):
            out.extend(f"note ({name}): {n}" for n in res.report.notes)
    out.append("latency = makespan of the denoising loops on warm workers (graphs captured in a previous run); "
               "PSNR vs the 1-worker image (random weights: judge trends)")
    return "\n".join(out)


@dataclass(frozen=True)
class Variant:
    """One ingredient mix of a two-band run on one device (see ``diagnose``)."""

    name: str
    mode: str = "displaced"
    graphs: bool = False
    mps: bool = False
    exchange: str = "cuda-ipc"  # same-GPU exchange (STADI_SAME_GPU_EXCHANGE)
    gpu_only: bool = True


DIAGNOSE_VARIANTS = (
    Variant("exact, eager", mode="exact", gpu_only=False),
    Variant("displaced, eager", gpu_only=False),
    Variant("displaced, eager, gloo", exchange="gloo"),
    Variant("displaced, graphs", graphs=True),
    Variant("displaced, graphs, gloo", graphs=True, exchange="gloo"),
    Variant("displaced, eager, MPS", mps=True),
    Variant("displaced, graphs, MPS", graphs=True, mps=True),
)


def diagnose(args, deadline: float | None = None) -> str:
    """Two equal bands on one device, one ingredient changed per row, each against one worker.

    The 2048x2048 SDXL fp16 MPS benchmark once returned all-NaN latents for every two-band
    configuration (docs/gpu_bench_h100_mps_INVALID_nonfinite.txt) while one worker stayed
    finite; a non-finite run now stops at its first bad step and names it, so this table
    says which ingredient (mode, CUDA graphs, CUDA MPS, CUDA IPC vs gloo) brings it in.
    A failed row does not stop the others; rows not started by ``deadline`` (time.monotonic())
    are listed as skipped, so a caller with a time budget keeps what it measured.
    """
    spec = _spec(args.model, args.dtype)
    latent = args.mps_size // 8
    kw = dict(height=latent, width=latent, batch=1, steps=args.steps, sampler="euler", cfg=5.0, seed=0,
              warmup=args.warmup, stall_timeout_s=300, strides="off")
    gpu = args.device == "cuda"
    single = generate(spec, f"{args.device}:0", mode="displaced", **kw)
    shutdown_pools()  # each row starts its own pool: MPS and the exchange are fixed at start
    out = [f"two equal bands on one {args.device} device vs one worker: {args.model} random {args.dtype} weights, "
           f"{args.mps_size}x{args.mps_size} ({latent}x{latent} latent), {args.steps} euler steps, cfg 5, "
           f"warmup {args.warmup}; MPS rows at {args.split[0]}% / {args.split[1]}%",
           f"one worker: finite {bool(single.latent.isfinite().all())}, |x| max {single.latent.abs().max():.3g}",
           "",
           f"{'variant':<26} {'result':<9} {'max |diff|':>10} {'PSNR dB':>8} {'latency s':>9}  notes"]
    for v in DIAGNOSE_VARIANTS:
        if v.gpu_only and not gpu:
            out.append(f"{v.name:<26} {'skipped':<9} {'':>10} {'':>8} {'':>9}  needs CUDA")
            continue
        if deadline is not None and time.monotonic() > deadline:
            out.append(f"{v.name:<26} {'skipped':<9} {'':>10} {'':>8} {'':>9}  past the time budget")
            continue
        pct = args.split if v.mps else (None, None)
        cluster = ClusterSpec(tuple(DeviceSpec(f"{args.device}:{i}" if not gpu else ("cuda:0", "cuda:0.1")[i],
                                               relative_speed=1.0, mps_percent=pct[i]) for i in range(2)),
                              backend="gloo")
        with common.env_settings({"STADI_SAME_GPU_EXCHANGE": v.exchange}), mps_daemon() if v.mps else contextlib.nullcontext():
            res = (_attempt(lambda: _warm_then_run(spec, cluster, kw, mode=v.mode, graphs=True)) if v.graphs
                   else _attempt(lambda: generate(spec, cluster, mode=v.mode, **kw)))
            shutdown_pools()  # the row's own pool, before the MPS daemon quits
        if isinstance(res, str):
            out.append(f"{v.name:<26} {'FAILED':<9} {'':>10} {'':>8} {'':>9}  {res}")
            continue
        diff = float((res.latent - single.latent).abs().max())
        out.append(f"{v.name:<26} {'finite':<9} {diff:>10.3g} {psnr(res.latent, single.latent):>8.1f} "
                   f"{res.report.denoise_s:>9.3f}  {'; '.join(res.report.notes)}")
    out.append("FAILED rows name the first step whose network output held NaN/inf and its call kind "
               "(fresh: context exchanged inside the layers; refresh/stale: displaced context)")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["acceptance"]:  # its own options (device presets, budgets): see bench/acceptance.py
        from .acceptance import main as acceptance_main

        return acceptance_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m stadi_core.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["graphs", "mps", "all", "diagnose", "acceptance"])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--mps-size", type=int, default=2048, help="image size (px) of the mps and diagnose runs")
    p.add_argument("--split", type=int, nargs=2, default=[70, 30])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs in the MPS runs")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="random weights' dtype (mps and diagnose)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="'diagnose' on cpu runs the rows that need no GPU (a smoke test of the script)")
    p.add_argument("--out", help="append the tables to this file")
    args = p.parse_args(argv)
    for what, fn in (("graphs", bench_graphs), ("mps", bench_mps), ("diagnose", diagnose)):
        if args.what == what or (args.what == "all" and what != "diagnose"):
            table = fn(args)
            print(table, flush=True)
            if args.out:  # each table as soon as it exists: a later failure keeps it
                with open(args.out, "a") as f:
                    f.write(table + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
