"""Predicted bytes and step times of each displaced context option (issue #12): PREDICTIONS, not measurements.

    python -m stadi_core.bench.context_predict [--out FILE] [--curves FILE]

Two tables, so a user can see which context option their link needs before running anything:

(a) MB per rank per sync call by option (full, partial 0.5, partial 0.3, fp8, delta4, partial 0.3 +
    delta4), split into attention K/V, conv halos and GroupNorm moments, for SDXL 1024^2 (latent
    128 x 128, CFG batch 2, fp16) and Flux.1 1024^2 (batch 1, bf16) on 2 and 4 equal ranks. Counted
    by context_bytes.py with the engine's convention (all-gather: padded payload x (P - 1); point
    to point: bytes per destination). With 4 ranks the busiest rank is shown (a middle band has
    two neighbours under partial). DERIVED from the architectures, exact for that convention.
(b) Predicted seconds per base step and speedup over one device, per arrangement and option, on
    two RTX 4090-class GPUs: over PCIe without P2P (NCCL through host memory; ASSUMED 12 GB/s,
    15 us per message) and in two machines over 10 GbE (ASSUMED 1.25 GB/s line rate, 50 us per
    message), 28 and 50 steps, warmup 4 (synchronous, raw full context). Priced by the planner's
    own cost model (cost_model.predict_step, overlap on unless the row says otherwise), and the
    option ``choose_plan(context="auto", strategy="auto")`` picks. The compute curves are the
    ILLUSTRATIVE RTX 4090-class affine fits of gpu_class_curves.json (bench/arrangements.py; public
    ballpark figures, not measured here): SDXL 12 ms + 0.961 ms/row (0.135 s per full call), Flux
    86.7 ms + 4.79 ms/row (0.70 s). The codecs' encode/decode compute is not priced.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..arrange import choose_plan
from ..context_bytes import FLUX_DIT, SDXL_UNET, Inventory, call_bytes
from ..cost_model import ExchangeCost, LinkModel, predict_step
from ..parallel.options import ContextOptions
from .arrangements import CURVES_PATH, TEN_GBE, load_workloads

__all__ = ["MODES", "LINKS", "Model", "MODELS", "bytes_table", "time_table", "main"]

MODES = (
    ("full", ContextOptions()),
    ("partial 0.5", ContextOptions(context="partial", portion=0.5)),
    ("partial 0.3", ContextOptions(context="partial", portion=0.3)),
    ("fp8", ContextOptions(exchange="fp8")),
    ("delta4", ContextOptions(exchange="delta", delta_bits=4)),
    ("partial 0.3 + delta4", ContextOptions(context="partial", portion=0.3, exchange="delta", delta_bits=4)),
)
NO_OVERLAP = ("full, no overlap", ContextOptions(overlap=False))
PCIE_NO_P2P = (12.0, 15e-6)  # GB/s, s per message: assumed (RTX 4090s have no P2P; NCCL goes via host)
LINKS = (("2 x 4090, PCIe without P2P (12 GB/s, 15 us)", PCIE_NO_P2P),
         ("2 x 4090 in 2 machines, 10 GbE (1.25 GB/s, 50 us)", TEN_GBE))
STEPS = (28, 50)
WARMUP = 4


@dataclass(frozen=True)
class Model:
    key: str  # workload key in gpu_class_curves.json
    title: str
    inventory: Inventory
    batch: int
    dtype_bytes: int
    align: int  # bands' row alignment (UNet: 4 at 1024^2 as in arrangements.py; Flux: its 2 x 2 patches)
    height: int = 128
    width: int = 128


MODELS = (Model("sdxl-1024", "SDXL 1024^2 (CFG: batch 2, fp16)", SDXL_UNET, 2, 2, 4),
          Model("flux-dev-1024", "Flux.1 1024^2 (batch 1, bf16)", FLUX_DIT, 1, 2, 2))


def _mb(x: float) -> str:
    return f"{x / 1e6:9.1f}"


def bytes_table(models: Sequence[Model] = MODELS, ranks: Sequence[int] = (2, 4)) -> str:
    """Table (a): MB per rank per displaced sync call, by option."""
    lines = ["(a) MB per rank per sync call (displaced, after warmup), busiest rank; DERIVED, not measured",
             f"  {'model':<34} {'P':>2} {'mode':<22} {'K/V':>9} {'halo':>9} {'moments':>9} {'total':>9} {'vs full':>8}"]
    for m in models:
        for p in ranks:
            rows = [m.height // p] * p
            full = None
            for name, opts in MODES:
                per = call_bytes(m.inventory, rows, m.width, m.batch, m.dtype_bytes, opts)
                top = max(per, key=lambda d: d["total"])
                full = full or top["total"]
                lines.append(f"  {m.title:<34} {p:>2} {name:<22} {_mb(top['kv'])} {_mb(top['halo'])} "
                             f"{_mb(top['moments'])} {_mb(top['total'])} {top['total'] / full:>7.3f}x")
    sync = call_bytes(SDXL_UNET, [64, 64], 128, 2, 2, synchronous=True)[0]
    lines.append(f"  warmup / exact calls are always full raw: SDXL 2 ranks {sync['total'] / 1e6:.1f} MB "
                 f"(K/V {sync['kv'] / 1e6:.1f} MB; the issue's estimate: ~420 MB)")
    return "\n".join(lines)


def _choice(model: Model, curve, link: LinkModel, cost: ExchangeCost, steps: int):
    """choose_plan over two equal 4090-class devices, strategy and context auto."""
    return choose_plan(model.height, [curve.speed(model.height / 2)] * 2, devices=["gpu0", "gpu1"], strategy="auto",
                       branches=model.batch == 2, compute_s=lambda d, rows: curve(rows), link=link, exchange=cost,
                       align=model.align, steps=steps, warmup=WARMUP, mode="displaced", context="auto")


def time_table(models: Sequence[Model] = MODELS, curves_path: str | Path = CURVES_PATH) -> str:
    """Table (b): predicted s/step and speedup per arrangement and option, and auto's pick."""
    workloads = {w.key: w for w in load_workloads(curves_path)}
    lines = [f"(b) PREDICTED seconds per base step (warmup {WARMUP} synchronous, raw; then the option) and speedup "
             "over one 4090-class device; curves ILLUSTRATIVE, links ASSUMED"]
    for m in models:
        curve = workloads[m.key].curves["rtx4090"]
        cost = ExchangeCost.for_context(m.inventory, m.width, m.batch, m.dtype_bytes)
        for title, (gbps, lat) in LINKS:
            link = LinkModel(gbps, lat)
            lines.append(f"  {m.title} | {title}")
            lines.append(f"    {'arrangement':<18} {'mode':<22} " + " ".join(
                f"{f's/step@{n}':>10} {f'x@{n}':>6}" for n in STEPS) + f" {'exch ms':>8}")
            picks, tables = [], {}
            for steps in STEPS:
                choice = _choice(m, curve, link, cost, steps)
                picks.append((steps, choice))
                for c in choice.candidates:
                    tables.setdefault(c.name, {})[steps] = c
            single = next(tables[x] for x in tables if x.startswith("single"))
            for name, by_steps in tables.items():
                banded = any(len(g.ranks) > 1 for g in by_steps[STEPS[0]].plan.unit_groups)
                modes = list(MODES) + [NO_OVERLAP] if banded else [("-" if name.startswith("single") else
                                                                     "- (no band exchange)", None)]
                for label, opts in modes:
                    cells, exch = [], 0.0
                    for steps in STEPS:
                        plan = by_steps[steps].plan
                        plan = plan if opts is None else replace(plan, context=opts)
                        one = single[steps].predicted_s
                        sc = predict_step(plan, lambda r, rows: curve(rows), link=link, cost=cost)
                        exch = max(sc.displaced_exchange_s) if sc.displaced_exchange_s else 0.0
                        cells.append(f"{sc.seconds:>10.4f} {one / sc.seconds:>5.2f}x")
                    lines.append(f"    {name:<18} {label:<22} " + " ".join(cells) + f" {exch * 1e3:>8.1f}")
            for steps, choice in picks:
                ch = choice.candidates[0]
                one = next(c for c in choice.candidates if c.name.startswith("single")).predicted_s
                lines.append(f"    auto @{steps} steps -> {ch.name}, context {ch.plan.context.label()}: "
                             f"{ch.predicted_s:.4f} s/step ({one / ch.predicted_s:.2f}x)")
                best_bands = next((c for c in choice.candidates if c.name == "bands"), None)
                if best_bands is not None and best_bands is not ch:
                    lines.append(f"      (its bands candidate would take context {best_bands.plan.context.label()}: "
                                 f"{best_bands.predicted_s:.4f} s/step)")
    lines.append("  exch ms = the slowest rank's exchange of one displaced sync call (50 steps); x = the single "
                 "device's s/step / this s/step.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stadi_core.bench.context_predict", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the tables to this file")
    ap.add_argument("--curves", default=str(CURVES_PATH), help="GPU-class curves file (gpu_class_curves.json format)")
    args = ap.parse_args(argv)
    text = bytes_table() + "\n\n" + time_table(curves_path=args.curves) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
