"""Command line: ``python -m stadi_core generate | profile | simulate | train-tiny | bench-*``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import StadiError


def _cluster(args):
    import torch

    from .cluster import ClusterSpec, DeviceSpec

    text = args.devices or (f"cuda*{torch.cuda.device_count()}" if torch.cuda.device_count() else "cpu*2")
    cluster = ClusterSpec.parse(text, backend=args.backend)
    slow, starts = {}, {}  # DEVICE=X[@STEP]: X times slower (from sampler step STEP on)
    for item in args.slowdown or []:
        pair, _, step = item.partition("@")
        [(name, factor)] = _pairs([pair])
        slow[name] = factor
        if step:
            if not step.strip().isdigit():
                raise StadiError(f"--slowdown {item!r}: after '@' give the step it starts at, e.g. cpu:1=2@4")
            starts[name] = int(step)
    speed = dict(_pairs(args.speed))
    devices = []
    for d in cluster.devices:
        devices.append(DeviceSpec(d.name, relative_speed=speed.get(d.name), slowdown=slow.get(d.name, 1.0),
                                  slowdown_from=starts.get(d.name, 0)))
    return ClusterSpec(tuple(devices), backend=cluster.backend)


def _pairs(items):
    for item in items or []:
        name, _, value = item.partition("=")
        if not value:
            raise StadiError(f"expected DEVICE=NUMBER, got {item!r}")
        yield name.strip(), float(value)


def _add_run_args(p):
    p.add_argument("--devices", help="e.g. cpu*2, cuda:0,cuda:1 (default: every GPU, else two CPU workers)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--model", default="tiny-shapes", help="tiny-shapes (trained here, the default), tiny-sd15, tiny-sdxl, "
                   "tiny-sd3, tiny-sd35, tiny-flux (random weights), ... or a local diffusers folder (UNet, SD3 or Flux)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--slowdown", action="append", metavar="DEVICE=X[@STEP]",
                   help="emulate a device X times slower (from sampler step STEP on)")
    p.add_argument("--speed", action="append", metavar="DEVICE=S", help="manual relative speed of a device")
    p.add_argument("--listen", default=None, metavar="ADDR:PORT", help="let workers on other machines join here "
                   "(python -m stadi_core worker --join ADDR:PORT --token T); open the port in the firewall")
    p.add_argument("--token", default=None, help="the secret remote workers must prove they know (default: "
                   "STADI_TOKEN); required with --listen on anything but 127.0.0.1")
    p.add_argument("--remote", type=int, default=0, metavar="N", help="wait for N remote workers and add them "
                   "(as HOST/DEVICE) after --devices")


def _spec(args):
    from .models.spec import model_spec_for

    return model_spec_for(args.model, args.dtype)


def cmd_generate(args) -> int:
    from .api import generate
    from .outputs import write_outputs
    from .planner import Plan

    spec = _spec(args)
    cluster = _cluster(args)
    height, width = _size(args, spec)
    strides = args.strides if args.strides in ("auto", "off") else tuple(int(s) for s in args.strides.split(","))
    print(f"STADI generate: model {args.model}, devices {', '.join(d.name for d in cluster.active())}, "
          f"latent {height}x{width}, {args.steps} steps {args.sampler}, mode {args.mode}", flush=True)
    t0 = time.perf_counter()
    res = generate(spec, cluster, height=height, width=width, batch=args.batch, steps=args.steps,
                   sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg, seed=args.seed, mode=args.mode,
                   warmup=args.warmup, strides=strides, graphs=args.graphs, strategy=args.strategy,
                   hybrid_window=args.hybrid_window, prompt=args.prompt, **_remote_args(args),
                   context=None if args.mode == "exact" and args.context in ("full", "auto") else args.context,
                   on_step=lambda rank, t: rank == 0 and print(f"  step {t['step'] + 1}/{args.steps}", flush=True))
    total = time.perf_counter() - t0
    plan = Plan.from_dict(res.report.plan)
    if getattr(spec.adapter, "TAKES_PROMPT", False):
        print(f"caption: {spec.adapter.prompt_caption(args.prompt, args.seed)!r}")
    print(plan.describe())
    print(res.report.table())
    print(f"total {total:.2f} s including worker start-up (warm pools are reused within one process)")
    compare = args.compare if args.compare is not None else str(spec.config).startswith("tiny-")
    if compare:
        print(_comparison(spec, res.latent, plan, args, height, width))
    for p in write_outputs(Path(args.out), res.latent, res.report, spec.adapter, plan):
        print(f"wrote {p}")
    return 0


def _remote_args(args) -> dict:
    """generate()'s remote-worker arguments from --listen/--token/--remote (token default: STADI_TOKEN)."""
    import os

    if not args.listen:
        if args.remote:
            raise StadiError("--remote needs --listen ADDR:PORT (where the remote workers join)")
        return {}
    return {"listen": args.listen, "token": args.token or os.environ.get("STADI_TOKEN") or None,
            "remote_workers": args.remote}


def _size(args, spec) -> tuple[int, int]:
    """--height/--width, else the model's demo size (tiny-shapes: twice its training height)."""
    default = getattr(spec.adapter, "DEMO_SIZE", (48, 48))
    return args.height or default[0], args.width or default[1]


def _comparison(spec, latent, plan, args, height, width) -> str:
    """The same seed on one process with the unmodified network, against the parallel result."""
    from .api import reference_generate
    from .report import psnr

    ref = reference_generate(spec, height=height, width=width, batch=args.batch, steps=args.steps,
                             sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg, seed=args.seed,
                             prompt=args.prompt)
    diff = float((latent - ref).abs().max())
    to_rgb = getattr(spec.adapter, "to_rgb", None)
    if to_rgb is not None:
        from .quality import psnr as picture_psnr

        quality = f"picture PSNR {picture_psnr(to_rgb(latent), to_rgb(ref)):.2f} dB"
    else:
        quality = f"latent PSNR {psnr(latent, ref):.2f} dB"
    split = f"{plan.world_size} ranks ({plan.strategy}, {plan.mode})" if plan.world_size > 1 else "one rank"
    verdict = ("equal to float precision" if diff <= 1e-4 * max(1.0, float(ref.abs().max())) else
               "approximate (displaced context / strides), as the mode allows" if plan.mode == "displaced" or
               any(b.stride > 1 for b in plan.bands) else "DIFFERENT: please report this")
    return (f"parallel ({split}) vs single device, same seed: max |diff| {diff:.3g}, {quality} -> {verdict}")


def cmd_profile(args) -> int:
    from .api import profile, with_joined

    cluster, joined = _cluster(args), {}
    remote = _remote_args(args)
    if remote:  # devices of other machines: wait for them in the lobby, measure them like local ones
        from .runtime.lobby import open_lobby

        lobby = open_lobby(remote["listen"], remote["token"])
        cluster = with_joined(cluster, lobby.wait_for(args.remote, 120) if args.remote else [])
        joined = {"lobby": lobby}
    cluster = profile(_spec(args), cluster, rows=args.rows, width=args.width, **joined)
    for d in cluster.active():
        print(f"{d.name:<8} {d.capability:10.1f} rows/s   slowdown x{d.slowdown:g}")
    for note in joined["lobby"].link_notes(cluster.names()) if joined else []:
        print(note)
    return 0


def cmd_simulate(args) -> int:
    """Predict a plan's latency on the cluster described by a curves file (see stadi_core.simulate)."""
    from .simulate import LinkModel, compare_strategies, load_curves, plan_from_curves, simulate, strategies_table

    cs = load_curves(args.curves)
    names = [n.strip() for n in args.devices.split(",") if n.strip()] if args.devices else list(cs.curves)
    unknown = [n for n in names if n not in cs.curves]
    if unknown:
        raise StadiError(f"--devices names {', '.join(unknown)}, which the curves file does not have "
                         f"({', '.join(cs.curves)})")
    seen: dict[str, int] = {}
    devices = []
    for n in names:  # the same curve several times: cuda:0, cuda:0#1, ...
        k = seen.get(n, 0)
        seen[n] = k + 1
        devices.append(n if k == 0 else f"{n}#{k}")
    speeds = None
    if args.speeds:
        items = [s.strip() for s in args.speeds.split(",") if s.strip()]
        if all("=" in s for s in items):
            by = dict(_pairs(items))
            missing = [d for d in devices if d not in by]
            if missing:
                raise StadiError(f"--speeds has no speed for {', '.join(missing)}")
            speeds = [by[d] for d in devices]
        else:
            speeds = [float(s) for s in items]
            if len(speeds) != len(devices):
                raise StadiError(f"--speeds gives {len(speeds)} speeds for {len(devices)} devices")
    strides = args.strides if args.strides in ("auto", "off") else tuple(int(s) for s in args.strides.split(","))
    ex, ln = cs.exchange, cs.links
    links_file = json.loads(Path(args.links).read_text()) if args.links else {}

    def pick(cli, *sources, default):
        if cli is not None:
            return cli
        for src, key in sources:
            if key in src and not isinstance(src[key], list):
                return src[key]
        return default

    bw_m = links_file.get("bandwidth_gbps", ln.get("bandwidth_gbps"))
    lat_m = links_file.get("latency_us", ln.get("latency_us"))
    link = LinkModel(
        bandwidth_gbps=float(pick(args.bandwidth_gbps, (links_file, "bandwidth_gbps"), (ln, "bandwidth_gbps"),
                                  default=25.0)),
        latency_s=float(pick(args.latency_us, (links_file, "latency_us"), (ln, "latency_us"), default=20.0)) * 1e-6,
        bandwidth_matrix=bw_m if isinstance(bw_m, list) and args.bandwidth_gbps is None else None,
        latency_matrix=[[v * 1e-6 for v in row] for row in lat_m]
        if isinstance(lat_m, list) and args.latency_us is None else None)
    sim_kw = dict(link=link, bytes_per_row=float(pick(args.bytes_per_row, (ex, "bytes_per_row"), default=0.0)),
                  bytes_fixed=float(pick(args.bytes_fixed, (ex, "bytes_fixed"), default=0.0)),
                  bytes_table=ex.get("table") if args.bytes_per_row is None and args.bytes_fixed is None else None,
                  messages=int(pick(args.messages, (ex, "messages"), default=1)),
                  step_overhead_s=args.step_overhead_ms * 1e-3, displaced_exchange=args.displaced_exchange)
    plan_kw = dict(devices=devices, speeds=speeds, align=args.align, steps=args.steps, warmup=args.warmup,
                   mode=args.mode, sampler=args.sampler, max_stride=args.max_stride)
    head = f"STADI simulate: curves {args.curves}"
    if cs.description:
        head += f" ({cs.description})"
    print(head)
    if cs.illustrative:
        print("note: the curves are ILLUSTRATIVE (invented, not measured): the prediction shows the model, not a cluster")
    print("devices: " + ", ".join(f"{d}" + (f" [{cs.labels[d.split('#')[0]]}]" if d.split('#')[0] in cs.labels else "")
                                  for d in devices))
    print(f"exchange: {sim_kw['bytes_fixed']:.4g} + {sim_kw['bytes_per_row']:.4g} bytes/row per rank per sync step"
          + (" (table)" if sim_kw["bytes_table"] is not None else "")
          + f", {sim_kw['messages']} all-gathers per call; links {link.bandwidth_gbps:g} GB/s, "
            f"{link.latency_s * 1e6:g} us" + (" (matrix)" if link.bandwidth_matrix or link.latency_matrix else ""))
    plan = plan_from_curves(cs.curves, args.height, strides=strides, **plan_kw)
    print(plan.describe())
    res = simulate(plan, cs.curves, **sim_kw)
    print(res.table())
    if args.timeline:
        print(res.timeline())
    if args.equal:
        print()
        print(strategies_table(compare_strategies(cs.curves, args.height, strides=strides, **plan_kw, **sim_kw)))
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="one parallel generation; writes latent, preview and report")
    _add_run_args(g)
    g.add_argument("--height", type=int, default=None, help="latent rows (image px / 8; tiny-shapes has no VAE: px); "
                   "default 64 for tiny-shapes, else 48")
    g.add_argument("--width", type=int, default=None, help="latent columns; default 32 for tiny-shapes, else 48")
    g.add_argument("--prompt", default=None, help="tiny-shapes caption, e.g. 'red circle horizon stripes' "
                   "(default: one drawn from the seed)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--steps", type=int, default=12)
    g.add_argument("--sampler", default="euler", choices=["euler", "euler_ancestral", "dpmpp_2m"])
    g.add_argument("--scheduler", default=None, choices=["karras", "normal", "simple"],
                   help="default: karras for UNets, simple for flow models (SD3, Flux)")
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="displaced", choices=["exact", "displaced"])
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--strides", default="auto", help="auto, off, or per device e.g. 1,2")
    g.add_argument("--strategy", default="auto", choices=["auto", "bands", "cfg_split", "cfg_split+bands"],
                   help="how to split the work: auto picks the arrangement the cost model predicts fastest (one "
                   "device alone included); cfg_split puts cond and uncond on two devices; cfg_split+bands cuts the "
                   "branches by speed")
    g.add_argument("--context", default="full",
                   help="how displaced steps exchange context: full, partial:0.3 (PCPP: nearest 30%% of each "
                   "neighbour's rows), fp8, delta (4-bit deltas with error feedback), combinations such as "
                   "partial:0.3+delta, ',no-overlap', or auto (the cost model's pick)")
    g.add_argument("--hybrid-window", default=None, choices=["sdxl", "sd3", "sd15"],
                   help="Hybridiff's adaptive window (branch splits): every second step in it reuses the last output")
    g.add_argument("--out", default="out", help="output folder")
    g.add_argument("--graphs", action="store_true", help="CUDA graphs for communication-free band calls")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the seed on one process and print max |diff| and PSNR (default: for tiny models)")
    g.set_defaults(func=cmd_generate)
    p = sub.add_parser("profile", help="measure each device's rows/s on the model")
    _add_run_args(p)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=48)
    p.set_defaults(func=cmd_profile)
    s = sub.add_parser("simulate", help="predict a plan's latency on a cluster from per-device compute curves")
    s.add_argument("--curves", required=True, help="curves JSON (format: stadi_core/simulate.py docstring; "
                   "example: stadi_core/bench/example_curves.json)")
    s.add_argument("--devices", help="curve names in band order, repeats allowed (default: every curve, file order)")
    s.add_argument("--height", type=int, default=128, help="latent rows (image px / 8)")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--mode", default="displaced", choices=["exact", "displaced"])
    s.add_argument("--strides", default="auto", help="auto, off, or per device e.g. 1,2")
    s.add_argument("--sampler", default="euler")
    s.add_argument("--align", type=int, default=8, help="row alignment of the model (8 for SD UNets)")
    s.add_argument("--max-stride", type=int, default=4)
    s.add_argument("--speeds", help="planning speeds instead of the curves': 1,0.7 or DEVICE=S,...")
    s.add_argument("--bandwidth-gbps", type=float, help="link bandwidth, GB/s (1e9 bytes/s); default 25")
    s.add_argument("--latency-us", type=float, help="link latency per all-gather, microseconds; default 20")
    s.add_argument("--links", help="JSON with P x P bandwidth_gbps / latency_us matrices (band order)")
    s.add_argument("--bytes-per-row", type=float, help="bytes a rank sends per latent row per sync step")
    s.add_argument("--bytes-fixed", type=float, help="bytes a rank sends per sync step regardless of rows")
    s.add_argument("--messages", type=int, help="all-gathers per network call (each pays the latency)")
    s.add_argument("--step-overhead-ms", type=float, default=0.0, help="host cost of every base step, per rank")
    s.add_argument("--displaced-exchange", default="deferred", choices=["deferred", "overlapped", "after_forward"],
                   help="when a displaced sync step's exchange must be in: before the next sync step (design, "
                   "default), at the end of the same call overlapped with its compute, or after the forward")
    s.add_argument("--equal", action="store_true", help="also compare single / equal / elastic / elastic+strides")
    s.add_argument("--timeline", action="store_true", help="print every rank's per-step start and end")
    s.add_argument("--json", help="write the prediction (RunReport layout) to this file")
    s.set_defaults(func=cmd_simulate)
    sub.add_parser("bench-balance", help="equal vs elastic vs elastic+strides with an emulated slow worker "
                   "(its own options: bench-balance --help)")
    sub.add_parser("bench-units", help="one device vs bands vs CFG-branch splits on 2 CPU workers, measured "
                   "(bench-units --help)")
    sub.add_parser("bench-decode", help="Patch Stitch decode: full vs server bands vs bands on 2 CPU workers, "
                   "time, PSNR, seams, memory (bench-decode --help; needs STADI_COMFYUI_PATH)")
    sub.add_parser("bench-hybrid", help="Hybridiff's adaptive window on a branch split: steps saved, PSNR "
                   "(bench-hybrid --help)")
    sub.add_parser("bench-fastpath", help="one worker vs 2 workers on displaced bands, SD1.5 512 px "
                   "(bench-fastpath --help)")
    sub.add_parser("bench-quality", help="PSNR, SSIM and seam score of every mode on the trained tiny-shapes model "
                   "(bench-quality --help)")
    sub.add_parser("bench-context", help="bytes, exposed comm and quality of every context mode (full, partial, fp8, "
                   "delta) on the trained tiny-shapes model (bench-context --help)")
    sub.add_parser("bench-context-predict", help="analytic context bytes for SDXL/Flux 1024² and predicted speedups "
                   "over PCIe and 10 GbE per context mode (bench-context-predict --help)")
    sub.add_parser("bench-memory", help="host memory of STADI runs in the real ComfyUI with a full-size SD1.5: server, "
                   "files, workers, bytes sent (bench-memory --help; needs STADI_COMFYUI_PATH)")
    sub.add_parser("bench-replan", help="a worker 2x slower from step 4: static plan vs in-run re-plan in ComfyUI's "
                   "lockstep path (bench-replan --help; needs STADI_COMFYUI_PATH)")
    sub.add_parser("bench-ops", help="aten ops per band forward vs the stock network (bench-ops --help)")
    sub.add_parser("bench-two-hosts", help="root: a second host in a network namespace; the planner's choice on a "
                   "1 Gbit/s shaped vs an unshaped link, measured (bench-two-hosts --help)")
    sub.add_parser("simulate-arrangements", help="predicted tables: which arrangement auto picks on GPU clusters "
                   "that are not here (simulate-arrangements --help)")
    sub.add_parser("train-tiny", help="train the tiny-shapes model on this CPU (train-tiny --help)")
    sub.add_parser("worker", help="join a coordinator from this machine: worker --join HOST:PORT --token T "
                   "[--devices cuda:0,cuda:1] (worker --join X --help); or, as the coordinator starts its own, "
                   "worker --connect HOST:PORT --rank R")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"] and any(a == "--join" or a.startswith("--join=") for a in argv[1:]):
        from .runtime import join

        return join.main(argv[1:])
    if argv[:1] == ["worker"]:
        from .runtime import worker

        return worker.main(argv[1:])
    if argv[:1] == ["train-tiny"]:
        from . import train_tiny

        return train_tiny.main(argv[1:])
    benches = {"bench-balance": "balance", "bench-units": "units", "bench-hybrid": "hybrid", "bench-ops": "ops",
               "bench-fastpath": "fastpath", "bench-decode": "decode", "bench-quality": "quality", "simulate-arrangements": "arrangements",
               "bench-context": "context", "bench-context-predict": "context_predict", "bench-memory": "memory",
               "bench-replan": "replan", "bench-two-hosts": "two_hosts"}
    if argv[:1] and argv[0] in benches:
        import importlib

        return importlib.import_module(f".bench.{benches[argv[0]]}", __package__).main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StadiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
