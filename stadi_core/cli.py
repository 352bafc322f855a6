"""Command line: ``python -m stadi_core generate | profile | bench-balance``."""

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
    slow = dict(_pairs(args.slowdown))
    speed = dict(_pairs(args.speed))
    devices = []
    for d in cluster.devices:
        devices.append(DeviceSpec(d.name, relative_speed=speed.get(d.name), slowdown=slow.get(d.name, 1.0)))
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
    p.add_argument("--model", default="tiny-sd15", help="tiny-sd15, tiny-sdxl, or a local diffusers folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--slowdown", action="append", metavar="DEVICE=X", help="emulate a device X times slower")
    p.add_argument("--speed", action="append", metavar="DEVICE=S", help="manual relative speed of a device")


def _spec(args):
    from .models.spec import ModelSpec

    if Path(args.model).is_dir():
        return ModelSpec(path=str(Path(args.model).resolve()), config="local", dtype=args.dtype)
    return ModelSpec(config=args.model, dtype=args.dtype)


def cmd_generate(args) -> int:
    from .api import generate
    from .outputs import write_outputs

    spec = _spec(args)
    cluster = _cluster(args)
    strides = args.strides if args.strides in ("auto", "off") else tuple(int(s) for s in args.strides.split(","))
    print(f"STADI generate: model {args.model}, devices {', '.join(d.name for d in cluster.active())}, "
          f"latent {args.height}x{args.width}, {args.steps} steps {args.sampler}, mode {args.mode}", flush=True)
    t0 = time.perf_counter()
    res = generate(spec, cluster, height=args.height, width=args.width, batch=args.batch, steps=args.steps,
                   sampler=args.sampler, scheduler=args.scheduler, cfg=args.cfg, seed=args.seed, mode=args.mode,
                   warmup=args.warmup, strides=strides,
                   on_step=lambda rank, t: rank == 0 and print(f"  step {t['step'] + 1}/{args.steps}", flush=True))
    total = time.perf_counter() - t0
    from .planner import Plan

    print(Plan.from_dict(res.report.plan).describe())
    print(res.report.table())
    print(f"total {total:.2f} s including worker start-up (warm pools are reused within one process)")
    paths = write_outputs(Path(args.out), res.latent, res.report)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_profile(args) -> int:
    from .api import profile

    cluster = profile(_spec(args), _cluster(args), rows=args.rows, width=args.width)
    for d in cluster.active():
        print(f"{d.name:<8} {d.capability:10.1f} rows/s   slowdown x{d.slowdown:g}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stadi_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="one parallel generation; writes latent, preview and report")
    _add_run_args(g)
    g.add_argument("--height", type=int, default=48, help="latent rows (image px / 8)")
    g.add_argument("--width", type=int, default=48, help="latent columns (image px / 8)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--steps", type=int, default=12)
    g.add_argument("--sampler", default="euler", choices=["euler", "euler_ancestral", "dpmpp_2m"])
    g.add_argument("--scheduler", default="karras", choices=["karras", "normal", "simple"])
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="displaced", choices=["exact", "displaced"])
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--strides", default="auto", help="auto, off, or per device e.g. 1,2")
    g.add_argument("--out", default="out", help="output folder")
    g.set_defaults(func=cmd_generate)
    p = sub.add_parser("profile", help="measure each device's rows/s on the model")
    _add_run_args(p)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=48)
    p.set_defaults(func=cmd_profile)
    sub.add_parser("bench-balance", help="equal vs elastic vs elastic+strides with an emulated slow worker "
                   "(its own options: bench-balance --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench-balance"]:
        from .bench import balance

        return balance.main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StadiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
