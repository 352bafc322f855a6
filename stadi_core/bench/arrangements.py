"""Predicted arrangement tables: what ``auto`` picks, and every arrangement's predicted speedup.

    python -m stadi_core.bench.arrangements [--curves FILE] [--mode displaced|exact|both]

PREDICTIONS, NOT MEASUREMENTS. Three clusters x two models, every arrangement priced by the
planner's own cost model (``arrange.choose_plan`` -> ``cost_model.predict_step``: seconds per
base step) and replayed by the simulator (``simulate.simulate``: the whole run, warmup steps
synchronous). The compute curves (``gpu_class_curves.json``) are ILLUSTRATIVE: affine fits
built from public ballpark figures (sources in the file), not measured on these GPUs.

Clusters (``CLUSTERS``):
  (a) 2 x RTX 4090 class on one machine, PCIe link;
  (b) RTX 4090 class + RTX 3090 class on one machine, PCIe link;
  (c) 4 x RTX 4090 class in two machines (2 per machine): PCIe inside a machine, 10 GbE
      between machines (a 4 x 4 bandwidth / latency matrix in ``LinkModel``);
  (d) the same two machines over 1 GbE (``--clusters cd``: the two-machine tables of
      docs/simulate_two_machines.txt).
Links: PCIe 4.0 x16 ~25 GB/s effective, 10 us per message (32 GB/s raw per direction; NCCL's
own topology models a PCIe 4.0 x16 link at 24 GB/s, e.g. the ``PCI[24.0]`` lines in
NVIDIA/nccl-tests#307; RTX 4090s have no P2P, so NCCL goes through host memory and real
transfers can be slower, NVIDIA/nccl-tests#270). 10 GbE: 1.25 GB/s line rate (10 Gb/s / 8)
and ~50 us per message (TCP socket transport; an estimate, not a measurement). 1 GbE: 0.125 GB/s
line rate, ~100 us per message (an estimate; the netns test link measured 0.1 GB/s through TCP).

Models (one entry of ``gpu_class_curves.json`` each):
  SDXL 1024^2: latent 128 x 128, CFG 5 -> two branches (the curves are seconds of one call
      on a band of both branches, i.e. batch 2), fp16, 30 steps, bands aligned to 4 rows
      (the UNet downsamples twice).
  Flux.1-dev 1024^2: latent 128 x 128, guidance-distilled (cfg 1: guidance is an input, no
      uncond pass) -> NO branch split (``branches=False``); curves are batch 1, bf16,
      28 steps, bands aligned to 2 rows (2 x 2 patches).

Exchange bytes (per rank per network call at a sync step; ``sdxl_exchange`` /
``flux_exchange`` derive them, and the JSON stores the same numbers):
  SDXL: K and V of every self-attention (attn1) layer. Transformer depths 0/2/10 at the three
      levels (320/640/1280 channels): 2 down blocks x 2 + 3 up blocks x 2 = 10 layers at
      level 2, 2 x 10 + 10 (mid) + 3 x 10 = 60 at level 3 (70 in all). A level-2 feature row
      has W/2 tokens (64 at W = 128) and spans 2 latent rows, so one latent row is W/4 tokens
      there; at level 3 (W/4 columns, 4 latent rows per feature row) it is W/16 tokens.
      bytes/latent row = [10 x W/4 x 640 + 60 x W/16 x 1280] x 2 (K, V) x 2 bytes (fp16)
      x 2 (both CFG branches) = 6,553,600 at W = 128 (13.1 MB at W = 256, as
      example_curves.json has). Fixed bytes (independent of rows): the 2 halo rows every
      3 x 3 conv sends (40 convs: conv_in, 17 resnets x 2, 2 downsamplers, 2 upsamplers,
      conv_out; c_in x level width x 2 rows x batch 2 x 2 bytes) plus the GroupNorm moments
      (46 GroupNorms x [mean, m2] x 32 groups x batch 2 x fp32). messages = 40 + 46 + 70 =
      156 all-gathers per call (one per patch-parallel layer).
  Flux: K and V of the image tokens of every attention: 19 double + 38 single blocks = 57,
      hidden 3072; one token per 2 x 2 latent patch, so W/2 tokens per 2 latent rows = W/4
      tokens per latent row. bytes/latent row = 57 x W/4 x 3072 x 2 (K, V) x 2 bytes (bf16)
      x batch 1 = 22,413,312 at W = 128. No convs or GroupNorms (bytes_fixed 0); the text
      tokens' K/V are computed on every rank, not exchanged. messages = 57.
  Raw network output per latent row (a branch split all-reduces it): channels x W x batch x
      2 bytes = 4 x 128 x 2 x 2 = 2,048 (SDXL); 16 x 128 x 1 x 2 = 4,096 (Flux, unused:
      no branch split).

Speeds handed to ``choose_plan`` are rows/s at an equal share (``Curve.speed(H / P)``);
``compute_s(device, rows)`` reads the device's curve, so the launch-bound fixed cost of
small bands is priced. On several machines ``auto`` also prices bands inside each machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..arrange import Choice, choose_plan, link_for
from ..context_bytes import FLUX_DIT, SDXL_UNET, legacy_exchange
from ..cost_model import ExchangeCost, LinkModel, predict_step
from ..planner import Plan
from ..simulate import Curve, load_curves, simulate

__all__ = [
    "CURVES_PATH", "PCIE", "TEN_GBE", "ClusterDevice", "Cluster", "Workload", "Row", "Table", "CLUSTERS",
    "cluster_a", "cluster_b", "cluster_c", "groups_inside_machines", "sdxl_exchange", "flux_exchange",
    "load_workloads", "build_table", "build_tables", "format_tables", "main",
]

CURVES_PATH = Path(__file__).with_name("gpu_class_curves.json")

# (GB/s, seconds per message); see the module docstring for where they come from.
PCIE = (25.0, 10e-6)
TEN_GBE = (1.25, 50e-6)
ONE_GBE = (0.125, 100e-6)


# --------------------------------------------------------------------------------------
# exchange bytes, derived from the architectures
def sdxl_exchange(width: int = 128, batch: int = 2, dtype_bytes: int = 2) -> dict[str, float]:
    """SDXL UNet exchange per rank per call (derivation: module docstring), both CFG branches."""
    return legacy_exchange(SDXL_UNET, width, batch, dtype_bytes)  # the layer inventory: context_bytes.py


def flux_exchange(width: int = 128, batch: int = 1, dtype_bytes: int = 2) -> dict[str, float]:
    """Flux.1 exchange per rank per call: image-token K/V of 19 double + 38 single blocks (no CFG)."""
    return legacy_exchange(FLUX_DIT, width, batch, dtype_bytes)


# --------------------------------------------------------------------------------------
# clusters and workloads
@dataclass(frozen=True)
class ClusterDevice:
    name: str
    gpu: str  # curve key in the workload (GPU class)
    machine: str


@dataclass(frozen=True)
class Cluster:
    key: str
    title: str
    devices: tuple[ClusterDevice, ...]
    link: LinkModel

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def machine_of(self, device: str) -> str:
        return next(d.machine for d in self.devices if d.name == device)

    @property
    def machines(self) -> list[str]:
        return list(dict.fromkeys(d.machine for d in self.devices))


def _link(devices: Sequence[ClusterDevice], inside: tuple[float, float], between: tuple[float, float]) -> LinkModel:
    same = lambda a, b: a.machine == b.machine  # noqa: E731
    bw = tuple(tuple((inside if same(a, b) else between)[0] for b in devices) for a in devices)
    lat = tuple(tuple((inside if same(a, b) else between)[1] for b in devices) for a in devices)
    return LinkModel(bandwidth_gbps=inside[0], latency_s=inside[1], bandwidth_matrix=bw, latency_matrix=lat)


def cluster_a() -> Cluster:
    devs = (ClusterDevice("gpu0", "rtx4090", "m0"), ClusterDevice("gpu1", "rtx4090", "m0"))
    return Cluster("a", "(a) 2 x RTX 4090 class, one machine, PCIe", devs, LinkModel(*PCIE))


def cluster_b() -> Cluster:
    devs = (ClusterDevice("4090", "rtx4090", "m0"), ClusterDevice("3090", "rtx3090", "m0"))
    return Cluster("b", "(b) RTX 4090 class + RTX 3090 class, one machine, PCIe", devs, LinkModel(*PCIE))


def cluster_c(order: Sequence[int] = (0, 1, 2, 3)) -> Cluster:
    """4 x 4090 class, 2 per machine; ``order`` permutes the device list (tests: interleaved)."""
    base = [ClusterDevice(f"m{m}.gpu{g}", "rtx4090", f"m{m}") for m in (0, 1) for g in (0, 1)]
    devs = tuple(base[i] for i in order)
    return Cluster("c", "(c) 4 x RTX 4090 class in 2 machines (2 each): PCIe inside, 10 GbE between",
                   devs, _link(devs, PCIE, TEN_GBE))


def cluster_d(order: Sequence[int] = (0, 1, 2, 3)) -> Cluster:
    """(c)'s two machines over 1 GbE."""
    base = [ClusterDevice(f"m{m}.gpu{g}", "rtx4090", f"m{m}") for m in (0, 1) for g in (0, 1)]
    devs = tuple(base[i] for i in order)
    return Cluster("d", "(d) 4 x RTX 4090 class in 2 machines (2 each): PCIe inside, 1 GbE between",
                   devs, _link(devs, PCIE, ONE_GBE))


CLUSTERS = (cluster_a, cluster_b, cluster_c)
ALL_CLUSTERS = {"a": cluster_a, "b": cluster_b, "c": cluster_c, "d": cluster_d}


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    height: int
    width: int
    steps: int
    align: int
    branches: bool
    batch_note: str
    curves: Mapping[str, Curve]  # GPU class -> seconds of one call vs band rows
    exchange: ExchangeCost
    illustrative: bool
    description: str
    fits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def load_workloads(path: str | Path | Mapping[str, Any] = CURVES_PATH) -> tuple[Workload, ...]:
    """The models of a GPU-class curves file (format: gpu_class_curves.json)."""
    data = json.loads(Path(path).read_text()) if isinstance(path, (str, Path)) else dict(path)
    out = []
    for key, m in data["models"].items():
        cs = load_curves(m)  # each model entry is a curves file of its own (simulate.load_curves format)
        ex = cs.exchange
        out.append(Workload(
            key=key, title=str(m["title"]), height=int(m["height"]), width=int(m["width"]), steps=int(m["steps"]),
            align=int(m["align"]), branches=bool(m["branches"]), batch_note=str(m.get("batch", "")),
            curves=cs.curves,
            exchange=ExchangeCost(float(ex["bytes_per_row"]), float(ex.get("bytes_fixed", 0.0)),
                                  int(ex.get("messages", 1)), float(ex.get("output_bytes_per_row", 0.0))),
            illustrative=bool(data.get("illustrative", False) or cs.illustrative), description=cs.description,
            fits=dict(m.get("fit", {}))))
    return tuple(out)


# --------------------------------------------------------------------------------------
# the tables
@dataclass(frozen=True)
class Row:
    name: str  # choose_plan's candidate name, or an extra arrangement (candidate False)
    plan: Plan
    step_s: float  # predicted seconds per base step: choose_plan's price
    run_s: float  # predicted whole-run latency (simulate)
    comm_ms: float  # one synchronous call's exchange (slowest rank) + output all-reduce, ms
    speedup_step: float  # single fastest device's step / this step
    speedup_run: float  # single fastest device's run / this run
    chosen: bool
    candidate: bool = True

    @property
    def is_single(self) -> bool:
        return self.name.startswith("single")

    @property
    def is_branch_split(self) -> bool:
        return self.plan.splits_branches


@dataclass(frozen=True)
class Table:
    cluster: Cluster
    workload: Workload
    mode: str
    choice: Choice
    rows: tuple[Row, ...]

    @property
    def chosen(self) -> Row:
        return next(r for r in self.rows if r.chosen)


ORDER = ("single", "cfg_split", "cfg_split+bands", "bands")


def groups_inside_machines(cluster: Cluster, plan: Plan) -> bool:
    """Every branch group's ranks are devices of one machine (True for a plan without groups)."""
    return all(len({cluster.machine_of(plan.bands[r].device) for r in g.ranks}) == 1 for g in plan.groups)


def _curves_by_device(cluster: Cluster, workload: Workload) -> dict[str, Curve]:
    return {d.name: workload.curves[d.gpu] for d in cluster.devices}


def build_table(cluster: Cluster, workload: Workload, mode: str = "displaced", *, warmup: int = 2) -> Table:
    """One cluster x model x mode: choose_plan's candidates predicted per step and per run."""
    devices = cluster.names
    curves = _curves_by_device(cluster, workload)
    n = len(devices)
    speeds = [curves[d].speed(workload.height / n) for d in devices]
    compute = lambda d, rows: curves[d](rows)  # noqa: E731
    common = dict(align=workload.align, steps=workload.steps, warmup=warmup, mode=mode)
    choice = choose_plan(workload.height, speeds, devices=devices, strategy="auto", branches=workload.branches,
                         compute_s=compute, link=cluster.link, exchange=workload.exchange, **common)
    ex = workload.exchange
    sim_kw = dict(bytes_per_row=ex.bytes_per_row, bytes_fixed=ex.bytes_fixed, messages=ex.messages,
                  output_bytes_per_row=ex.output_bytes_per_row)

    def predict(plan: Plan):
        link = link_for(cluster.link, devices, plan)
        cost = predict_step(plan, lambda r, rows: compute(plan.bands[r].device, rows), link=link, cost=ex)
        run = simulate(plan, curves, link=link, **sim_kw).latency_s
        return cost, run

    entries = [(c.name, c.plan, True, c.plan is choice.plan) for c in choice.candidates]
    entries.sort(key=lambda e: next(i for i, k in enumerate(ORDER) if e[0] == k or e[0].startswith(k + " ")))
    priced = []
    for name, plan, is_cand, chosen in entries:
        cost, run = predict(plan)
        # a candidate's s/step is what choose_plan priced it at (its Choice)
        step = next(c.predicted_s for c in choice.candidates if c.plan is plan) if is_cand else cost.seconds
        comm = (max(cost.exchange_s) if cost.exchange_s else 0.0) + cost.output_s
        priced.append((name, plan, is_cand, chosen, step, run, comm))
    single = next(p for p in priced if p[0].startswith("single"))
    rows = tuple(Row(name, plan, step, run, 1e3 * comm, single[4] / step, single[5] / run, chosen, is_cand)
                 for name, plan, is_cand, chosen, step, run, comm in priced)
    return Table(cluster, workload, mode, choice, rows)


def build_tables(path: str | Path | Mapping[str, Any] = CURVES_PATH, *, modes: Sequence[str] = ("displaced", "exact"),
                 clusters: Sequence[Cluster] | None = None, warmup: int = 2) -> list[Table]:
    """Every cluster x model x mode table (pure: reads the curves, prints nothing)."""
    workloads = load_workloads(path)
    clusters = list(clusters) if clusters is not None else [make() for make in CLUSTERS]
    return [build_table(c, w, m, warmup=warmup) for c in clusters for w in workloads for m in modes]


# --------------------------------------------------------------------------------------
# printing
def layout(plan: Plan) -> str:
    """Compact: bands 'dev rows [kN]' top to bottom; branch splits 'branch: dev[start,end) ...'."""
    if plan.groups:
        parts = []
        for g in sorted(plan.groups, key=lambda g: g.branches != ("cond",)):
            cut = " ".join(f"{plan.bands[r].device}[{g.row_start(r)},{g.row_start(r) + g.rows_of(r)})"
                           for r in g.ranks)
            parts.append(f"{'+'.join(g.branches)}: {cut}")
        return " | ".join(parts)
    return " | ".join(f"{b.device} {b.rows}" + (f" k{b.stride}" if b.stride > 1 else "") for b in plan.bands)


def _mb(x: float) -> str:
    return f"{x / 1e6:,.2f} MB"


def header(tables: Sequence[Table]) -> str:
    ws = list(dict.fromkeys(t.workload.key for t in tables))
    wl = {t.workload.key: t.workload for t in tables}
    cl = list(dict.fromkeys(t.cluster.key for t in tables))
    cls = {t.cluster.key: t.cluster for t in tables}
    illustrative = any(t.workload.illustrative for t in tables)
    lines = ["STADI arrangement tables: PREDICTED by the planner's cost model and the simulator, NOT measured.",
             ("Compute curves are ILLUSTRATIVE (affine fits to public ballpark figures; sources in "
              f"{CURVES_PATH.name})." if illustrative else "Compute curves: measured (illustrative: false)."),
             f"Links: PCIe {PCIE[0]:g} GB/s, {PCIE[1] * 1e6:g} us/message (inside a machine); "
             f"10 GbE {TEN_GBE[0]:g} GB/s, {TEN_GBE[1] * 1e6:g} us/message (between machines)"
             + (f"; 1 GbE {ONE_GBE[0]:g} GB/s, {ONE_GBE[1] * 1e6:g} us/message." if "d" in cl else "."),
             "Clusters:"]
    for k in cl:
        c = cls[k]
        lines.append(f"  {c.title}: " + ", ".join(f"{d.name}={d.gpu}@{d.machine}" for d in c.devices))
    lines.append("Models (one call = one network evaluation on a band; t(rows) = fixed + per_row x rows):")
    for k in ws:
        w = wl[k]
        ex = w.exchange
        fits = "; ".join(f"{g}: {f['fixed_s'] * 1e3:.1f} ms + {f['per_row_s'] * 1e3:.3f} ms/row "
                         f"(full {w.height} rows {w.curves[g](w.height):.3f} s)" for g, f in w.fits.items())
        lines.append(f"  {w.title}: latent {w.height}x{w.width}, {w.steps} steps, align {w.align}, "
                     f"{'2 CFG branches' if w.branches else 'no branch split'}; {w.batch_note}")
        lines.append(f"    compute: {fits}")
        lines.append(f"    exchange per rank per call: {_mb(ex.bytes_per_row)}/row + {_mb(ex.bytes_fixed)} fixed, "
                     f"{ex.messages} all-gathers; raw output {ex.output_bytes_per_row:,.0f} B/row")
    lines.append("Columns: s/step = choose_plan's own price per base step (cost_model.predict_step); "
                 "run s = simulate() of the whole run (warmup steps synchronous);")
    lines.append("  x = speedup vs the single fastest device (same table); comm ms = one synchronous call's "
                 "exchange (slowest rank) + output all-reduce;")
    lines.append("  auto: <- = choose_plan(strategy='auto') picked it.")
    return "\n".join(lines)


def format_table(t: Table) -> str:
    w, c = t.workload, t.cluster
    head = f"{c.title} | {w.title} | mode {t.mode}"
    cols = (f"  {'arrangement':<24} {'s/step':>8} {'run s':>8} {'x step':>6} {'x run':>6} {'comm ms':>8} "
            f"{'auto':>4}  layout")
    lines = [head, cols]
    for r in t.rows:
        lines.append(f"  {r.name:<24} {r.step_s:>8.4f} {r.run_s:>8.3f} {r.speedup_step:>6.2f} {r.speedup_run:>6.2f} "
                     f"{r.comm_ms:>8.2f} {'<-' if r.chosen else '':>4}  {layout(r.plan)}")
    ch = t.chosen
    machines = ""
    if ch.plan.groups and len(c.machines) > 1:
        machines = f"; every branch group inside one machine: {groups_inside_machines(c, ch.plan)}"
    lines.append(f"  auto -> {ch.name}: predicted {ch.speedup_step:.2f}x per step, {ch.speedup_run:.2f}x per run"
                 + machines)
    return "\n".join(lines)


def summary(tables: Sequence[Table]) -> str:
    lines = ["Summary (auto's choice, predicted speedup per run vs the single fastest device):",
             f"  {'cluster':<8} {'model':<22} " + " ".join(f"{m:>30}" for m in dict.fromkeys(t.mode for t in tables))]
    by = {}
    for t in tables:
        by.setdefault((t.cluster.key, t.workload.title), {})[t.mode] = t
    for (ck, wt), modes in by.items():
        cells = [f"{(t.chosen.name + f' {t.chosen.speedup_run:.2f}x'):>30}" for t in modes.values()]
        lines.append(f"  ({ck}){'':<5} {wt:<22} " + " ".join(cells))
    return "\n".join(lines)


def format_tables(tables: Sequence[Table]) -> str:
    return "\n\n".join([header(tables)] + [format_table(t) for t in tables] + [summary(tables)])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stadi_core.bench.arrangements", description=__doc__.split("\n")[0])
    ap.add_argument("--curves", default=str(CURVES_PATH), help="GPU-class curves file (gpu_class_curves.json format)")
    ap.add_argument("--mode", choices=("displaced", "exact", "both"), default="both")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clusters", default="abc", help="which clusters, by letter: abc (default), cd (two machines: "
                    "10 GbE and 1 GbE), abcd")
    args = ap.parse_args(argv)
    modes = ("displaced", "exact") if args.mode == "both" else (args.mode,)
    unknown = sorted(set(args.clusters) - set(ALL_CLUSTERS))
    if unknown:
        ap.error(f"unknown cluster(s) {''.join(unknown)}: use letters of {''.join(ALL_CLUSTERS)}")
    tables = build_tables(args.curves, modes=modes, warmup=args.warmup,
                          clusters=[ALL_CLUSTERS[k]() for k in dict.fromkeys(args.clusters)])
    print(format_tables(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
