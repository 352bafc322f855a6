"""A worker that becomes slower mid-run: the static elastic plan vs in-run re-planning, side by side.

ComfyUI's lockstep path in this process (the server's sampler loop, as the STADI Sampler and the STADI
Parallel Model run it) on the tiny SD1.5 checkpoint the tests build, 2 CPU workers, bands. cpu:1 is
emulated ``--slowdown`` times slower from sampler step ``--slowdown-from`` on (the worker pads its
compute, DESIGN §7). The same run twice: STADI_REPLAN=off (the plan made at the start stays) and on
(stadi_core/replan.py moves the rows once the measured band times say so).

Per run: wall time, per-rank busy and idle %, when the re-plan happened, and the compute makespan
(sum over network calls of the slowest rank's busy time) against the ideal for the changed cluster
(sum over calls of H / (sum of the ranks' rates at that step), the rates measured in the static run:
cpu:0 throughout, cpu:1 before and after its slowdown). Needs a ComfyUI checkout (--comfyui or
STADI_COMFYUI_PATH) and this repository's tests/ (the checkpoint builder).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from pathlib import Path

import torch

from ..cluster import ClusterSpec, DeviceSpec
from .decode import load_pack, setup_comfy
from .memory import _harness
from .units import pair_baseline


def _run(lockstep, types, model, conds, latent, noise, args, replan: str) -> dict:
    import comfy.sample

    os.environ["STADI_REPLAN"] = replan  # read when the run starts
    lockstep.Deployment.forget_measurements()  # both runs start from the same plan, not the last run's speeds
    cluster = types.StadiCluster(ClusterSpec((DeviceSpec("cpu:0"), DeviceSpec(
        "cpu:1", slowdown=args.slowdown, slowdown_from=args.slowdown_from)), backend="gloo"), measure=False)
    patch = lockstep.LockstepPatch(cluster, args.mode, args.warmup, strategy="bands")
    t0 = time.perf_counter()
    with torch.inference_mode():
        comfy.sample.sample(patch.apply(model), noise, args.steps, args.cfg, args.sampler, "normal", conds[0],
                            conds[1], latent, seed=args.seed, disable_pbar=True)
    return summarize(f"STADI_REPLAN={replan}", time.perf_counter() - t0, patch.last_report)


def summarize(label: str, wall: float, report) -> dict:
    """One run's row: its network calls (each rank's record per call), compute makespan and re-plans."""
    calls = list(zip(*report.steps))  # per network call: each rank's record
    return {"label": label, "wall": wall, "report": report, "calls": calls,
            "makespan": sum(max(r["busy_s"] for r in call) for call in calls),
            "replans": [n for n in report.notes if n.startswith("re-planned at step")]}


def ideal_compute(static: dict, height: int, slowed_from: int) -> float:
    """Compute time of perfectly balanced calls at the rates the static run measured."""
    rows = [r.rows for r in static["report"].ranks]
    def rate(rank: int, before: bool) -> float:
        busy = [c[rank]["busy_s"] for c in static["calls"][1:] if (c[rank]["step"] < slowed_from) == before]
        return rows[rank] / statistics.median(busy)
    c0 = statistics.median([rows[0] / c[0]["busy_s"] for c in static["calls"][1:]])
    c1 = {True: rate(1, True), False: rate(1, False)}
    return sum(height / (c0 + c1[call[1]["step"] < slowed_from]) for call in static["calls"])


def run(args) -> str:
    comfy_root = setup_comfy(args.comfyui)
    pack = load_pack()
    lockstep = importlib.import_module(pack.__name__ + ".nodes.lockstep")
    types = importlib.import_module(pack.__name__ + ".nodes.types")
    import comfy.sample
    import comfy.sd

    ckpt = _harness().write_tiny_sd15_checkpoint(Path(args.work) / "stadi_tiny_sd15.safetensors",
                                                 comfy=Path(comfy_root))
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True)
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in ("a photo of a cat", "blurry")]
    height, width = args.height // 8, args.width // 8
    latent = torch.zeros(1, 4, height, width)
    noise = comfy.sample.prepare_noise(latent, args.seed)
    pair = pair_baseline()
    runs = [_run(lockstep, types, model, conds, latent, noise, args, replan) for replan in ("off", "on")]
    return "\n".join(table_lines(
        f"bench-replan: tiny SD1.5 in ComfyUI's lockstep path, {args.width}x{args.height} px, {args.steps} "
        f"{args.sampler} steps, cfg {args.cfg}, {args.mode} (warmup {args.warmup}), 2 CPU workers, bands; cpu:1 "
        f"{args.slowdown:g}x slower from step {args.slowdown_from}", pair, runs, height, args.slowdown_from))


def table_lines(title: str, pair: float, runs: list[dict], height: int, slowed_from: int) -> list[str]:
    """The static run (first) and the re-planned one side by side, against the ideal for the changed cluster."""
    ideal = ideal_compute(runs[0], height, slowed_from)
    lines = [title, f"pair baseline (two busy single-thread processes vs one alone): {pair:.2f}",
             f"ideal compute for the changed cluster (rates measured in the static run): {ideal:.2f} s", "",
             "| run | wall s | compute makespan s | vs ideal | rows at the end | busy s (cpu:0 / cpu:1) | "
             "idle % (cpu:0 / cpu:1) | re-plans |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ranks = r["report"].ranks
        lines.append(f"| {r['label']} | {r['wall']:.2f} | {r['makespan']:.2f} | {r['makespan'] / ideal:.2f}x | "
                     f"{'/'.join(str(k.rows) for k in ranks)} | {' / '.join(f'{k.busy_s:.2f}' for k in ranks)} | "
                     f"{' / '.join(f'{k.idle_pct:.0f}' for k in ranks)} | {'; '.join(r['replans']) or 'none'} |")
    lines += ["", f"re-planned vs static: wall {runs[1]['wall'] / runs[0]['wall']:.2f}x, compute makespan "
              f"{runs[1]['makespan'] / runs[0]['makespan']:.2f}x. Goal (issue #13): the re-planned run within 15 % "
              "of the ideal (its makespan <= 1.15x ideal)."]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stadi_core bench-replan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $STADI_COMFYUI_PATH)")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "stadi-bench-replan"))
    p.add_argument("--height", type=int, default=768, help="px; 96 latent rows split 2:1 on the alignment")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--slowdown", type=float, default=2.0)
    p.add_argument("--slowdown-from", type=int, default=4)
    p.add_argument("--mode", default="displaced", choices=["displaced", "exact"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
